"""What every raw-format reader shares: tables, images, DICOM, and skipping bad rows.

A reader is written as ``open_fn(root, ctx, **options) -> iterator of records``; the :func:`reader`
decorator turns it into the public form ``read(root, *, strict=False, counter=None, **options)``
returning :class:`Records` (an iterator that carries its counter). ``open_fn`` checks the files
and columns eagerly, so a source that cannot be read at all fails at the call with a
:class:`~region_medclip.data.schema.DataError` naming the file and the column, not mid-epoch.

Per-row problems (missing / zero-byte / corrupt / truncated image, empty report, unparseable
value) go through :class:`ReadContext`: the row is skipped, counted by reason and warned about
with its id; with ``strict=True`` the first one raises instead.
"""

import collections
import contextlib
import csv
import functools
import gzip
import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import PIL.Image
from etils import epath

from region_medclip.data import schema

_log = logging.getLogger("region_medclip.data")

# Split names as the datasets spell them → the schema's split names.
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validate": "validation",
    "validation": "validation",
    "test": "test",
}
DICOM_SUFFIXES = (".dcm", ".dicom")


class ReadCounter(schema.SkipCounter):
    """A :class:`~region_medclip.data.schema.SkipCounter` that also counts repairs.

    Repairs (boxes clipped to the image or dropped as degenerate) keep the record, so they are
    counted apart from skips (``repairs``) and never raise, even when strict.
    """

    def __init__(self, source: str, strict: bool = False, log: logging.Logger | None = None):
        super().__init__(source, strict=strict, log=log)
        self.repairs: collections.Counter[str] = collections.Counter()

    def repair(self, record_id: str, reason: str) -> None:
        """Counts one repaired record (once per record and reason) and warns with its id."""
        if self._first(record_id, reason, counts=self.repairs):
            self._log.warning(f"{self.source}: record {record_id!r}: {reason}")


class Records(Iterator[schema.Record]):
    """An iterator of schema records with ``counter``, the counts of what was skipped."""

    def __init__(self, records: Iterator[schema.Record], counter: schema.SkipCounter):
        self._records = records
        self.counter = counter

    def __iter__(self) -> "Records":
        return self

    def __next__(self) -> schema.Record:
        return next(self._records)


class ReadContext:
    """Per-call state of a reader: the counter, the split filter and image checks."""

    def __init__(
        self,
        source: str,
        counter: schema.SkipCounter,
        *,
        split: str | None = None,
        verify_images: bool = True,
        count_only: bool = False,
    ):
        self.source = source
        self.counter = counter
        self.split = split
        self.verify_images = verify_images
        self.count_only = count_only

    def skip(self, record_id: str, reason: str) -> None:
        """Skips one record (counted, warned; raises ``DataError`` when strict)."""
        self.counter.skip(record_id, reason)

    def wanted(self, split: str) -> bool:
        """Whether a row of ``split`` is read (the filter runs before any image is loaded)."""
        return self.split is None or split == self.split

    @contextlib.contextmanager
    def row(self, record_id: str) -> Iterator[None]:
        """Turns any error while reading one row into a counted skip, so a run never dies
        mid-epoch on one bad row; strict mode re-raises it."""
        try:
            yield
        except Exception as err:
            if self.counter.strict:
                raise
            self.skip(record_id, f"bad row: {type(err).__name__}: {err}")

    def load_image(self, path: epath.Path, record_id: str) -> tuple[Any, tuple[int, int]] | None:
        """Reads one image file, or skips the record (missing, zero-byte, undecodable).

        Returns:
          ``(image, (H, W))``: the encoded bytes as on disk for PNG/JPEG (decoded once to check
          them, which catches corrupt and truncated files), or uint8 ``[H, W]`` for DICOM;
          None when the record was skipped. With ``count_only`` (a first pass that counts the
          records to come) the file is not read: ``(b"", (1, 1))`` when it exists.
        """
        if self.count_only:
            if not path.is_file():
                self.skip(record_id, f"missing image: {path}")
                return None
            return b"", (1, 1)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self.skip(record_id, f"missing image: {path}")
            return None
        if not data:
            self.skip(record_id, f"empty image: {path} is zero bytes")
            return None
        try:
            if path.suffix.lower() in DICOM_SUFFIXES:
                array = dicom_to_uint8(data)
                return array, (int(array.shape[0]), int(array.shape[1]))
            return data, encoded_image_hw(data, verify=self.verify_images)
        except Exception as err:  # PIL and pydicom raise many types for broken files
            self.skip(record_id, f"unreadable image: {path}: {type(err).__name__}: {err}")
            return None

    def record(
        self, *, size: tuple[int, int], boxes: Any = None, box_captions=None, box_labels=None, **kw
    ) -> schema.Record:
        """:func:`schema.make_record` with boxes clipped to the known image size ``(H, W)``.

        Clipped and dropped boxes are counted as repairs (the record is kept).
        """
        captions = list(box_captions or [])
        if boxes is None:
            boxes = np.zeros((0, 4), np.float32)
        if box_labels is None:
            box_labels = np.full((len(captions),), -1, np.int32)
        raw = np.asarray(boxes, np.float32).reshape(-1, 4)
        height, width = size
        boxes, captions, box_labels, dropped = schema.clean_boxes(
            raw, captions, box_labels, height=height, width=width
        )
        limits = np.array([width, height, width, height], np.float32)
        finite = raw[np.isfinite(raw).all(axis=1)]
        if ((finite < 0) | (finite > limits)).any():
            self.repair(kw["id"], "clipped box: outside the image")
        if dropped:
            self.repair(kw["id"], f"dropped box: {dropped} degenerate or empty after clip")
        return schema.make_record(boxes=boxes, box_captions=captions, box_labels=box_labels, **kw)

    def repair(self, record_id: str, reason: str) -> None:
        """Counts a repair when the counter can (a plain ``SkipCounter`` only gets the log)."""
        if isinstance(self.counter, ReadCounter):
            self.counter.repair(record_id, reason)
        else:
            _log.warning(f"{self.source}: record {record_id!r}: {reason}")


def reader(source: str) -> Callable:
    """Decorates ``open_fn(root, ctx, **options)`` into the public reader signature.

    The public form is ``read(root, *, strict=False, counter=None, split=None,
    verify_images=True, count_only=False, **options) -> Records``: ``split`` keeps one split (rows
    of other splits are dropped before their images are read), ``verify_images=False`` skips the
    decode check, ``count_only=True`` reads no image (only whether its file exists) and yields
    records with empty ``image`` bytes: a fast first pass that counts what a build will read.
    """

    def wrap(open_fn: Callable[..., Iterator[schema.Record]]) -> Callable[..., Records]:
        @functools.wraps(open_fn)
        def read(
            root: Any,
            *,
            strict: bool = False,
            counter: schema.SkipCounter | None = None,
            split: str | None = None,
            verify_images: bool = True,
            count_only: bool = False,
            **options: Any,
        ) -> Records:
            counter = counter if counter is not None else ReadCounter(source, strict=strict)
            if split is not None and split not in schema.SPLITS:
                raise schema.DataError(f"{source}: split {split!r} is not one of {schema.SPLITS}")
            root = epath.Path(root)
            if not root.exists():
                raise schema.DataError(f"{source}: {root} does not exist")
            ctx = ReadContext(
                source, counter, split=split, verify_images=verify_images, count_only=count_only
            )
            return Records(open_fn(root, ctx, **options), counter)

        return read

    return wrap


def encoded_image_hw(data: bytes, *, verify: bool = True) -> tuple[int, int]:
    """``(H, W)`` of encoded PNG/JPEG bytes; with ``verify`` decodes them to catch corrupt and
    truncated files (``verify()`` alone misses a truncated JPEG, decoding does not)."""
    with PIL.Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if verify:
            image.verify()
    if verify:
        with PIL.Image.open(io.BytesIO(data)) as image:
            # JPEG can decode at 1/8 scale: every byte is still entropy-decoded (so truncation
            # is caught) at a fraction of the cost of a full-resolution decode.
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    return int(height), int(width)


def dicom_to_uint8(data: bytes) -> np.ndarray:
    """Decodes a DICOM file to uint8 ``[H, W]`` (or ``[H, W, 3]`` for colour).

    Applies the modality LUT (rescale slope/intercept) and the VOI window when the file has one,
    stretches to 0..255, and inverts MONOCHROME1 (where larger values are darker) so that dense
    structures are always bright. Multi-frame files keep their first frame.
    """
    import pydicom  # only the DICOM sources need it
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = pydicom.dcmread(io.BytesIO(data))
    pixels = dataset.pixel_array
    colour = int(dataset.get("SamplesPerPixel", 1)) == 3
    if pixels.ndim == (4 if colour else 3):
        pixels = pixels[0]
    if colour:
        return pixels.astype(np.uint8) if pixels.dtype == np.uint8 else _stretch(pixels)
    pixels = apply_modality_lut(pixels, dataset)
    if "WindowCenter" in dataset or "VOILUTSequence" in dataset:
        pixels = apply_voi_lut(pixels, dataset)
    image = _stretch(pixels)
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = 255 - image
    return image


def _stretch(pixels: np.ndarray) -> np.ndarray:
    """Min–max stretch of any numeric array to uint8 (a constant image becomes zeros)."""
    pixels = pixels.astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((pixels - low) * scale).astype(np.uint8)


def find_image(folder: epath.Path, stem: str, suffixes: Sequence[str]) -> epath.Path:
    """``folder/stem + suffix`` for the first suffix whose file exists, else with the first suffix
    (so that the missing-image message names the file the dataset normally has)."""
    for suffix in suffixes:
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    return folder / f"{stem}{suffixes[0]}"


def find_file(root: epath.Path, names: Sequence[str], source: str) -> epath.Path:
    """The first of ``names`` (relative to ``root``) that exists, or a ``DataError`` naming them."""
    for name in names:
        if (root / name).exists():
            return root / name
    raise schema.DataError(f"{source}: none of {list(names)} found in {root}")


def _open_text(path: epath.Path):
    raw = path.open("rb")
    stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
    # utf-8-sig: some exported CSVs start with a byte-order mark that would rename column one.
    return io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")


def check_columns(path: epath.Path, required: Sequence[str], source: str) -> list[str]:
    """Reads a CSV's header and fails clearly when a required column is missing.

    Raises:
      DataError: the file does not exist, is empty, or lacks a column (both are named).
    """
    if not path.exists():
        raise schema.DataError(f"{source}: file {path} does not exist")
    try:
        with _open_text(path) as stream:
            header = next(csv.reader(stream), None)
    except (OSError, UnicodeDecodeError) as err:
        raise schema.DataError(f"{source}: cannot read {path}: {err}") from err
    if not header:
        raise schema.DataError(f"{source}: file {path} is empty (no header row)")
    header = [name.strip() for name in header]
    missing = [name for name in required if name not in header]
    if missing:
        raise schema.DataError(
            f"{source}: file {path} is missing column {missing[0]!r} "
            f"(missing {missing}; has {header})"
        )
    return header


def read_csv(path: epath.Path, required: Sequence[str], source: str) -> Iterator[dict[str, str]]:
    """Checks the header now, then yields the rows as ``{column: text}`` ('' where blank).

    Header names are stripped of spaces; a short (truncated) row yields '' for its missing cells.
    """
    header = check_columns(path, required, source)

    def rows():
        with _open_text(path) as stream:
            table = csv.reader(stream)
            next(table, None)
            for cells in table:
                if not any(cell.strip() for cell in cells):
                    continue
                cells = cells + [""] * (len(header) - len(cells))
                yield dict(zip(header, (cell.strip() for cell in cells), strict=False))

    return rows()


def read_jsonl(path: epath.Path, source: str) -> Iterator[tuple[int, dict | Exception]]:
    """Yields ``(line number, object)``, or ``(line number, error)`` for a malformed line."""
    if not path.exists():
        raise schema.DataError(f"{source}: file {path} does not exist")

    def rows():
        with _open_text(path) as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                    if not isinstance(value, dict):
                        raise ValueError(f"line is a {type(value).__name__}, not an object")
                    yield number, value
                except ValueError as err:
                    yield number, err

    return rows()


def parse_float(text: Any) -> float:
    """A CSV cell as float: blank / None / 'nan' → NaN; anything else non-numeric raises."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return math.nan
    return float(text)


def split_name(value: str) -> str | None:
    """A dataset's split spelling (``validate``, ``val``, ...) → schema split, None if unknown."""
    return _SPLIT_NAMES.get(str(value).strip().lower())


def labels_report(
    names: Sequence[str], values: Sequence[float], *, negatives: bool = True, skip=("No Finding",)
) -> str:
    """Synthesises a short report from labels for sources that ship none (CheXpert, RSNA, ...).

    ``values`` are raw (NaN = not mentioned, left out): 1 → "Findings: a, b.", −1 → "Possible
    c.", 0 → "No d." (when ``negatives``), e.g. "Findings: cardiomegaly. No pleural effusion.".
    """
    groups = {1.0: [], -1.0: [], 0.0: []}
    for name, value in zip(names, values, strict=True):
        if name not in skip and value in groups:
            # Abbreviations (ILD, COPD) keep their case; other names read as in a sentence.
            groups[value].append(name if name.isupper() else name.lower().replace("_", " "))
    positive, uncertain, negative = groups[1.0], groups[-1.0], groups[0.0]
    parts = [f"Findings: {', '.join(positive)}." if positive else "No acute findings."]
    if uncertain:
        parts.append(f"Possible {', '.join(uncertain)}.")
    if negatives and negative:
        parts.append(f"No {', '.join(negative)}.")
    return " ".join(parts)
