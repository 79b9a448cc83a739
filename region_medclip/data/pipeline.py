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

from region_medclip.data import registry, transforms
from region_medclip.data.schema import random_batch  # noqa: F401  (its home before; callers use it)
from region_medclip.data.tokenizers import TextTokenizer
from region_medclip.data.tokenizers import from_config as tokenizer_from_config

_log = logging.getLogger("region_medclip.data")
_STATS = ("skipped", "truncated_rois", "truncated_texts")


def source(name: str, split: str, data_config) -> Any:
    """Random-access source of schema records for ``name`` / ``split`` (its registry entry's:
    ``synth_cxr`` is built on first use at ``data.image_size``; other names must have been
    prepared with their builder into ``data.data_dir``)."""
    return registry.get(name).data_source(split, data_config)


class _CountingBatch(grain.IterDataset):
    """Batches examples, dropping those marked ``_skip`` and counting them in the batch; a
    finite pass ends with a partial batch rather than losing its last examples."""

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> grain.DatasetIterator:
        return _CountingBatchIterator(self._parent.__iter__(), self._batch_size)


class _CountingBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

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
    if records is None:
        records = source(data_config.train if train else data_config.eval, split, data_config)
    tokenizer = tokenizer or tokenizer_from_config(data_config)
    ds = grain.MapDataset.source(records)[process_index::process_count].seed(seed)
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
    ds = ds.map(
        transforms.Finalize(
            tokenizer=tokenizer,
            max_rois=data_config.max_rois,
            text_len=data_config.text_len,
            num_negatives=data_config.num_negatives,
            seed=seed,
            caption_len=data_config.get("caption_len", 0),
            # Hard-negative reports serve the training loss only.
            report_negatives=data_config.get("report_negatives", 0) if train else 0,
        )
    )
    ds = _CountingBatch(ds.to_iter_dataset(), batch_size)
    if data_config.workers > 0:
        from absl import flags

        # grain's workers read absl flags; a caller outside `app.run` has not parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.workers))
    return ds


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
        self.totals = {key: int(state["totals"].get(key, 0)) for key in _STATS}
