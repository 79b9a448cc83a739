"""CheXpert reader and the CheXpert 5x200 selection.

CheXpert v1.0 as distributed (``root`` = ``CheXpert-v1.0-small`` or ``CheXpert-v1.0``)::

  train.csv, valid.csv   Path, Sex, Age, Frontal/Lateral, AP/PA, then 14 labels (1.0/0.0/-1.0/blank)
  train/patient00001/study1/view1_frontal.jpg

``Path`` is relative to the root's *parent* (``CheXpert-v1.0-small/train/...``). An optional
``test.csv`` (the later-released test labels, same columns) gives the test split.

CheXpert ships no reports, so ``report`` is synthesised from the labels
(:func:`formats_io.labels_report`): "Findings: cardiomegaly. Possible edema. No pleural
effusion." — positives, uncertain (−1) and explicit negatives (0); blank labels are not mentioned.
Text-side results on these synthetic reports are not comparable with real-report datasets.
"""

import hashlib
import heapq
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from region_medclip.data import formats_io, schema
from region_medclip.data.formats_mimic import CHEXPERT_LABELS

COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
_FILES = (("train.csv", "train"), ("valid.csv", "validation"), ("test.csv", "test"))


def _image_path(root: epath.Path, relative: str) -> epath.Path:
    """``Path`` is relative to the root's parent; a renamed root folder still resolves."""
    first, _, rest = relative.partition("/")
    if first == root.name or not rest:
        return root.parent / relative
    return root / rest


@formats_io.reader("chexpert")
def read_chexpert(
    root: epath.Path, ctx: formats_io.ReadContext, *, frontal_only: bool = False
) -> Iterator[schema.Record]:
    """CheXpert records (``labels``: raw ``[14]`` in ``CHEXPERT_LABELS`` order, blank → 0).

    Args:
      root: the ``CheXpert-v1.0(-small)`` folder holding ``train.csv`` and ``valid.csv``.
      ctx: the reader's context (given by :func:`formats_io.reader`).
      frontal_only: keep only ``Frontal/Lateral == "Frontal"`` images.
    """
    # The later-released test labels have no view column: it is needed only to filter by it.
    required = ("Path", *CHEXPERT_LABELS) + (("Frontal/Lateral",) if frontal_only else ())
    tables = []
    for name, split in _FILES:
        path = root / name
        if name == "test.csv" and not path.exists():
            continue  # the test labels were released later, apart from the dataset
        if ctx.wanted(split):
            tables.append((split, formats_io.read_csv(path, required, ctx.source)))
        elif name != "test.csv":
            formats_io.check_columns(path, required, ctx.source)  # fail early all the same
    return _chexpert_records(root, ctx, tables, frontal_only)


def _chexpert_records(root, ctx, tables, frontal_only):
    for split, rows in tables:
        for row in rows:
            record_id = row["Path"]
            with ctx.row(record_id):
                if frontal_only and row.get("Frontal/Lateral") != "Frontal":
                    continue
                try:
                    raw = [formats_io.parse_float(row[name]) for name in CHEXPERT_LABELS]
                except ValueError as err:
                    ctx.skip(record_id, f"bad label: {err}")
                    continue
                loaded = ctx.load_image(_image_path(root, record_id), record_id)
                if loaded is None:
                    continue
                image, size = loaded
                # "CheXpert-v1.0-small/train/patient00001/study1/..." → "patient00001"
                parts = record_id.split("/")
                patient_id = next((p for p in parts if p.startswith("patient")), record_id)
                yield ctx.record(
                    image=image,
                    size=size,
                    report=formats_io.labels_report(CHEXPERT_LABELS, raw),
                    labels=raw,
                    id=record_id,
                    patient_id=patient_id,
                    split=split,
                )


def _rank(record_id: str, seed: int) -> int:
    # A stable hash (not Python's salted hash) so the subset is the same on every machine.
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "little")


def select_5x200(
    records: Iterable[schema.Record],
    *,
    per_class: int = 200,
    seed: int = 0,
    classes: Sequence[str] = COMPETITION_LABELS,
    split: str = "test",
) -> list[schema.Record]:
    """The CheXpert 5x200 evaluation subset (GLoRIA, MedCLIP): ``per_class`` images for each
    competition class that are positive for it and negative (0, not uncertain or positive) for
    every other observation except "No Finding".

    Pass frontal CheXpert *train* records (``read_chexpert(root, split="train",
    frontal_only=True)``), as the papers sample from the training set. Which images are taken is
    deterministic: the ``per_class`` smallest stable hashes of ``(seed, id)``; memory stays at
    ``len(classes) × per_class`` records however long the input.

    Returns:
      ``len(classes) × per_class`` records (fewer if a class has fewer candidates), class by
      class, each relabelled to ``split``; ``labels`` stay the full ``[14]``.
    """
    columns = {name: CHEXPERT_LABELS.index(name) for name in classes}
    others = [i for i, name in enumerate(CHEXPERT_LABELS) if name != "No Finding"]
    heaps: dict[str, list] = {name: [] for name in classes}
    for record in records:
        labels = np.asarray(record["labels"])
        positive = [name for name, column in columns.items() if labels[column] == 1.0]
        if len(positive) != 1:
            continue
        column = columns[positive[0]]
        if any(labels[i] != 0.0 for i in others if i != column):
            continue
        # A bounded max-heap on the rank (negated) keeps the per_class smallest ranks.
        item = (-_rank(record["id"], seed), record["id"], record)
        heap = heaps[positive[0]]
        if len(heap) < per_class:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    selected = []
    for name in classes:
        for _, _, record in sorted(heaps[name], key=lambda item: (-item[0], item[1])):
            selected.append(dict(record, split=split))
    return selected
