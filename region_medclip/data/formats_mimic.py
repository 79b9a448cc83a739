"""MIMIC-CXR-JPG (+ MIMIC-CXR reports) and MS-CXR readers.

MIMIC-CXR-JPG 2.x, as distributed by PhysioNet (``root`` = the ``mimic-cxr-jpg/2.x.0`` folder)::

  files/p10/p10000032/s50414267/<dicom_id>.jpg
  mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train/validate/test)
  mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, 14 CheXpert labels (1.0/0.0/-1.0/blank)
  mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ViewPosition, ...

(``.csv`` works as well as ``.csv.gz``). Reports come from MIMIC-CXR (``mimic-cxr-reports.zip``)
as ``files/p10/p10000032/s50414267.txt``; by default they are looked up under ``root`` (unzip them
there) or under ``reports_dir``. The report keeps the FINDINGS and IMPRESSION sections.

MS-CXR (``MS_CXR_Local_Alignment_v1.1.0.csv``): several rows per image, one box each, with
``path`` relative to the MIMIC-CXR-JPG root (``mimic_root``, default ``root``).
"""

import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from region_medclip.data import formats_io, schema

CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
MS_CXR_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)
MS_CXR_CSVS = ("MS_CXR_Local_Alignment_v1.1.0.csv", "MS_CXR_Local_Alignment_v1.0.0.csv")
_MIMIC_PREFIX = "mimic-cxr-2.0.0-"
# A report section header: an upper-case phrase at the start of a line, then a colon.
_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z &/,()-]*[A-Z)]):", re.MULTILINE)
_KEEP_SECTIONS = ("FINDINGS", "IMPRESSION")


def _mimic_csv(root: epath.Path, name: str, source: str) -> epath.Path:
    names = [f"{_MIMIC_PREFIX}{name}.csv.gz", f"{_MIMIC_PREFIX}{name}.csv"]
    return formats_io.find_file(root, names, source)


def report_sections(text: str, keep: Sequence[str] = _KEEP_SECTIONS) -> str:
    """The kept sections of a free-text report, whitespace-normalised, in report order.

    "FINDINGS:\\n  No effusion.\\n IMPRESSION: Normal." → "FINDINGS: No effusion.\\nIMPRESSION:
    Normal."; a combined "FINDINGS AND IMPRESSION:" header counts as kept. '' when none is found.
    """
    headers = list(_SECTION.finditer(text))
    parts = []
    for index, header in enumerate(headers):
        name = header.group(1).strip()
        if not any(word in name for word in keep):
            continue
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        body = " ".join(text[header.end() : end].split())
        if body:
            parts.append(f"{name}: {body}")
    return "\n".join(parts)


def study_dir(subject_id: str, study_id: str) -> str:
    """``files/p10/p10000032/s50414267`` for subject 10000032, study 50414267."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}"


def _read_labels(path: epath.Path, source: str) -> dict[str, np.ndarray]:
    """``{study_id: raw [14] labels}`` (NaN where blank) from the chexpert CSV."""
    labels = {}
    for row in formats_io.read_csv(path, ("study_id", *CHEXPERT_LABELS), source):
        try:
            values = [formats_io.parse_float(row[name]) for name in CHEXPERT_LABELS]
        except ValueError:
            # One bad cell makes the study's labels unknown (zeros), not the images unreadable.
            values = [np.nan] * len(CHEXPERT_LABELS)
        labels[row["study_id"]] = np.asarray(values, np.float32)
    return labels


def _read_views(path: epath.Path, source: str) -> dict[str, str]:
    rows = formats_io.read_csv(path, ("dicom_id", "ViewPosition"), source)
    return {row["dicom_id"]: row["ViewPosition"] for row in rows}


@formats_io.reader("mimic_cxr")
def read_mimic_cxr(
    root: epath.Path,
    ctx: formats_io.ReadContext,
    *,
    reports_dir: Any = None,
    views: Sequence[str] | None = None,
) -> Iterator[schema.Record]:
    """MIMIC-CXR-JPG records, one per image (``labels``: ``[14]`` in ``CHEXPERT_LABELS`` order).

    Args:
      root: the MIMIC-CXR-JPG folder (``files/`` and the ``mimic-cxr-2.0.0-*.csv(.gz)``).
      ctx: the reader's context (given by :func:`formats_io.reader`).
      reports_dir: folder holding the reports' ``files/`` tree; default ``root``.
      views: keep only these ``ViewPosition`` values (e.g. ``("PA", "AP")``); needs metadata.
    """
    source = ctx.source
    split_rows = formats_io.read_csv(
        _mimic_csv(root, "split", source), ("dicom_id", "study_id", "subject_id", "split"), source
    )
    labels = _read_labels(_mimic_csv(root, "chexpert", source), source)
    view_of = _read_views(_mimic_csv(root, "metadata", source), source) if views else None
    reports = epath.Path(reports_dir) if reports_dir is not None else root
    if not (reports / "files").exists():
        raise schema.DataError(f"{source}: no reports folder {reports / 'files'}")
    return _mimic_records(root, ctx, split_rows, labels, view_of, views, reports)


def _mimic_records(root, ctx, split_rows, labels, view_of, views, reports):
    cached_study, cached_report = None, ""
    missing = np.full((len(CHEXPERT_LABELS),), np.nan, np.float32)
    for row in split_rows:
        record_id = row["dicom_id"]
        with ctx.row(record_id):
            split = formats_io.split_name(row["split"])
            if split is None:
                ctx.skip(record_id, f"bad split: {row['split']!r}")
                continue
            if not ctx.wanted(split) or (view_of and view_of.get(record_id) not in views):
                continue
            folder = study_dir(row["subject_id"], row["study_id"])
            if folder != cached_study:  # a study's images share one report: read it once
                cached_study, cached_report = folder, _read_report(reports / f"{folder}.txt")
            if cached_report is None:
                ctx.skip(record_id, f"missing report: {reports / folder}.txt")
                continue
            if not cached_report:
                ctx.skip(record_id, f"empty report: no FINDINGS/IMPRESSION in {folder}.txt")
                continue
            loaded = ctx.load_image(root / folder / f"{record_id}.jpg", record_id)
            if loaded is None:
                continue
            image, size = loaded
            yield ctx.record(
                image=image,
                size=size,
                report=cached_report,
                labels=labels.get(row["study_id"], missing),
                id=record_id,
                patient_id=row["subject_id"],
                split=split,
            )


def _read_report(path: epath.Path) -> str | None:
    """The kept sections of one report file; None when the file is missing."""
    try:
        return report_sections(path.read_bytes().decode("utf-8", errors="replace"))
    except FileNotFoundError:
        return None


@formats_io.reader("ms_cxr")
def read_ms_cxr(
    root: epath.Path, ctx: formats_io.ReadContext, *, mimic_root: Any = None
) -> Iterator[schema.Record]:
    """MS-CXR records, one per image with all its boxes (``labels``: ``[8]`` multi-hot of the
    ``MS_CXR_LABELS`` boxed on the image).

    Boxes are the CSV's ``x, y, w, h`` → ``xyxy``, rescaled when the stored JPEG is smaller than
    ``image_width × image_height`` (a resized MIMIC-CXR-JPG copy). Each box's caption is its
    ``label_text``; the report is the image's label texts joined (MS-CXR ships no report).

    Args:
      root: the folder with ``MS_CXR_Local_Alignment_v1.1.0.csv`` (or v1.0.0).
      ctx: the reader's context (given by :func:`formats_io.reader`).
      mimic_root: the MIMIC-CXR-JPG folder the ``path`` column is relative to; default ``root``.
    """
    source = ctx.source
    columns = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h")
    path = formats_io.find_file(root, MS_CXR_CSVS, source)
    columns += ("image_width", "image_height")
    images: dict[str, list[dict[str, str]]] = {}
    for row in formats_io.read_csv(path, columns, source):
        images.setdefault(row["dicom_id"], []).append(row)
    image_root = epath.Path(mimic_root) if mimic_root is not None else root
    return _ms_cxr_records(image_root, ctx, images)


def _ms_cxr_records(image_root, ctx, images):
    for record_id, rows in images.items():
        with ctx.row(record_id):
            first = rows[0]
            # v1.0.0 has no split column: fall back to a patient-level split.
            patient = re.search(r"/p(\d+)/s\d+", first["path"])
            patient_id = patient.group(1) if patient else record_id
            split = (
                formats_io.split_name(first["split"])
                if first.get("split")
                else schema.patient_split(patient_id)
            )
            if split is None:
                ctx.skip(record_id, f"bad split: {first['split']!r}")
                continue
            if not ctx.wanted(split):
                continue
            loaded = ctx.load_image(image_root / first["path"], record_id)
            if loaded is None:
                continue
            image, size = loaded
            yield ctx.record(
                image=image,
                size=size,
                id=record_id,
                patient_id=patient_id,
                split=split,
                **_ms_cxr_boxes(rows, size),
            )


def _ms_cxr_boxes(rows: list[dict[str, str]], size: tuple[int, int]) -> dict[str, Any]:
    """Boxes ``[R, 4]`` xyxy in the stored image's pixels, captions, labels, report."""
    boxes, captions, box_labels, labels = [], [], [], np.zeros(len(MS_CXR_LABELS), np.float32)
    for row in rows:
        x, y, w, h = (formats_io.parse_float(row[key]) for key in ("x", "y", "w", "h"))
        scale_x = size[1] / float(row["image_width"] or size[1])
        scale_y = size[0] / float(row["image_height"] or size[0])
        boxes.append([x * scale_x, y * scale_y, (x + w) * scale_x, (y + h) * scale_y])
        category = row["category_name"]
        captions.append(row["label_text"] or category.lower())
        index = MS_CXR_LABELS.index(category) if category in MS_CXR_LABELS else -1
        box_labels.append(index)
        if index >= 0:
            labels[index] = 1.0
    phrases = list(dict.fromkeys(caption.rstrip(". ") for caption in captions))
    return dict(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        box_captions=captions,
        box_labels=np.asarray(box_labels, np.int32),
        labels=labels,
        report=". ".join(phrases) + "." if phrases else "",
    )
