"""Open-vocabulary lesion detection with the region tower: boxes found without given boxes.

A trained region head embeds any box (RoIAlign takes any coordinates), so a phrase can be
looked for everywhere: candidate boxes are laid over the film at several scales and aspects,
with strides finer than a patch (a nodule is smaller than a 16-px patch at 96 px); each is
embedded through the region head and scored against the phrase, calibrated against the
normal-region prompts ("clear right upper zone"); per phrase, non-maximum suppression keeps
the best of each cluster. RegionCLIP (Zhong et al., CVPR 2022) and OWL-ViT (Minderer et al.,
ECCV 2022) score region embeddings against class text the same way on natural images.

``p(phrase | box) = σ(t · (z_box·z_phrase − max_n z_box·z_normal_n))``: the two-way softmax
between the phrase and the closest normal-region prompt, with the model's learned scale t,
so a box is a finding when it reads more like the phrase than like any clear region.

Everything here is numpy / jitted JAX over one image batch; the model is only called through
``encode_fn`` arguments, so the same code serves the evaluator and ``region_medclip.load``.
"""

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np

# Square-root areas (fractions of the frame side) and aspect ratios (width / height) of the
# windows: synth_cxr's findings span 0.065 (a nodule) to 0.38 (cardiomegaly) of the side, at
# aspects from 1:1 to 3:1 (atelectasis is a wide band, pneumothorax a tall one).
SIZES = (0.07, 0.1, 0.14, 0.2, 0.28, 0.38)
ASPECTS = (0.5, 1.0, 2.5)
# Centres a third of the window's width (height) apart: a lesion of the window's shape is at
# most a sixth of each side off some window, IoU ≥ (5/6)² / (2 − (5/6)²) = 0.53.
STRIDE = 1 / 3
# Boxes the region head embeds at once, per image (RoIAlign's weights grow with it).
CHUNK = 2048

# A lung zone without findings, as radiologists' region annotations describe one (Chest
# ImaGenome style): the reference every phrase is calibrated against.
NORMAL_REGION_PROMPTS = tuple(
    f"{template.format(f'{side} {zone}')}"
    for template, side, zone in itertools.product(
        ("clear {}", "{} is clear", "normal {}"),
        ("right", "left"),
        ("upper zone", "mid zone", "lower zone", "apex", "base"),
    )
)


@dataclasses.dataclass(frozen=True)
class Detections:
    """What :func:`detect` finds in one image.

    Attributes:
      boxes: ``[K, 4]`` normalised xyxy.
      scores: ``[K]`` calibrated log-odds (:func:`calibrated_logits`; σ of them: probabilities).
      phrases: ``[K]`` index of the phrase each box was found for.
    """

    boxes: np.ndarray
    scores: np.ndarray
    phrases: np.ndarray


def window_proposals(
    sizes: Sequence[float] = SIZES, aspects: Sequence[float] = ASPECTS, stride: float = STRIDE
) -> np.ndarray:
    """``[K, 4]`` normalised xyxy windows tiling the frame: for each size (square root of the
    area) and aspect (width / height), centres ``stride`` × the window's width apart along x
    and × its height along y, every window inside the frame."""
    boxes = []
    for size, aspect in itertools.product(sizes, aspects):
        width, height = size * np.sqrt(aspect), size / np.sqrt(aspect)
        if width > 1 or height > 1:
            continue
        xs = np.arange(width / 2, 1 - width / 2 + 1e-9, stride * width)
        ys = np.arange(height / 2, 1 - height / 2 + 1e-9, stride * height)
        cx, cy = np.meshgrid(xs, ys, indexing="xy")
        centres = np.stack([cx.ravel(), cy.ravel()], -1)
        half = np.array([width / 2, height / 2])
        boxes.append(np.concatenate([centres - half, centres + half], -1))
    return np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a [N, 4]``, ``b [M, 4]`` xyxy → ``[N, M]`` intersection over union."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), -1)
    area_a = np.prod(a[:, 2:] - a[:, :2], -1)
    area_b = np.prod(b[:, 2:] - b[:, :2], -1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, top_k: int) -> np.ndarray:
    """Indices of ``boxes [K, 4]`` kept by greedy non-maximum suppression at ``iou``, best
    first, at most ``top_k``."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order) and len(keep) < top_k:
        best, order = order[0], order[1:]
        keep.append(int(best))
        if len(order):
            order = order[box_iou(boxes[best][None], boxes[order])[0] < iou]
    return np.asarray(keep, np.int64)


def calibrated_logits(
    zroi: np.ndarray, zphrase: np.ndarray, znormal: np.ndarray, logit_scale: float
) -> np.ndarray:
    """``zroi [K, D]``, ``zphrase [P, D]``, ``znormal [Q, D]`` (all L2-normalised) → ``[K, P]``
    log-odds that each box shows each phrase rather than the nearest clear region. Boxes are
    ranked by these: with CLIP's learned scale (~100) the probabilities of every box inside a
    lesion round to 1.0, and ties would hand the choice to the proposals' order."""
    phrase = zroi @ zphrase.T
    normal = (zroi @ znormal.T).max(-1, keepdims=True)
    return logit_scale * (phrase - normal)


def calibrated_scores(zroi, zphrase, znormal, logit_scale: float) -> np.ndarray:
    """``[K, P]`` probabilities σ(:func:`calibrated_logits`)."""
    return 1.0 / (1.0 + np.exp(-calibrated_logits(zroi, zphrase, znormal, logit_scale)))


def select(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    iou: float = 0.3,
    top_k: int = 10,
    min_score: float = 0.0,
    valid: np.ndarray | None = None,
) -> Detections:
    """Per phrase, NMS over ``boxes [K, 4]`` by ``scores [K, P]`` (log-odds): at most ``top_k``
    boxes a phrase with a score above ``min_score`` (0: more like the phrase than like any
    clear region); ``valid [K]`` leaves out boxes (e.g. on padding)."""
    out_boxes, out_scores, out_phrases = [], [], []
    keep_mask = np.ones(len(boxes), bool) if valid is None else np.asarray(valid, bool)
    for p in range(scores.shape[1]):
        candidates = np.flatnonzero(keep_mask & (scores[:, p] > min_score))
        kept = candidates[nms(boxes[candidates], scores[candidates, p], iou, top_k)]
        out_boxes.append(boxes[kept])
        out_scores.append(scores[kept, p])
        out_phrases.append(np.full(len(kept), p, np.int64))
    return Detections(
        np.concatenate(out_boxes).reshape(-1, 4),
        np.concatenate(out_scores),
        np.concatenate(out_phrases),
    )


def inside(boxes: np.ndarray, area: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """``[K]``: boxes with at least ``min_fraction`` of their area inside ``area [4]`` (the
    film's part of a padded frame)."""
    inter = box_iou(boxes, area[None])[:, 0]
    # IoU → intersection: inter = iou · (a + b) / (1 + iou).
    a = np.prod(boxes[:, 2:] - boxes[:, :2], -1)
    b = np.prod(area[2:] - area[:2])
    overlap = inter * (a + b) / (1 + inter)
    return overlap >= min_fraction * a


def _chunks(boxes: np.ndarray, size: int) -> list[np.ndarray]:
    """``boxes`` in pieces of ``size`` rows, the last padded (by repeating its first row) so
    that every call has one compiled shape."""
    pieces = []
    for start in range(0, len(boxes), size):
        piece = boxes[start : start + size]
        pad = size - len(piece) if len(boxes) > size else 0
        pieces.append(np.concatenate([piece, np.repeat(piece[:1], pad, 0)]) if pad else piece)
    return pieces


def detect(
    patch_tokens: np.ndarray,
    zphrase: np.ndarray,
    znormal: np.ndarray,
    *,
    encode_regions_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    logit_scale: float,
    proposals: np.ndarray | None = None,
    image_box: np.ndarray | None = None,
    iou: float = 0.3,
    top_k: int = 10,
    min_score: float = 0.0,
) -> list[Detections]:
    """Finds ``zphrase [P, D]`` in each image of ``patch_tokens [B, h, w, width]``.

    Args:
      encode_regions_fn: ``(patch_tokens [B, h, w, width], boxes [B, K, 4]) → zroi [B, K, D]``
        L2-normalised (the model's region head).
      znormal: ``[Q, D]`` the normal-region prompts' embeddings.
      proposals: ``[K, 4]`` normalised boxes (default :func:`window_proposals`).
      image_box: ``[B, 4]`` each film's area in its frame (boxes mostly on padding are left
        out); None: the whole frame.
      iou, top_k, min_score: as in :func:`select`.

    Returns:
      One :class:`Detections` an image.
    """
    proposals = window_proposals() if proposals is None else np.asarray(proposals, np.float32)
    batch = len(patch_tokens)
    zroi = np.concatenate(
        [
            np.asarray(
                encode_regions_fn(patch_tokens, np.broadcast_to(chunk, (batch, *chunk.shape)))
            )
            for chunk in _chunks(proposals, CHUNK)
        ],
        axis=1,
    )[:, : len(proposals)]
    out = []
    for i in range(batch):
        scores = calibrated_logits(zroi[i], zphrase, znormal, logit_scale)
        valid = None if image_box is None else inside(proposals, np.asarray(image_box[i]))
        out.append(
            select(proposals, scores, iou=iou, top_k=top_k, min_score=min_score, valid=valid)
        )
    return out


def joint_logits(
    zroi: np.ndarray,
    zphrase: np.ndarray,
    znormal: np.ndarray,
    objectness: np.ndarray,
    logit_scale: float,
) -> np.ndarray:
    """``[K, P]`` log-odds that each box holds a finding and that the finding is each phrase.

    ``p(phrase | box)`` is a softmax over the phrases and one background class, the nearest
    clear region (RegionCLIP's classifier over class embeddings and a background; with one
    phrase, the two-way :func:`calibrated_logits`): a box is shared out among the phrases, so
    a mass does not also score as a nodule at full odds. It is multiplied by the box head's
    ``σ(objectness)``, the probability that the box holds a finding at all.

    Args:
      zroi: ``[K, D]``, zphrase ``[P, D]``, znormal ``[Q, D]``, all L2-normalised.
      objectness: ``[K]`` logits.
      logit_scale: the model's learned scale t.
    """
    logits = logit_scale * np.asarray(zroi, np.float64) @ np.asarray(zphrase, np.float64).T
    background = logit_scale * (np.asarray(zroi, np.float64) @ np.asarray(znormal).T).max(-1)
    both = np.concatenate([logits, background[:, None]], -1)
    top = both.max(-1, keepdims=True)
    log_norm = top + np.log(np.exp(both - top).sum(-1, keepdims=True))
    objectness = np.asarray(objectness, np.float64)[:, None]
    log_object = -np.logaddexp(0.0, -objectness)  # log σ(o)
    log_p = np.minimum(logits - log_norm + log_object, -1e-12)  # p < 1 in float64
    return log_p - np.log(-np.expm1(log_p))


def detect_proposals(
    patch_tokens: np.ndarray,
    zphrase: np.ndarray,
    znormal: np.ndarray,
    proposals: np.ndarray,
    objectness: np.ndarray,
    *,
    encode_regions_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    logit_scale: float,
    image_box: np.ndarray | None = None,
    iou: float = 0.3,
    top_k: int = 5,
    min_score: float = -np.inf,
) -> list[Detections]:
    """Finds ``zphrase [P, D]`` among each image's own proposals (the box head's), scored by
    :func:`joint_logits`. The region head alone cannot say where a lesion ends (a box inside
    it reads as much like it), the box head alone cannot say what it is.

    Args:
      patch_tokens: ``[B, h, w, width]``.
      proposals: ``[B, K, 4]`` normalised xyxy (clipped to the frame).
      objectness: ``[B, K]`` logits.
      encode_regions_fn, znormal, logit_scale, image_box: as in :func:`detect`.
      iou, top_k, min_score: as in :func:`select`.

    Returns:
      One :class:`Detections` an image.
    """
    proposals = np.asarray(proposals, np.float32)
    zroi = np.asarray(encode_regions_fn(patch_tokens, proposals))
    out = []
    for i in range(len(patch_tokens)):
        scores = joint_logits(zroi[i], zphrase, znormal, objectness[i], logit_scale)
        # A degenerate box (the head's exponent clipped to the frame's edge) is no proposal.
        valid = np.all(proposals[i, :, 2:] > proposals[i, :, :2], -1)
        if image_box is not None:
            valid &= inside(proposals[i], np.asarray(image_box[i]))
        out.append(
            select(proposals[i], scores, iou=iou, top_k=top_k, min_score=min_score, valid=valid)
        )
    return out


def heat_grid(size: float = SIZES[0], stride: float = STRIDE) -> tuple[np.ndarray, tuple]:
    """Square windows of side ``size`` whose centres form a regular grid ``stride × size``
    apart: ``(boxes [gy·gx, 4], (gy, gx))``, row-major. Their scores are a phrase's heatmap at
    a finer step than the patch grid."""
    boxes = window_proposals(sizes=(size,), aspects=(1.0,), stride=stride)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    gx = len(np.unique(np.round(centres[:, 0], 6)))
    return boxes, (len(boxes) // gx, gx)


def grown_boxes(
    heat: np.ndarray, centres: np.ndarray, *, fraction: float, top_k: int, half: float
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes grown from a phrase's heatmap: from the highest peak, the cells connected to it
    whose heat is ≥ ``fraction`` × the peak, their centres' bounding box widened by ``half``
    (half a window's side) on every side; those cells are then spent and the next peak is
    taken, at most ``top_k`` times while the peak is positive (more like the phrase than a
    clear region).

    Args:
      heat: ``[gy, gx]`` log-odds of the phrase at each window.
      centres: ``[gy, gx, 2]`` normalised window centres (x, y).

    Returns:
      ``(boxes [k, 4] normalised xyxy, scores [k])``, the peak's log-odds as the score.
    """
    heat = np.array(heat, np.float64)
    boxes, scores = [], []
    while len(boxes) < top_k:
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        value = heat[peak]
        if not np.isfinite(value) or value <= 0:
            break
        region = _connected(heat >= fraction * value, peak)
        cells = centres[region]
        low, high = cells.min(0) - half, cells.max(0) + half
        boxes.append(np.clip(np.concatenate([low, high]), 0.0, 1.0))
        scores.append(value)
        heat[region] = -np.inf
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float64)


def _connected(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of ``mask [gy, gx]`` that holds ``seed``."""
    region = np.zeros_like(mask)
    stack = [seed]
    while stack:
        y, x = stack.pop()
        if region[y, x] or not mask[y, x]:
            continue
        region[y, x] = True
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ny, nx = y + dy, x + dx
            if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]:
                stack.append((ny, nx))
    return region
