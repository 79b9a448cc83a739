"""NIH ChestX-ray14 reader.

As distributed (``root`` = the NIH folder)::

  Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv)
      Image Index, Finding Labels ("Effusion|Mass" or "No Finding"), Follow-up #, Patient ID, ...
  BBox_List_2017.csv
      Image Index, Finding Label, Bbox [x, y, w, h]   (those literal column names; optional)
  train_val_list.txt, test_list.txt                   (one image name a line)
  images_001/images/00000001_000.png ... images_012/images/...   (or one images/ folder)

The official test list is the test split; train_val images are split by patient into train and
``validation_fraction`` validation. Without the list files every image is split by patient
(:func:`schema.patient_split`). There are no reports: ``report`` is synthesised from the labels
("Findings: effusion, mass." / "No acute findings.").
"""

from collections.abc import Iterator

import numpy as np
from etils import epath

from region_medclip.data import formats_io, schema

CHESTXRAY14_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
# The box list spells one finding differently from the data entry table.
_BOX_ALIASES = {"Infiltrate": "Infiltration"}
_ENTRY_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
_BOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")


def _read_list(path: epath.Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _image_index(root: epath.Path, source: str) -> dict[str, epath.Path]:
    """``{image name: path}`` over ``images*/images/*.png`` (the release's 12 archives) and
    ``images*/*.png`` (a flat copy)."""
    folders = sorted(root.glob("images*"))
    if not folders:
        raise schema.DataError(f"{source}: no images*/ folder in {root}")
    index = {}
    for folder in folders:
        for pattern in ("*.png", "images/*.png"):
            for path in folder.glob(pattern):
                index[path.name] = path
    return index


def _read_boxes(path: epath.Path, source: str) -> dict[str, list[tuple[list[float], str]]]:
    """``{image name: [(xyxy box, finding name), ...]}`` from ``BBox_List_2017.csv``."""
    boxes: dict[str, list[tuple[list[float], str]]] = {}
    if not path.exists():
        return boxes
    for row in formats_io.read_csv(path, _BOX_COLUMNS, source):
        try:
            x, y, w, h = (formats_io.parse_float(row[k]) for k in _BOX_COLUMNS[2:])
        except ValueError:
            x = y = w = h = float("nan")  # dropped later as degenerate, and counted there
        name = row["Finding Label"]
        boxes.setdefault(row["Image Index"], []).append(
            ([x, y, x + w, y + h], _BOX_ALIASES.get(name, name))
        )
    return boxes


@formats_io.reader("chestxray14")
def read_chestxray14(
    root: epath.Path, ctx: formats_io.ReadContext, *, validation_fraction: float = 0.1
) -> Iterator[schema.Record]:
    """ChestX-ray14 records, one per image (``labels``: ``[14]`` multi-hot,
    ``CHESTXRAY14_LABELS``); the ~1k images of the box list get their boxes, captioned with the
    finding in words ("pleural thickening").

    Args:
      root: the folder with ``Data_Entry_2017*.csv`` and the ``images*/`` folders.
      ctx: the reader's context (given by :func:`formats_io.reader`).
      validation_fraction: share of train_val patients held out as validation.
    """
    source = ctx.source
    entry = formats_io.find_file(root, _ENTRY_CSVS, source)
    rows = formats_io.read_csv(entry, ("Image Index", "Finding Labels", "Patient ID"), source)
    boxes = _read_boxes(root / "BBox_List_2017.csv", source)
    lists = [root / "train_val_list.txt", root / "test_list.txt"]
    test = _read_list(lists[1]) if all(path.exists() for path in lists) else None
    paths = _image_index(root, source)
    return _records(ctx, root, rows, boxes, paths, test, validation_fraction)


def _split(image: str, patient_id: str, test: set[str] | None, validation_fraction: float) -> str:
    if test is None:
        return schema.patient_split(patient_id)
    if image in test:
        return "test"
    return schema.patient_split(patient_id, (1.0 - validation_fraction, validation_fraction))


def _records(ctx, root, rows, boxes, paths, test, validation_fraction):
    for row in rows:
        record_id = row["Image Index"]
        with ctx.row(record_id):
            patient_id = row["Patient ID"]
            split = _split(record_id, patient_id, test, validation_fraction)
            if not ctx.wanted(split):
                continue
            findings = {name.strip() for name in row["Finding Labels"].split("|")}
            unknown = findings - set(CHESTXRAY14_LABELS) - {"No Finding", ""}
            if unknown:
                ctx.skip(record_id, f"bad label: unknown finding {sorted(unknown)}")
                continue
            labels = np.asarray([name in findings for name in CHESTXRAY14_LABELS], np.float32)
            image_boxes = boxes.get(record_id, [])
            # An image in no images*/ folder: the missing-image skip names where it was expected.
            path = paths.get(record_id, root / "images" / record_id)
            loaded = ctx.load_image(path, record_id)
            if loaded is None:
                continue
            image, size = loaded
            names = [name for _, name in image_boxes]
            yield ctx.record(
                image=image,
                size=size,
                report=formats_io.labels_report(CHESTXRAY14_LABELS, labels, negatives=False),
                labels=labels,
                boxes=np.asarray([box for box, _ in image_boxes], np.float32).reshape(-1, 4),
                box_captions=[name.lower().replace("_", " ") for name in names],
                box_labels=np.asarray(
                    [CHESTXRAY14_LABELS.index(n) if n in CHESTXRAY14_LABELS else -1 for n in names],
                    np.int32,
                ),
                id=record_id,
                patient_id=patient_id,
                split=split,
            )
