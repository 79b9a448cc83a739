"""Box-annotated DICOM sources: RSNA Pneumonia and VinDr-CXR.

RSNA Pneumonia Detection Challenge (Kaggle, ``root`` = the competition folder)::

  stage_2_train_labels.csv          patientId, x, y, width, height, Target (one row per box;
                                    Target 0 rows have blank coordinates)
  stage_2_detailed_class_info.csv   patientId, class (optional)
  stage_2_train_images/<patientId>.dcm

VinDr-CXR 1.0 (PhysioNet, ``root`` = the ``vindr-cxr/1.0.0`` folder)::

  annotations/annotations_train.csv  image_id, rad_id, class_name, x_min, y_min, x_max, y_max
  annotations/annotations_test.csv   (class_id too in the Kaggle copy; "No finding" rows have
                                     blank coordinates)
  annotations/image_labels_train.csv image_id, rad_id, one 0/1 column per label (optional)
  train/<image_id>.dicom, test/<image_id>.dicom   (or PNG/JPEG exports with the same stem)

Neither ships reports: ``report`` is synthesised from the labels (:func:`formats_io.labels_report`).
DICOMs are decoded to uint8 ``[H, W]`` (:func:`formats_io.dicom_to_uint8`). PNG/JPEG exports must
keep the DICOM's resolution, since boxes are in its pixels (they are clipped to the image).
"""

import math
from collections.abc import Iterator

import numpy as np
from etils import epath

from region_medclip.data import formats_io, schema

RSNA_LABELS = ("Pneumonia",)
_RSNA_REPORTS = {
    "Lung Opacity": "Findings: lung opacity suggestive of pneumonia.",
    "Normal": "No acute findings. No pneumonia.",
    "No Lung Opacity / Not Normal": "Abnormal study without lung opacity. No pneumonia.",
}

VINDR_LOCAL_LABELS = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung cavity",
    "Lung cyst",
    "Lung Opacity",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Other lesion",
)
VINDR_LABELS = VINDR_LOCAL_LABELS + (
    "COPD",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
    "Other diseases",
    "No finding",
)
_VINDR_SPLITS = (("train", "train"), ("test", "test"))
_VINDR_BOX = ("x_min", "y_min", "x_max", "y_max")
_VINDR_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")


def _group(rows: Iterator[dict[str, str]], key: str) -> dict[str, list[dict[str, str]]]:
    """Rows grouped by ``key`` in first-seen order (several rows per image: one box each)."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


@formats_io.reader("rsna_pneumonia")
def read_rsna_pneumonia(
    root: epath.Path, ctx: formats_io.ReadContext, *, box_caption: str = "pneumonia"
) -> Iterator[schema.Record]:
    """RSNA Pneumonia records, one per image (``labels``: ``[1]`` = Target; split by patient
    with :func:`schema.patient_split`, as the challenge's test labels were never released).

    Args:
      root: the competition folder (``stage_2_train_labels.csv``, ``stage_2_train_images/``).
      ctx: the reader's context (given by :func:`formats_io.reader`).
      box_caption: every box's caption ("pneumonia"; "lung opacity" is what was drawn).
    """
    source = ctx.source
    labels_csv = formats_io.find_file(
        root, ("stage_2_train_labels.csv", "stage_1_train_labels.csv"), source
    )
    columns = ("patientId", "x", "y", "width", "height", "Target")
    patients = _group(formats_io.read_csv(labels_csv, columns, source), "patientId")
    images = root / labels_csv.name.replace("_labels.csv", "_images")
    if not images.exists():
        raise schema.DataError(f"{source}: image folder {images} does not exist")
    classes = {}
    details = root / labels_csv.name.replace("train_labels.csv", "detailed_class_info.csv")
    if details.exists():
        for row in formats_io.read_csv(details, ("patientId", "class"), source):
            classes[row["patientId"]] = row["class"]
    return _rsna_records(ctx, patients, images, classes, box_caption)


def _rsna_records(ctx, patients, images, classes, box_caption):
    for record_id, rows in patients.items():
        with ctx.row(record_id):
            split = schema.patient_split(record_id)
            if not ctx.wanted(split):
                continue
            target = max(formats_io.parse_float(row["Target"]) for row in rows)
            if math.isnan(target):
                ctx.skip(record_id, "bad label: blank Target")
                continue
            # Target-1 rows carry the boxes; a blank coordinate makes that box NaN, and
            # degenerate boxes are dropped by ctx.record.
            boxes = []
            for row in rows:
                if formats_io.parse_float(row["Target"]) == 1.0:
                    x, y, w, h = (
                        formats_io.parse_float(row[k]) for k in ("x", "y", "width", "height")
                    )
                    boxes.append([x, y, x + w, y + h])
            default = "Lung Opacity" if target == 1.0 else "Normal"
            loaded = ctx.load_image(
                formats_io.find_image(images, record_id, (".dcm", ".png", ".jpg")), record_id
            )
            if loaded is None:
                continue
            image, size = loaded
            yield ctx.record(
                image=image,
                size=size,
                report=_RSNA_REPORTS.get(classes.get(record_id, default), _RSNA_REPORTS[default]),
                labels=[target],
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                box_captions=[box_caption] * len(boxes),
                box_labels=np.zeros((len(boxes),), np.int32),
                id=record_id,
                patient_id=record_id,  # RSNA's patientId names one image of one patient
                split=split,
            )


def _norm(name: str) -> str:
    # VinDr's files spell some labels differently ("Other disease(s)", case): compare loosely.
    return name.strip().lower().rstrip("s")


_VINDR_INDEX = {_norm(name): index for index, name in enumerate(VINDR_LABELS)}


def _vindr_image_labels(path: epath.Path, source: str) -> dict[str, np.ndarray]:
    """``{image_id: [28] labels}``, the max over radiologists, from ``image_labels_*.csv``."""
    labels: dict[str, np.ndarray] = {}
    if not path.exists():
        return labels
    header = formats_io.check_columns(path, ("image_id",), source)
    columns = [(name, _VINDR_INDEX[_norm(name)]) for name in header if _norm(name) in _VINDR_INDEX]
    for row in formats_io.read_csv(path, ("image_id",), source):
        values = labels.setdefault(row["image_id"], np.zeros(len(VINDR_LABELS), np.float32))
        for name, index in columns:
            try:
                values[index] = max(values[index], formats_io.parse_float(row[name]))
            except ValueError:
                continue  # an unreadable cell only loses that label (0), not the image
    return labels


@formats_io.reader("vindr_cxr")
def read_vindr_cxr(root: epath.Path, ctx: formats_io.ReadContext) -> Iterator[schema.Record]:
    """VinDr-CXR records, one per image with every radiologist's boxes (``labels``: ``[28]``,
    ``VINDR_LABELS``: 22 local findings then 6 global diagnoses).

    Box captions are the class names (lower-cased unless an abbreviation); ``box_labels`` index
    ``VINDR_LABELS``. The official train / test split; no validation split.

    Args:
      root: the VinDr-CXR folder (``annotations/``, ``train/``, ``test/``).
      ctx: the reader's context (given by :func:`formats_io.reader`).
    """
    required = ("image_id", "class_name", *_VINDR_BOX)
    tables = []
    for folder, split in _VINDR_SPLITS:
        names = (f"annotations/annotations_{folder}.csv", f"{folder}.csv")
        if folder == "test" and not any((root / name).exists() for name in names):
            continue  # the Kaggle copy has no test annotations
        path = formats_io.find_file(root, names, ctx.source)
        if not ctx.wanted(split):
            formats_io.check_columns(path, required, ctx.source)  # fail early all the same
            continue
        images = _group(formats_io.read_csv(path, required, ctx.source), "image_id")
        if not (root / folder).exists():
            raise schema.DataError(f"{ctx.source}: image folder {root / folder} does not exist")
        labels_csv = root / f"annotations/image_labels_{folder}.csv"
        tables.append((root / folder, split, images, _vindr_image_labels(labels_csv, ctx.source)))
    return _vindr_records(ctx, tables)


def _vindr_records(ctx, tables):
    for folder, split, images, image_labels in tables:
        for record_id, rows in images.items():
            with ctx.row(record_id):
                labels = image_labels.get(record_id, np.zeros(len(VINDR_LABELS), np.float32))
                labels = np.nan_to_num(labels).copy()
                boxes, captions, box_labels = [], [], []
                for row in rows:
                    name = row["class_name"]
                    index = _VINDR_INDEX.get(_norm(name), -1)
                    if index >= 0:
                        labels[index] = 1.0
                    if _norm(name) == "no finding":
                        continue
                    boxes.append([formats_io.parse_float(row[k]) for k in _VINDR_BOX])
                    captions.append(name if name.isupper() else name.lower())
                    box_labels.append(index)
                loaded = ctx.load_image(
                    formats_io.find_image(folder, record_id, _VINDR_SUFFIXES), record_id
                )
                if loaded is None:
                    continue
                image, size = loaded
                yield ctx.record(
                    image=image,
                    size=size,
                    report=formats_io.labels_report(
                        VINDR_LABELS, labels, negatives=False, skip=("No finding",)
                    ),
                    labels=labels,
                    boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                    box_captions=captions,
                    box_labels=np.asarray(box_labels, np.int32),
                    id=record_id,
                    patient_id=record_id,  # VinDr is de-identified per image
                    split=split,
                )
