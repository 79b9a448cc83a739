"""The grain input pipeline: a TFDS source → per-process shard → seeded shuffle → transforms →
counted batches → (optionally) global ``jax.Array`` batches on the mesh.

Order is a pure function of (seed, process index, process count): grain's random-access
``MapDataset`` shuffles by index, so the number of worker processes does not change it, and the
iterator state (an index) is checkpointable and restores the exact continuation.
"""

import logging
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from region_medclip.data import mixture, registry, transforms
from region_medclip.data.schema import random_batch  # noqa: F401  (its home before; callers use it)
from region_medclip.data.tokenizers import TextTokenizer
from region_medclip.data.tokenizers import from_config as tokenizer_from_config

_log = logging.getLogger("region_medclip.data")
_STATS = ("skipped", "truncated_rois", "truncated_texts")


def source(name: str, split: str, data_config) -> Any:
    """Random-access source of schema records for ``name`` / ``split`` (its registry entry's:
    ``synth_cxr`` is built on first use at ``data.image_size``; other names must have been
    prepared with their builder into ``data.data_dir``)."""
    return registry.get(name, data_config.data_dir).data_source(split, data_config)


def no_finding_index(name: str, data_config) -> int:
    """The "no finding" label index of dataset ``name``, or -1 (no such class, or ``name`` is
    not a dataset: in-memory records)."""
    try:
        return registry.get(name, data_config.data_dir).no_finding_index()
    except KeyError:
        return -1


class _CountingBatch(grain.IterDataset):
    """Batches examples, dropping those marked ``_skip`` and counting them in the batch; a
    finite pass ends with a partial batch rather than losing its last examples. With
    ``sources`` (a mixture's labels) each batch also counts its rows of each source."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, sources=()):
        super().__init__(parent)
        self._batch_size = batch_size
        self._sources = tuple(sources)

    def __iter__(self) -> grain.DatasetIterator:
        return _CountingBatchIterator(self._parent.__iter__(), self._batch_size, self._sources)


class _CountingBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, sources=()):
        super().__init__(parent)
        self._batch_size = batch_size
        self._sources = sources

    def __next__(self) -> dict[str, np.ndarray]:
        items, skipped = [], 0
        while len(items) < self._batch_size:
            try:
                example = next(self._parent)
            except StopIteration:
                if not items:  # an evaluation pass is over
                    raise
                break  # its last, partial batch (training repeats forever and never gets here)
            if "_skip" in example:
                skipped += 1
                continue
            items.append(example)
        batch = {key: np.stack([x[key] for x in items]) for key in items[0]}
        for key in ("truncated_rois", "truncated_texts"):
            batch[key] = np.int32(batch[key].sum())
        batch["skipped"] = np.int32(skipped)
        if self._sources:
            counts = np.bincount(batch.pop("_source"), minlength=len(self._sources))
            for label, count in zip(self._sources, counts, strict=True):
                batch[f"source/{label}"] = np.int32(count)
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def make_dataset(
    data_config,
    *,
    split: str,
    train: bool,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer: TextTokenizer | None = None,
    records: Any = None,
) -> grain.IterDataset:
    """Local batches of model inputs (see ``transforms.Finalize`` for the keys) plus the
    per-batch counts ``skipped``, ``truncated_rois`` (boxes past ``max_rois``) and
    ``truncated_texts`` (reports over ``text_len``, captions over ``caption_len``, cut to fit).
    When ``data_config.train`` is a mixture (:mod:`.mixture`) a training batch also holds
    ``has_image``, ``has_text [b]`` and counts ``source/<label>`` of each source's rows.

    Args:
      data_config: ``config.data``.
      split: ``train`` | ``validation`` | ``test``.
      train: shuffle, repeat forever and augment; otherwise one ordered pass.
      seed: shuffle / augmentation seed.
      batch_size: examples per batch on this process.
      process_index, process_count: this process's shard of the source.
      tokenizer: defaults to ``config.data.tokenizer``.
      records: a random-access source to use instead of ``data_config.train``/``eval``
        (tests, in-memory data).
    """
    tokenizer = tokenizer or tokenizer_from_config(data_config)
    shard = dict(process_index=process_index, process_count=process_count, tokenizer=tokenizer)
    labels = ()
    if records is not None or not train or not mixture.is_mixture(data_config.train):
        name = data_config.train if train else data_config.eval
        if records is None:
            records = source(name, split, data_config)
        no_finding = no_finding_index(name, data_config)
        ds = _examples(records, data_config, train=train, seed=seed, no_finding=no_finding, **shard)
    else:
        ds, labels = _mixture(data_config, split, seed, shard)
    ds = _CountingBatch(ds.to_iter_dataset(), batch_size, labels)
    if data_config.workers > 0:
        from absl import flags

        # grain's workers read absl flags; a caller outside `app.run` has not parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.workers))
    return ds


def _mixture(data_config, split: str, seed: int, shard: dict) -> tuple[grain.MapDataset, list]:
    """The training stream of the mixture ``data_config.train`` (:mod:`.mixture`) and its
    sources' labels. Source ``i`` is shuffled with ``seed + 1000 i``."""
    sources = mixture.parse(data_config.train)
    streams = []
    for i, src in enumerate(sources):
        try:
            records = grain.MapDataset.source(source(src.name, split, data_config))
        except (KeyError, FileNotFoundError) as err:
            raise ValueError(f"config.data.train: source {src.label!r}: {err}") from err
        if src.parts > 1:
            records = records[src.part :: src.parts]
        no_finding = no_finding_index(src.name, data_config)
        examples = _examples(
            records, data_config, train=True, seed=seed + 1000 * i, no_finding=no_finding, **shard
        )
        streams.append(examples.map(mixture.Unpair(src.kind)))
    return mixture.mix(streams, sources), [s.label for s in sources]


def _examples(
    records,
    data_config,
    *,
    train: bool,
    seed: int,
    process_index,
    process_count,
    tokenizer,
    no_finding: int = -1,
) -> grain.MapDataset:
    """This process's shard of ``records``, seeded (shuffled and repeated forever when
    ``train``), decoded, resized, augmented when ``train`` and finalised into model inputs."""
    if not isinstance(records, grain.MapDataset):
        records = grain.MapDataset.source(records)
    ds = records[process_index::process_count].seed(seed)
    if train:
        ds = ds.shuffle().repeat(None)
    ds = ds.map(transforms.Decode(strict=data_config.get("strict", False)))
    ds = ds.map(transforms.ResizePad(data_config.image_size))
    if train and data_config.get("aspect_pad", 0.0) > 0:
        ds = ds.random_map(transforms.AspectPad(p=data_config.aspect_pad))
    if train and data_config.augment:
        ds = ds.random_map(transforms.Augment())
    if train and data_config.get("report_sentences", 0.0) > 0:
        ds = ds.random_map(transforms.SampleSentences(p=data_config.report_sentences))
    return ds.map(
        transforms.Finalize(
            tokenizer=tokenizer,
            max_rois=data_config.max_rois,
            text_len=data_config.text_len,
            num_negatives=data_config.num_negatives,
            seed=seed,
            caption_len=data_config.get("caption_len", 0),
            # Hard-negative reports serve the training loss only.
            report_negatives=data_config.get("report_negatives", 0) if train else 0,
            no_finding=no_finding,
        )
    )


class BatchIterator(Iterator[dict]):
    """Iterates global batches; counts what was skipped; state is checkpointable.

    With a ``sharding`` (a ``NamedSharding`` whose first axis shards the batch), every array is
    assembled with ``jax.make_array_from_process_local_data`` into one global ``jax.Array``;
    without one, numpy batches come back.
    """

    def __init__(self, dataset: grain.IterDataset, sharding=None):
        self._iterator = iter(dataset)
        self._sharding = sharding
        self.totals = {key: 0 for key in _STATS}

    def __next__(self) -> dict:
        batch = next(self._iterator)
        for key in [k for k in batch if k.startswith("source/")]:
            self.totals[key] = self.totals.get(key, 0) + int(batch.pop(key))
        for key in _STATS:
            count = int(batch.pop(key))
            self.totals[key] += count
            if key == "skipped" and count:
                _log.warning(
                    "skipped %d bad record(s) in this batch (%d so far)", count, self.totals[key]
                )
            if key == "truncated_texts" and count and self.totals[key] == count:
                # Once: a long run logs the running count as data/truncated_texts.
                _log.warning(
                    "%d text(s) in this batch were longer than config.data.text_len (reports) "
                    "or caption_len (captions, negatives) and were cut; data/truncated_texts "
                    "counts them",
                    count,
                )
        if self._sharding is None:
            return batch
        import jax

        return {
            key: jax.make_array_from_process_local_data(self._sharding, value)
            for key, value in batch.items()
        }

    def get_state(self) -> dict[str, Any]:
        """The grain iterator state plus the running counts (JSON-serialisable)."""
        return {"grain": self._iterator.get_state(), "totals": dict(self.totals)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state from :meth:`get_state`: the next batch is the one that followed."""
        self._iterator.set_state(state["grain"])
        totals = state["totals"]
        self.totals = {key: int(totals.get(key, 0)) for key in _STATS}
        self.totals.update({k: int(v) for k, v in totals.items() if k.startswith("source/")})
