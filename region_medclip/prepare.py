"""Prepares a dataset for training and evaluation: its files as distributed → TFDS array_record
files in ``data_dir``, read by ``data.train=NAME`` / ``data.eval=NAME`` and
``config.evals.<name>.dataset=NAME``.

python -m region_medclip.prepare --dataset=mimic_cxr --manual_dir=/data/mimic-cxr-jpg/2.1.0
python -m region_medclip.prepare --dataset=chexpert_5x200 --manual_dir=/data/CheXpert-v1.0-small
python -m region_medclip.prepare --dataset=csv --name=my_cxr --manual_dir=data.csv \\
    --label_names="no finding,nodule,effusion"

``--dataset`` is a registered dataset (``data/registry.py``) or ``csv`` for the user's own
CSV/JSONL (columns in docs/datasets.md), which is stored under ``--name`` so that several
coexist. A first pass counts the records (reading no image) for the progress bar's ETA; the
build then reads, checks and writes every record. The closing summary gives the records per
split and what was skipped or repaired by reason, with the first few record ids of each;
``--strict`` stops at the first bad record instead. It is also written to
``<data_dir>/<dataset>/<config>/prepare_summary.json``.
"""

import dataclasses
import json
import logging
import os
from typing import Any

from etils import epath

from region_medclip.data import formats, registry, schema

_log = logging.getLogger("region_medclip.prepare")


@dataclasses.dataclass
class Summary:
    """What a build wrote and left out.

    Attributes:
      dataset: the name configs use.
      folder: where the files are.
      splits: ``{split: records written}``.
      skipped, repaired: ``{reason: count}``.
      examples: ``{reason: first record ids}``.
    """

    dataset: str
    folder: str
    splits: dict[str, int]
    skipped: dict[str, int]
    repaired: dict[str, int]
    examples: dict[str, list[str]]

    def text(self) -> str:
        """The closing summary, one line a split and a reason."""
        lines = [f"prepared {self.dataset!r} in {self.folder}"]
        lines += [f"  {split:<11}{count:>9,} records" for split, count in self.splits.items()]
        for title, counts in (("skipped", self.skipped), ("repaired", self.repaired)):
            total = sum(counts.values())
            lines.append(f"  {title}: {total:,} records" + (":" if total else ""))
            for reason, count in sorted(counts.items(), key=lambda item: -item[1]):
                ids = ", ".join(self.examples.get(reason, []))
                lines.append(f"    {reason:<18}{count:>7,}   e.g. {ids}")
        return "\n".join(lines)


def builder_for(
    dataset: str,
    data_dir: str,
    *,
    name: str = "",
    path: str = "",
    label_names: tuple[str, ...] = (),
    num_labels: int = 0,
    strict: bool = False,
    reader_options: dict | None = None,
    progress=None,
):
    """The TFDS builder that prepares ``dataset`` into ``data_dir`` (``csv``: the user's file
    ``path``, as dataset ``name``).

    Raises:
      ValueError: ``--name`` missing for ``csv``, given for another dataset, or taken by a
        registered dataset; an unknown dataset (naming the known ones).
    """
    from region_medclip.data.builders import real

    kwargs: dict[str, Any] = dict(
        data_dir=os.path.expanduser(data_dir),
        file_format="array_record",
        strict=strict,
        reader_options=reader_options,
        progress=progress,
    )
    if dataset == "csv":
        if not name or name == "default":
            raise ValueError("--name: the user's dataset needs a name of its own (not 'default')")
        if name in registry.datasets():
            raise ValueError(f"--name: {name!r} is a registered dataset; choose another name")
        config = real.CsvConfig(
            name=name, path=path, label_names=tuple(label_names), num_labels=num_labels or 0
        )
        return real.Csv(config=config, **kwargs)
    if name or label_names or num_labels:
        raise ValueError(f"--name / --label_names / --num_labels are for csv, not {dataset!r}")
    known = [n for n in registry.datasets() if n != "synth_cxr"]
    if dataset not in known:
        raise ValueError(f"--dataset: {dataset!r} is not one of {sorted(known)}")
    entry = registry.get(dataset)
    if entry.config:
        kwargs["config"] = entry.config
    return entry.builder()(**kwargs)


def count_records(builder, manual_dir: str) -> int:
    """Records a build of ``builder`` will read (images not opened; a bad image makes the build
    write fewer)."""
    from region_medclip.data.builders import real

    root = builder.builder_config.path if isinstance(builder, real.Csv) else ""
    counter = formats.ReadCounter(builder.name, log=logging.getLogger("region_medclip.count"))
    options = dict(getattr(builder, "_reader_options", {}))
    if isinstance(builder, real.Csv):
        options["num_labels"] = builder._num_labels()
    if getattr(builder.builder_config, "subset", "") == "5x200":
        return len(formats.COMPETITION_LABELS) * builder.builder_config.per_class
    logging.getLogger("region_medclip.count").setLevel(logging.ERROR)
    reader = formats.READERS[builder.SOURCE]
    return sum(1 for _ in reader(root or manual_dir, count_only=True, counter=counter, **options))


def prepare(
    dataset: str,
    manual_dir: str,
    data_dir: str = "~/tensorflow_datasets",
    *,
    name: str = "",
    label_names: tuple[str, ...] = (),
    num_labels: int = 0,
    strict: bool = False,
    reader_options: dict | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> Summary:
    """Builds ``dataset`` from ``manual_dir`` (a folder, or the CSV/JSONL file for ``csv``)
    into ``data_dir``; returns (and saves) its :class:`Summary`.

    A dataset already prepared in ``data_dir`` is not read again (TFDS would keep the old
    files): without ``overwrite`` it is an error naming the folder, with it the folder is
    removed and the dataset rebuilt.

    Raises:
      DataError: the source cannot be read at all (naming the file and column), no readable
        record, or (``strict``) the first bad record.
      FileExistsError: the dataset is prepared already and ``overwrite`` is False.
      ValueError: bad arguments (see :func:`builder_for`).
    """
    import tensorflow_datasets as tfds
    import tqdm

    manual = epath.Path(os.path.expanduser(manual_dir))
    if not manual.exists():
        raise schema.DataError(f"--manual_dir: {manual} does not exist")
    bar = None
    if dataset == "csv" and not (label_names or num_labels):
        num_labels = _labels_in(manual)  # a labelled CSV without names: C from its first row
    builder = builder_for(
        dataset,
        data_dir,
        name=name,
        path=str(manual) if dataset == "csv" else "",
        label_names=label_names,
        num_labels=num_labels,
        strict=strict,
        reader_options=reader_options,
        progress=lambda record: bar.update(1) if bar is not None else None,
    )
    if builder.is_prepared():
        if not overwrite:
            raise FileExistsError(
                f"{name or dataset!r} is prepared already in {builder.data_dir}; pass "
                "--overwrite to read it again"
            )
        epath.Path(builder.data_dir).rmtree()
        return prepare(
            dataset,
            manual_dir,
            data_dir,
            name=name,
            label_names=label_names,
            num_labels=num_labels,
            strict=strict,
            reader_options=reader_options,
            show_progress=show_progress,
        )
    total = count_records(builder, str(manual)) if show_progress else None
    bar = tqdm.tqdm(total=total, unit=" records", desc=f"reading {dataset}", disable=not total)
    tfds.disable_progress_bar()  # ours counts records across the splits, with an ETA
    config = tfds.download.DownloadConfig(manual_dir=str(manual))
    try:
        builder.download_and_prepare(download_config=config)
    finally:
        bar.close()
    return _summary(builder, name or dataset)


def _labels_in(path: epath.Path) -> int:
    """C of the first row with labels in the user's CSV/JSONL (0 when no row has any)."""
    reader = formats.READERS["csv"](path, count_only=True, counter=formats.ReadCounter("count"))
    for record in reader:
        if len(record["labels"]):
            return len(record["labels"])
    return 0


def _summary(builder, name: str) -> Summary:
    counter = builder.counter
    metadata = builder.info.metadata
    summary = Summary(
        dataset=name,
        folder=str(builder.data_dir),
        splits={split: info.num_examples for split, info in builder.info.splits.items()},
        skipped=dict(counter.counts if counter else metadata.get("skipped", {})),
        repaired=dict(counter.repairs if counter else metadata.get("repaired", {})),
        examples=dict(counter.examples if counter else metadata.get("examples", {})),
    )
    path = epath.Path(builder.data_dir) / "prepare_summary.json"
    path.write_text(json.dumps(dataclasses.asdict(summary), indent=2))
    return summary


def main(argv) -> None:
    """CLI: prepare ``--dataset`` and print the summary."""
    del argv
    from absl import flags

    args = flags.FLAGS
    summary = prepare(
        args.dataset,
        args.manual_dir,
        args.data_dir,
        name=args.name,
        label_names=tuple(n.strip() for n in args.label_names or () if n.strip()),
        num_labels=args.num_labels,
        strict=args.strict,
        overwrite=args.overwrite,
    )
    print(summary.text())
    use = summary.dataset
    print(f"use it with --config.data.train={use} (or data.eval / config.evals.<name>.dataset)")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("dataset", None, "A registered dataset, or csv for your own CSV/JSONL.")
    flags.DEFINE_string("manual_dir", None, "The dataset's folder (csv: the CSV/JSONL file).")
    flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Where the prepared files go.")
    flags.DEFINE_string("name", "", "csv only: the name configs will use for this dataset.")
    flags.DEFINE_list("label_names", None, "csv only: the names behind the labels column.")
    flags.DEFINE_integer("num_labels", 0, "csv only: C when the labels have no names.")
    flags.DEFINE_bool("strict", False, "Stop at the first bad record instead of skipping it.")
    flags.DEFINE_bool("overwrite", False, "Rebuild a dataset that is prepared already.")


if __name__ == "__main__":
    from absl import app, flags

    _define_flags()
    flags.mark_flags_as_required(["dataset", "manual_dir"])
    app.run(main)
