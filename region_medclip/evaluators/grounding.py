"""Phrase-grounding metrics on a heatmap and ground-truth boxes (MS-CXR format: pixel xyxy)."""

import numpy as np


def boxes_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``boxes [K, 4]`` pixel ``xyxy`` → ``[height, width]`` bool, True on pixels whose centre
    lies in any box."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        mask |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return mask


def upsample(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a ``[h, w]`` patch-level map to ``[height, width]`` (pixel centres
    aligned, edges clamped)."""
    heatmap = np.asarray(heatmap, np.float64)
    h, w = heatmap.shape

    def coords(out, size):
        x = (np.arange(out) + 0.5) * size / out - 0.5
        x = np.clip(x, 0, size - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, size - 1)
        return lo, hi, x - lo

    y0, y1, fy = coords(height, h)
    x0, x1, fx = coords(width, w)
    top = heatmap[y0][:, x0] * (1 - fx) + heatmap[y0][:, x1] * fx
    bottom = heatmap[y1][:, x0] * (1 - fx) + heatmap[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def cnr(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Contrast-to-noise ratio ``(μ_in − μ_out) / sqrt(σ²_in + σ²_out)`` of ``heatmap [H, W]``
    inside vs outside ``mask [H, W]`` (NaN if either region is empty)."""
    inside, outside = heatmap[mask], heatmap[~mask]
    if inside.size == 0 or outside.size == 0:
        return float("nan")
    denominator = np.sqrt(inside.var() + outside.var())
    return float((inside.mean() - outside.mean()) / max(denominator, 1e-12))


def pointing_game(heatmap: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> float:
    """1.0 if the heatmap's maximum (the first, in row-major order) falls inside ``mask``, or
    within ``tolerance`` pixels of it (Euclidean, between pixel centres), else 0.0.

    Zhang et al.'s pointing game ("Top-down neural attention by excitation backprop", 2016)
    allows 15 px at ~224 px. It matters for patch-level heatmaps: the maximum of a bilinearly
    upsampled ``[h, w]`` map sits at a patch centre, so with ``tolerance=0`` a box that holds no
    patch centre can never be hit, however good the map.
    """
    index = int(np.argmax(heatmap))
    if tolerance <= 0:
        return float(mask.reshape(-1)[index])
    y, x = divmod(index, heatmap.shape[1])
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return 0.0
    return float(np.min((ys - y) ** 2 + (xs - x) ** 2) <= tolerance**2)


def iou_at_threshold(heatmap: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU between ``mask`` and the pixels whose min–max normalised heatmap is ≥ ``threshold``."""
    low, high = heatmap.min(), heatmap.max()
    normalised = (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)
    predicted = normalised >= threshold
    union = np.sum(predicted | mask)
    return float(np.sum(predicted & mask) / union) if union else float("nan")
