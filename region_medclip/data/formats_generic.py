"""Image–caption sources: ROCO, and a generic CSV / JSONL for the user's own data.

ROCO (``root`` = the ROCO ``data`` folder; radiology subset)::

  train/radiology/radiologytraindata.csv        id, name, caption
  validation/radiology/radiologyvaldata.csv
  test/radiology/radiologytestdata.csv
  <split>/radiology/images/<name>

Generic (``root`` = a ``.csv`` / ``.jsonl`` file, or a folder holding exactly one, or
``data.csv`` / ``data.jsonl``), one row per image::

  image, caption[, boxes, box_captions, box_labels, labels, id, patient_id, split]

``image`` is relative to the file's folder; ``boxes`` is a JSON list of ``[x1, y1, x2, y2]`` in
pixels; ``box_captions`` / ``box_labels`` / ``labels`` JSON lists (in JSONL, plain lists);
``id`` defaults to ``image`` (rows of one image are all kept, as ``image#2``, ...; a repeated
explicit ``id`` is skipped as a duplicate), ``patient_id`` to ``id``, ``split`` to a
patient-level split.
"""

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from region_medclip.data import formats_io, schema

_ROCO_SPLITS = (("train", "train"), ("validation", "val"), ("test", "test"))
GENERIC_REQUIRED = ("image", "caption")


@formats_io.reader("roco")
def read_roco(root: epath.Path, ctx: formats_io.ReadContext) -> Iterator[schema.Record]:
    """ROCO radiology records (``report`` = the figure caption, ``labels``: ``[0]``, no boxes).

    ``patient_id`` is the PubMed Central article (``PMC4083729`` of
    ``PMC4083729_AMJCaseRep-15-301-g001.jpg``), so figures of one article share a split.

    Args:
      root: the ROCO ``data`` folder (``train/``, ``validation/``, ``test/``).
      ctx: the reader's context (given by :func:`formats_io.reader`).
    """
    tables = []
    for split, short in _ROCO_SPLITS:
        folder = root / split / "radiology"
        path = folder / f"radiology{short}data.csv"
        if ctx.wanted(split):
            rows = formats_io.read_csv(path, ("id", "name", "caption"), ctx.source)
            tables.append((split, folder / "images", rows))
        else:
            formats_io.check_columns(path, ("id", "name", "caption"), ctx.source)
    return _roco_records(ctx, tables)


def _roco_records(ctx, tables):
    for split, images, rows in tables:
        for row in rows:
            record_id = row["id"] or row["name"]
            with ctx.row(record_id):
                caption = " ".join(row["caption"].split())
                if not caption:
                    ctx.skip(record_id, "empty report: blank caption")
                    continue
                loaded = ctx.load_image(images / row["name"], record_id)
                if loaded is None:
                    continue
                image, size = loaded
                yield ctx.record(
                    image=image,
                    size=size,
                    report=caption,
                    labels=np.zeros((0,), np.float32),
                    id=record_id,
                    patient_id=row["name"].split("_")[0],
                    split=split,
                )


def _data_file(root: epath.Path, source: str) -> epath.Path:
    """The CSV / JSONL file ``root`` names: itself, ``data.csv|jsonl``, or its only such file."""
    if not root.is_dir():
        return root
    for name in ("data.jsonl", "data.csv"):
        if (root / name).exists():
            return root / name
    found = sorted(p for p in root.iterdir() if p.suffix.lower() in (".csv", ".jsonl"))
    if len(found) != 1:
        raise schema.DataError(
            f"{source}: expected one .csv or .jsonl file in {root}, found {[p.name for p in found]}"
        )
    return found[0]


def _generic_rows(path: epath.Path, source: str) -> Iterator[tuple[int, dict | Exception]]:
    if path.suffix.lower() == ".jsonl":
        rows = formats_io.read_jsonl(path, source)
        first = next(
            (row for _, row in formats_io.read_jsonl(path, source) if isinstance(row, dict)), None
        )
        if first is None:
            raise schema.DataError(f"{source}: file {path} has no JSON object rows")
        missing = [name for name in GENERIC_REQUIRED if name not in first]
        if missing:
            raise schema.DataError(f"{source}: file {path} is missing column {missing[0]!r}")
        return rows
    return enumerate(formats_io.read_csv(path, GENERIC_REQUIRED, source), start=2)


def _json_list(value: Any) -> list | None:
    """A list cell: JSON text (CSV) or a list (JSONL); None when blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = json.loads(value) if isinstance(value, str) else value
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON list, got {type(value).__name__}")
    return value


@formats_io.reader("csv")
def read_generic(
    root: epath.Path, ctx: formats_io.ReadContext, *, num_labels: int | None = None
) -> Iterator[schema.Record]:
    """Records of a user's CSV / JSONL file (see the module docstring for the columns).

    Args:
      root: the file, or a folder holding it.
      ctx: the reader's context (given by :func:`formats_io.reader`).
      num_labels: C; rows whose ``labels`` have another length are skipped, rows without labels
        get C zeros. None takes C from the first row with labels (0 when there are none).
    """
    path = _data_file(root, ctx.source)
    return _generic_records(ctx, path, _generic_rows(path, ctx.source), num_labels)


def _generic_records(ctx, path, rows, num_labels):
    seen: dict[str, int] = {}  # id → rows seen with it (before the split filter: same ids in
    # every pass)
    for number, row in rows:
        record_id = f"{path.name}:{number}"
        if isinstance(row, Exception):
            ctx.skip(record_id, f"bad row: {row}")
            continue
        record_id, duplicate = _row_id(row, record_id, seen)
        if duplicate:
            ctx.skip(f"{path.name}:{number}", f"duplicate id: {record_id!r} is on an earlier row")
            continue
        with ctx.row(record_id):
            for name in GENERIC_REQUIRED:
                if name not in row:  # JSONL rows may lack a key the first row had
                    raise ValueError(f"missing column {name!r}")
            labels = _json_list(row.get("labels"))
            if labels is not None and num_labels is None:
                num_labels = len(labels)
            labels = labels if labels is not None else [0.0] * (num_labels or 0)
            if len(labels) != (num_labels or 0):
                ctx.skip(record_id, f"bad label: {len(labels)} labels, expected {num_labels}")
                continue
            record = _generic_record(ctx, path, row, record_id, labels)
            if record is not None:
                yield record


def _row_id(row: dict, fallback: str, seen: dict[str, int]) -> tuple[str, bool]:
    """``(id, is_duplicate)`` of a row. Without an ``id`` column a row is named by its image;
    several rows of one image (one film, several reports) are all kept, the second as
    ``image#2`` and so on (same patient, so same split). A repeated explicit ``id`` is a
    duplicate."""
    explicit = str(row.get("id") or "")
    base = explicit or str(row.get("image") or fallback)
    count = seen.get(base, 0) + 1
    seen[base] = count
    if count == 1:
        return base, False
    if explicit:
        return base, True
    if not row.get("patient_id"):
        row["patient_id"] = base
    return f"{base}#{count}", False


def _generic_record(ctx, path, row, record_id, labels) -> schema.Record | None:
    caption = " ".join(str(row["caption"] or "").split())
    if not caption:
        ctx.skip(record_id, "empty report: blank caption")
        return None
    patient_id = str(row.get("patient_id") or record_id)
    split_value = row.get("split")
    split = formats_io.split_name(split_value) if split_value else schema.patient_split(patient_id)
    if split is None:
        ctx.skip(record_id, f"bad split: {split_value!r}")
        return None
    if not ctx.wanted(split):
        return None
    boxes = _json_list(row.get("boxes")) or []
    captions = [str(c) for c in _json_list(row.get("box_captions")) or []]
    box_labels = _json_list(row.get("box_labels"))
    if len(captions) != len(boxes):
        ctx.skip(record_id, f"bad boxes: {len(boxes)} boxes but {len(captions)} box_captions")
        return None
    loaded = ctx.load_image(path.parent / str(row["image"]), record_id)
    if loaded is None:
        return None
    image, size = loaded
    return ctx.record(
        image=image,
        size=size,
        report=caption,
        labels=[np.nan if value is None else float(value) for value in labels],
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        box_captions=captions,
        box_labels=None if box_labels is None else np.asarray(box_labels, np.int32),
        id=record_id,
        patient_id=patient_id,
        split=split,
    )
