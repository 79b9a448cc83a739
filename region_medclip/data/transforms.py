"""Per-example grain transforms: decode → resize/pad → augment → normalise → ROIs → tokenize.

Each transform takes and returns a dict. A record that cannot be used (unreadable image, empty
report) is not dropped here: it is marked with ``_skip`` (the reason) and the batcher in
``pipeline.py`` drops and counts it, so the count travels with the batch even from worker
processes.
"""

import dataclasses
import hashlib
import io
import logging
import math
import re

import grain
import numpy as np
from PIL import Image

from region_medclip.data import negatives as negatives_lib
from region_medclip.data import schema
from region_medclip.data.tokenizers import TextTokenizer

# CLIP's image statistics; the gray film is replicated to three channels.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

_log = logging.getLogger("region_medclip.data")


# What PIL's convert("L") computes from RGB (ITU-R 601-2 luma).
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def gray_uint8(image) -> np.ndarray:
    """A decoded film — a PIL image, or an array ``[H, W]`` / ``[H, W, 3|4]`` of uint8 or 16-bit
    integers — → ``[H, W]`` uint8 gray.

    16-bit values are scaled from the full 0..65535 range (÷257). PIL's ``convert("L")`` clips
    them at 255 instead, which turns every 16-bit PNG film white; data stored in 12 bits should
    be windowed to 8 or 16 bits before it is written.

    Raises:
      ValueError: another dtype, or integers outside 0..65535.
    """
    if isinstance(image, Image.Image):
        if image.mode not in _WIDE_MODES:
            return np.asarray(image.convert("L"))
        image = np.asarray(image)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).convert("L")) if image.ndim == 3 else image
    if image.dtype.kind not in "ui":
        raise ValueError(f"images must be uint8 or 16-bit integers, got {image.dtype}")
    if image.size and (image.min() < 0 or image.max() > 65535):
        raise ValueError(f"{image.dtype} image values outside 0..65535")
    gray = image.astype(np.float32)
    if gray.ndim == 3:
        gray = gray[..., :3] @ _LUMA
    return np.clip(np.round(gray / 257.0), 0, 255).astype(np.uint8)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _skip(example: dict, reason: str) -> dict:
    _log.warning("skipping record %r: %s", _text(example.get("id", "?")), reason)
    return {"_skip": reason, "id": example.get("id", "?")}


@dataclasses.dataclass
class Decode(grain.transforms.Map):
    """Decodes the image to uint8 ``[H, W]`` gray and the text fields to str.

    ``strict=True`` raises :class:`~region_medclip.data.schema.DataError` instead of marking
    the record for skipping.
    """

    strict: bool = False

    def map(self, example: dict) -> dict:
        example = dict(example)
        record_id = _text(example.get("id", "?"))
        reason = None
        image = example["image"]
        try:
            if isinstance(image, bytes | np.bytes_) or (
                isinstance(image, np.ndarray) and image.dtype == object
            ):
                data = image.item() if isinstance(image, np.ndarray) else bytes(image)
                if not data:
                    raise ValueError("zero-byte image")
                with Image.open(io.BytesIO(data)) as pil:
                    image = gray_uint8(pil)
            image = gray_uint8(image)
            if image.ndim != 2 or min(image.shape) < 2:
                raise ValueError(f"image of shape {image.shape}")
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
            reason = f"unreadable image: {err}"
        report = _text(example.get("report", ""))
        if reason is None and not report.strip():
            reason = "empty report"
        if reason is not None:
            if self.strict:
                raise schema.DataError(f"record {record_id!r}: {reason}")
            return _skip(example, reason)
        example["image"] = image.astype(np.uint8)
        example["report"] = report
        example["box_captions"] = [_text(c) for c in example.get("box_captions", [])]
        example["id"] = record_id
        return example


@dataclasses.dataclass
class ResizePad(grain.transforms.Map):
    """Scales the longer side to ``size`` keeping the aspect ratio, pads to a centred square,
    and moves the boxes with the image. ``image_box`` (pixel ``xyxy``) is the film's area in
    the square, so that evaluation can leave the padding out (BioViL's CNR)."""

    size: int

    def map(self, example: dict) -> dict:
        if "_skip" in example:
            return example
        image = example["image"]
        height, width = image.shape
        scale = self.size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        top, left = (self.size - new_h) // 2, (self.size - new_w) // 2
        canvas = np.zeros((self.size, self.size), np.uint8)
        canvas[top : top + new_h, left : left + new_w] = resized
        boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
        boxes = boxes * np.array([new_w / width, new_h / height] * 2) + [left, top, left, top]
        area = np.array([left, top, left + new_w, top + new_h], np.float32)
        return {**example, "image": canvas, "boxes": boxes.astype(np.float32), "image_box": area}


@dataclasses.dataclass
class AspectPad(grain.transforms.RandomMap):
    """Presents a square film as a non-square one arrives: with probability ``p`` one side
    (width or height, at random) is squeezed to a random fraction in ``[min_aspect, 1]`` of
    the other and the frame is padded back to a centred black square, which is what
    :class:`ResizePad` makes of a 5:6 or 3:4 film. Boxes move with the image.

    Every real chest film is non-square; a model that has seen only square ones reads the
    black bands as findings.
    """

    p: float = 0.5
    min_aspect: float = 0.6

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"config.data.aspect_pad: {self.p} is not a probability")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ValueError(f"AspectPad.min_aspect: {self.min_aspect} is not in (0, 1]")

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if "_skip" in example or rng.uniform() >= self.p:
            return example
        image = example["image"]
        size = image.shape[0]
        short = max(1, round(size * rng.uniform(self.min_aspect, 1.0)))
        new_w, new_h = (short, size) if rng.uniform() < 0.5 else (size, short)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        top, left = (size - new_h) // 2, (size - new_w) // 2
        canvas = np.zeros_like(image)
        canvas[top : top + new_h, left : left + new_w] = resized
        boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
        scale_shift = (np.array([new_w / size, new_h / size] * 2), [left, top, left, top])
        boxes = boxes * scale_shift[0] + scale_shift[1]
        area = np.asarray(example.get("image_box", [0, 0, size, size]), np.float32)
        return {
            **example,
            "image": canvas,
            "boxes": boxes.astype(np.float32),
            "image_box": (area * scale_shift[0] + scale_shift[1]).astype(np.float32),
        }


@dataclasses.dataclass
class Augment(grain.transforms.RandomMap):
    """Random resized crop + small rotation + brightness/contrast, boxes moved with the image.

    A box is transformed by its four corners (axis-aligned hull), clipped to the frame, and
    dropped (with its caption) when less than ``min_visible`` of its area stays in the frame.
    """

    scale: tuple[float, float] = (0.75, 1.0)
    max_rotation: float = 7.0  # degrees
    brightness: float = 0.1
    contrast: float = 0.15
    min_visible: float = 0.5

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if "_skip" in example:
            return example
        image = example["image"]
        size = image.shape[0]
        crop = size * math.sqrt(rng.uniform(*self.scale))
        cx, cy = rng.uniform(crop / 2, size - crop / 2, size=2)
        angle = math.radians(rng.uniform(-self.max_rotation, self.max_rotation))
        zoom = size / crop
        cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
        # Forward map (input → output pixel): rotate and zoom about the crop centre.
        forward = np.array(
            [
                [cos, -sin, size / 2 - cos * cx + sin * cy],
                [sin, cos, size / 2 - sin * cx - cos * cy],
            ]
        )
        inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
        out = Image.fromarray(image).transform(
            (size, size), Image.AFFINE, inverse.ravel().tolist(), Image.BILINEAR
        )
        pixels = np.asarray(out, np.float32)
        gain = 1.0 + rng.uniform(-self.contrast, self.contrast)
        shift = 255.0 * rng.uniform(-self.brightness, self.brightness)
        pixels = (pixels - pixels.mean()) * gain + pixels.mean() + shift
        example = {**example, "image": np.clip(pixels, 0, 255).astype(np.uint8)}
        return _move_boxes(example, forward, size, self.min_visible)


# "FINDINGS:", "IMPRESSION:", "COMPARISON:" ...: an upper-case section header ends at its colon.
_SECTION = re.compile(r"\b[A-Z][A-Z /]+:\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def report_sentences(report: str) -> list[str]:
    """The sentences of a report, section headers removed, in order (``[]`` for no text)."""
    text = _SECTION.sub(" ", report)
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


@dataclasses.dataclass
class SampleSentences(grain.transforms.RandomMap):
    """Text augmentation: with probability ``p`` the report is replaced by a random non-empty
    subset of its sentences, in their order (ConVIRT samples single sentences; a subset keeps
    some whole-report pairs too). Every subset is still true of the image, and the text tower
    sees the short, single-statement form that zero-shot prompts ("No pneumothorax.") take.

    ``keep`` is each sentence's chance of staying; a report of one sentence is left as it is.
    """

    p: float = 0.5
    keep: float = 0.5

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if "_skip" in example or rng.random() >= self.p:
            return example
        sentences = report_sentences(str(example["report"]))
        if len(sentences) < 2:
            return example
        chosen = rng.random(len(sentences)) < self.keep
        if not chosen.any():
            chosen[rng.integers(len(sentences))] = True
        return {
            **example,
            "report": " ".join(s for s, c in zip(sentences, chosen, strict=True) if c),
        }


def _move_boxes(example: dict, forward: np.ndarray, size: int, min_visible: float) -> dict:
    boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
    if not len(boxes):
        return example
    corners = np.stack(
        [boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]], axis=1
    )  # [R, 4, 2]
    moved = corners @ forward[:, :2].T + forward[:, 2]
    hull = np.concatenate([moved.min(axis=1), moved.max(axis=1)], axis=1)
    area = (hull[:, 2] - hull[:, 0]) * (hull[:, 3] - hull[:, 1])
    clipped = np.clip(hull, 0, size)
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (visible >= min_visible * np.maximum(area, 1e-6)) & (visible > 0)
    captions = [c for c, k in zip(example["box_captions"], keep, strict=True) if k]
    labels = np.asarray(example["box_labels"]).reshape(-1)[keep]
    return {
        **example,
        "boxes": clipped[keep].astype(np.float32),
        "box_captions": captions,
        "box_labels": labels,
    }


def caption_id(caption: str) -> int:
    """Stable int32 id of a caption's normalised text: equal captions anywhere in the global
    batch share it, so the ROI loss treats them as positives rather than false negatives."""
    digest = hashlib.blake2b(" ".join(caption.lower().split()).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclasses.dataclass
class Finalize(grain.transforms.Map):
    """Normalises the image and builds fixed-size model inputs.

    Output keys (``L`` = ``text_len``, ``Lc`` = ``caption_len`` or ``L``): ``images [S, S, 3]``
    float32, ``texts [L]``, ``boxes [R, 4]`` normalised xyxy,
    ``roi_mask [R]``, ``captions [R, Lc]``, ``cap_ids [R]``, ``negatives [R, K, Lc]``,
    ``neg_mask [R, K]``, ``labels [C]``, ``box_labels [R]``, ``box_finding [R]`` (the boxes
    that show a finding: real, and not of the ``no_finding`` class, e.g. a clear lung zone),
    ``image_box [4]`` (the film's area in the frame, normalised xyxy); with
    ``report_negatives = Kr > 0`` also ``report_negatives [Kr, L]`` and ``report_neg_mask [Kr]``
    (the report with a finding, side or zone changed: ``negatives.report_negatives``); and the
    counts ``truncated_rois`` (boxes past ``max_rois``) and ``truncated_texts`` (texts cut to
    fit).
    """

    tokenizer: TextTokenizer
    max_rois: int
    text_len: int
    num_negatives: int
    seed: int = 0
    caption_len: int = 0  # 0: text_len
    report_negatives: int = 0
    no_finding: int = -1  # the source's "no finding" label index (-1: none)

    def map(self, example: dict) -> dict:
        if "_skip" in example:
            return example
        image = example["image"].astype(np.float32) / 255.0
        size = image.shape[0]
        rois, k = self.max_rois, self.num_negatives
        captions = list(example["box_captions"])[:rois]
        count = len(captions)
        boxes = np.zeros((rois, 4), np.float32)
        boxes[:count] = np.asarray(example["boxes"], np.float32).reshape(-1, 4)[:count] / size
        box_labels = np.full((rois,), -1, np.int32)
        box_labels[:count] = np.asarray(example["box_labels"]).reshape(-1)[:count]
        negs = [negatives_lib.hard_negatives(c, k, seed=self.seed) for c in captions]
        neg_mask = np.zeros((rois, k), bool)
        flat = [example["report"]] + captions
        for r, group in enumerate(negs):
            neg_mask[r, : len(group)] = True
            flat += group
        cap_len = self.caption_len or self.text_len
        report, cut_reports = self.tokenizer.encode(flat[:1], self.text_len)
        report = report[0]
        ids, cut_captions = self.tokenizer.encode(flat[1:], cap_len)
        captions_ids = np.zeros((rois, cap_len), np.int32)
        captions_ids[:count] = ids[:count]
        negative_ids = np.zeros((rois, k, cap_len), np.int32)
        negative_ids[neg_mask] = ids[count:]
        cap_ids = np.full((rois,), -1, np.int32)
        cap_ids[:count] = [caption_id(c) for c in captions]
        extra, cut_negatives = self._report_negatives(example["report"])
        return dict(
            **extra,
            images=((image[..., None] - MEAN) / STD).astype(np.float32),
            texts=report,
            boxes=boxes,
            roi_mask=np.arange(rois) < count,
            captions=captions_ids,
            cap_ids=cap_ids,
            negatives=negative_ids,
            neg_mask=neg_mask,
            labels=np.asarray(example["labels"], np.float32),
            box_labels=box_labels,
            box_finding=(np.arange(rois) < count) & (box_labels != self.no_finding),
            # The film's area in the square frame, normalised xyxy (padding outside it);
            # training augmentation does not move it: only evaluation reads it.
            image_box=np.asarray(example.get("image_box", [0, 0, size, size]), np.float32) / size,
            # Boxes beyond max_rois are not used; the batcher counts them so none go unnoticed.
            truncated_rois=np.int32(len(example["box_captions"]) - count),
            # Reports over text_len and captions or negatives over caption_len, cut to fit.
            truncated_texts=np.int32(cut_reports + cut_captions + cut_negatives),
        )

    def _report_negatives(self, report: str) -> tuple[dict, int]:
        """``({report_negatives [Kr, L], report_neg_mask [Kr]}, texts cut)``, or ``({}, 0)``
        without them."""
        if self.report_negatives <= 0:
            return {}, 0
        texts = negatives_lib.report_negatives(report, self.report_negatives, seed=self.seed)
        ids = np.zeros((self.report_negatives, self.text_len), np.int32)
        cut = 0
        if texts:
            ids[: len(texts)], cut = self.tokenizer.encode(texts, self.text_len)
        mask = np.arange(self.report_negatives) < len(texts)
        return dict(report_negatives=ids, report_neg_mask=mask), cut
