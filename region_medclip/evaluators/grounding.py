"""Phrase grounding: metrics of a heatmap against ground-truth boxes (MS-CXR format: pixel
xyxy), and the evaluator of kind ``grounding`` (:func:`run`, :func:`plot`).

Each finding ROI's caption is the phrase; its heatmap is its similarity to every patch cell of
the image (``emb["zpatch"] [N, grid², D]``), upsampled bilinearly to the image.
"""

import numpy as np

from region_medclip.evaluators import plots

# The keys of ``config.evals.<name>`` this evaluator reads, with their defaults.
OPTIONS = dict(
    threshold=0.5,  # IoU of the heatmap thresholded at this fraction of its min-max range
    tolerance=0.0,  # pointing-game tolerance in pixels (0: the maximum in the box)
)


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


def phrase_mask(emb: dict[str, np.ndarray], no_finding: int = -1) -> np.ndarray:
    """``[N, R]`` the ROIs whose captions are grounded: valid boxes of a finding. Boxes of clear
    regions (``box_labels [N, R]`` equal to ``no_finding``, the dataset's "no finding" class,
    as in synth_cxr) are not phrases to ground, as MS-CXR grounds findings only; -1: none."""
    keep = emb["roi_mask"].astype(bool)
    if no_finding >= 0:
        keep = keep & (emb["box_labels"] != no_finding)
    return keep


def _heatmap(emb: dict[str, np.ndarray], i: int, r: int, grid: int) -> np.ndarray:
    """``[S, S]``: ROI ``r`` of image ``i``'s caption against the image's patch cells."""
    size = emb["images"].shape[1]
    heat = (emb["zpatch"][i] @ emb["zcap"][i, r]).reshape(grid, grid)
    return upsample(heat, size, size)


def grounding_metrics(
    emb: dict[str, np.ndarray],
    *,
    grid: int,
    threshold: float,
    tolerance: float = 0.0,
    no_finding: int = -1,
) -> dict[str, float]:
    """CNR, pointing game and IoU of the thresholded heatmap with the box, each the mean over
    the phrases of :func:`phrase_mask`. With ``tolerance > 0`` (pixels) the pointing game is also
    reported with that tolerance, as ``pointing_game@<tolerance>px``.

    ``emb``: ``images [N, S, S]``, ``zpatch [N, grid², D]``, ``zcap [N, R, D]``, ``boxes
    [N, R, 4]`` normalised xyxy, ``roi_mask [N, R]`` (and ``box_labels [N, R]`` with
    ``no_finding ≥ 0``).
    """
    size = emb["images"].shape[1]
    scores = {"cnr": [], "pointing_game": [], f"miou@{threshold}": []}
    tolerant = f"pointing_game@{tolerance:g}px"
    if tolerance > 0:
        scores[tolerant] = []
    for i, r in zip(*np.nonzero(phrase_mask(emb, no_finding)), strict=True):
        heat = _heatmap(emb, i, r, grid)
        mask = boxes_mask(emb["boxes"][i, r][None] * size, size, size)
        if not mask.any() or mask.all():
            continue
        scores["cnr"].append(cnr(heat, mask))
        scores["pointing_game"].append(pointing_game(heat, mask))
        if tolerance > 0:
            scores[tolerant].append(pointing_game(heat, mask, tolerance))
        scores[f"miou@{threshold}"].append(iou_at_threshold(heat, mask, threshold))
    out = {k: float(np.nanmean(v)) if v else float("nan") for k, v in scores.items()}
    out["phrases"] = float(len(scores["cnr"]))
    return out


def run(emb: dict[str, np.ndarray], *, ctx, threshold, tolerance) -> dict[str, float]:
    """The ``grounding`` evaluator: :func:`grounding_metrics` on the ``ctx.grid`` patch cells,
    boxes of ``ctx.dataset``'s "no finding" class left out."""
    return grounding_metrics(
        emb,
        grid=ctx.grid,
        threshold=threshold,
        tolerance=tolerance,
        no_finding=ctx.dataset.no_finding_index(),
    )


def plot(
    emb: dict[str, np.ndarray], path: str, *, ctx, threshold, tolerance, count: int = 8
) -> None:
    """The heatmaps of the first ``count`` phrases over their images, titled with the phrase
    (``threshold`` and ``tolerance`` unused: the maps are drawn unthresholded)."""
    del threshold, tolerance
    picks = list(zip(*np.nonzero(phrase_mask(emb, ctx.dataset.no_finding_index())), strict=True))
    picks = picks[:count]
    size = emb["images"].shape[1]
    images = np.stack([emb["images"][i] for i, _ in picks])
    heats = np.stack([_heatmap(emb, i, r, ctx.grid) for i, r in picks])
    boxes = np.stack([emb["boxes"][i, r] * size for i, r in picks])
    tokenizer = ctx.text.tokenizer
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    titles = [
        tokenizer.tokenizer.decode([int(t) for t in emb["captions"][i, r] if t not in specials])
        for i, r in picks
    ]
    plots.plot_grounding(images, heats, boxes, titles, path)
