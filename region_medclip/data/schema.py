"""The one record schema every source yields, and the checks that keep bad records out.

A record (one example) is a dict:

=============== ====================================================================
``image``       uint8 ``[H, W]`` or ``[H, W, 3]``, or the encoded PNG/JPEG bytes
``report``      str
``labels``      float32 ``[C]``: 1 positive, 0 negative, −1 uncertain (NaN/missing → 0)
``boxes``       float32 ``[R, 4]`` pixel ``xyxy`` in the stored image
``box_captions`` list of R str
``box_labels``  int32 ``[R]`` (index into the source's label names; −1 when unknown)
``id``          str, unique within the source
``patient_id``  str (splits are by patient)
``split``       str: ``train`` | ``validation`` | ``test``
=============== ====================================================================

Problems that a long run should survive are repaired or counted, never silently dropped:
boxes are clipped to the image, degenerate boxes removed (with their captions), NaN labels set to
0; :class:`SkipCounter` counts records skipped and warns with the record's id.
"""

import collections
import hashlib
import logging
from typing import Any

import numpy as np

Record = dict[str, Any]

SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """A source cannot be read at all (missing file, missing column): names the file and column."""


class SkipCounter:
    """Counts skipped records by reason, warning once per record with its id.

    A record skipped again for the same reason (a builder reads the source once per split, and
    a row that fails before its split is known fails in every pass) is counted once.
    ``examples[reason]`` keeps the first :data:`EXAMPLES` record ids of each reason for the
    closing summary. ``strict=True`` raises instead of skipping (the config switch
    ``data.strict``).
    """

    EXAMPLES = 5

    def __init__(self, source: str, strict: bool = False, log: logging.Logger | None = None):
        self.source = source
        self.strict = strict
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self._seen: set[tuple[str, str]] = set()
        self._log = log or logging.getLogger("region_medclip.data")

    def skip(self, record_id: str, reason: str) -> None:
        """Records one skipped record (or raises :class:`DataError` when strict)."""
        message = f"{self.source}: skipping record {record_id!r}: {reason}"
        if self.strict:
            raise DataError(message)
        if self._first(record_id, reason):
            self._log.warning(message)

    def _first(self, record_id: str, reason: str, counts=None) -> bool:
        """Counts ``record_id`` under ``reason``'s key unless already counted; True if new."""
        key = reason.split(":")[0]
        if (record_id, reason) in self._seen:
            return False
        self._seen.add((record_id, reason))
        (self.counts if counts is None else counts)[key] += 1
        ids = self.examples.setdefault(key, [])
        if len(ids) < self.EXAMPLES:
            ids.append(record_id)
        return True

    @property
    def total(self) -> int:
        """Number of skipped records so far."""
        return sum(self.counts.values())


def image_hw(image: Any) -> tuple[int, int] | None:
    """``(H, W)`` of a decoded image array, or None for encoded bytes."""
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return int(image.shape[0]), int(image.shape[1])
    return None


def clean_boxes(
    boxes: Any,
    captions: list[str],
    box_labels: Any,
    *,
    height: float | None,
    width: float | None,
    min_size: float = 1.0,
) -> tuple[np.ndarray, list[str], np.ndarray, int]:
    """Clips boxes to the image and drops degenerate ones with their captions and labels.

    Args:
      boxes: ``[R, 4]`` pixel ``xyxy`` (anything array-like; NaN coordinates count as degenerate).
      captions: R captions.
      box_labels: ``[R]`` ints.
      height, width: image size; None skips clipping (size unknown before decoding).
      min_size: a box narrower or shorter than this many pixels after clipping is dropped.

    Returns:
      ``boxes [R', 4]`` float32, ``captions`` (R'), ``box_labels [R']`` int32, and how many
      boxes were dropped.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    box_labels = np.asarray(box_labels, np.int32).reshape(-1)
    if len(captions) != len(boxes) or len(box_labels) != len(boxes):
        raise DataError(
            f"{len(boxes)} boxes but {len(captions)} captions and {len(box_labels)} labels"
        )
    if height is not None and width is not None:
        boxes = np.clip(boxes, 0.0, [width, height, width, height]).astype(np.float32)
    finite = np.isfinite(boxes).all(axis=1)
    safe = np.where(finite[:, None], boxes, 0.0)
    keep = finite & (safe[:, 2] - safe[:, 0] >= min_size) & (safe[:, 3] - safe[:, 1] >= min_size)
    kept_captions = [c for c, k in zip(captions, keep, strict=True) if k]
    return boxes[keep], kept_captions, box_labels[keep], int((~keep).sum())


def clean_labels(labels: Any) -> np.ndarray:
    """``[C]`` labels as float32 with NaN (blank) mapped to 0."""
    labels = np.asarray(labels, np.float32).reshape(-1)
    return np.where(np.isnan(labels), 0.0, labels).astype(np.float32)


def make_record(
    *,
    image: Any,
    report: str,
    labels: Any,
    id: str,  # noqa: A002 - the schema's field name
    patient_id: str,
    split: str,
    boxes: Any = None,
    box_captions: list[str] | None = None,
    box_labels: Any = None,
) -> Record:
    """Builds a schema record, cleaning boxes (clipped when the image size is known) and labels.

    Raises:
      DataError: unknown split, or boxes / captions / labels of different lengths.
    """
    if split not in SPLITS:
        raise DataError(f"record {id!r}: split {split!r} is not one of {SPLITS}")
    box_captions = list(box_captions or [])
    if boxes is None:
        boxes = np.zeros((0, 4), np.float32)
    if box_labels is None:
        box_labels = np.full((len(box_captions),), -1, np.int32)
    size = image_hw(image)
    try:
        boxes, box_captions, box_labels, _ = clean_boxes(
            boxes,
            box_captions,
            box_labels,
            height=size[0] if size else None,
            width=size[1] if size else None,
        )
    except DataError as err:
        raise DataError(f"record {id!r}: {err}") from err
    return dict(
        image=image,
        report=str(report or ""),
        labels=clean_labels(labels),
        boxes=boxes,
        box_captions=box_captions,
        box_labels=box_labels,
        id=str(id),
        patient_id=str(patient_id),
        split=split,
    )


def patient_split(patient_id: str, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """Deterministic patient-level split for sources without an official one.

    A stable hash of the patient id (not Python's salted ``hash``) puts every image of a patient
    in the same split: ``fractions`` are the train and validation shares; the rest is test.
    """
    digest = hashlib.sha256(str(patient_id).encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def random_batch(data_config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch with the keys, shapes and dtypes the pipeline yields for ``config.data``, filled
    with random values (benchmarks and compile checks; ~70% of ROIs valid)."""
    d = data_config
    b, r, k = batch_size, d.max_rois, d.num_negatives
    lc = d.get("caption_len", 0) or d.text_len
    rng = np.random.default_rng(seed)
    roi_mask = rng.random((b, r)) < 0.7
    x0, y0 = rng.uniform(0, 0.5, (b, r)), rng.uniform(0, 0.5, (b, r))
    return dict(
        images=rng.normal(size=(b, d.image_size, d.image_size, 3)).astype(np.float32),
        texts=rng.integers(1, 500, (b, d.text_len)).astype(np.int32),
        boxes=np.stack([x0, y0, x0 + 0.4, y0 + 0.4], -1).astype(np.float32),
        roi_mask=roi_mask,
        captions=rng.integers(1, 500, (b, r, lc)).astype(np.int32),
        cap_ids=np.where(roi_mask, rng.integers(0, 6, (b, r)), -1).astype(np.int32),
        negatives=rng.integers(1, 500, (b, r, k, lc)).astype(np.int32),
        neg_mask=np.repeat(roi_mask[..., None], k, -1),
        labels=(rng.random((b, 8)) < 0.3).astype(np.float32),
        box_labels=np.zeros((b, r), np.int32),
        box_finding=roi_mask & (rng.random((b, r)) < 0.5),
        **_random_report_negatives(rng, b, d.get("report_negatives", 0), d.text_len),
    )


def _random_report_negatives(rng, b: int, k: int, length: int) -> dict[str, np.ndarray]:
    """``report_negatives [b, k, length]`` and ``report_neg_mask [b, k]`` when ``k > 0``."""
    if k <= 0:
        return {}
    return dict(
        report_negatives=rng.integers(1, 500, (b, k, length)).astype(np.int32),
        report_neg_mask=rng.random((b, k)) < 0.8,
    )
