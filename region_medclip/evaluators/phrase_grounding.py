"""MS-CXR phrase grounding as BioViL reports it, and the evaluator of kind ``phrase_grounding``
(:func:`run`, :func:`plot`).

Protocol: Boecking et al., "Making the Most of Text Semantics to Improve Biomedical
Vision–Language Processing", ECCV 2022 (arXiv:2204.09817), the MS-CXR phrase-grounding
evaluation of its local-alignment experiments; the similarity map as built by its public code,
``hi-ml-multimodal/src/health_multimodal/vlp/inference_engine.py`` in github.com/microsoft/hi-ml
(``ImageTextInferenceEngine``). That repository ships no CNR or mIoU code, so the metric details
below come from the paper's definitions; where neither says, the choice is ours and is marked so.

- **Phrase**: the ROIs of one image that share a caption (``cap_ids``); its ground truth is the
  union of their boxes. Its category is its first ROI's ``box_labels`` (ours: a phrase's rows
  are expected to name one category). Boxes of the "no finding" class are not phrases.
- **Map**: the phrase embedding against the image's patch cells, a ``grid × grid`` map of
  cosine similarities in [−1, 1] (both towers L2-normalise), upsampled bilinearly
  (:func:`grounding.upsample`; hi-ml's grounding notebook asks for bilinear with half-pixel
  centres, its engine's default being nearest). It
  is not rescaled: hi-ml's engine returns the raw cosine map and draws it on a fixed [−1, 1]
  colour scale with isolines at fixed positive levels, so the mIoU thresholds are cosine values.
  (CNR would not notice an affine rescaling anyway; mIoU would.) hi-ml's engine also smooths the
  patch map with a Gaussian of σ = 1.5 cells before upsampling; this map is left unsmoothed, as
  in :mod:`grounding`.
- **Image area**: hi-ml leaves the pixels its network never saw out of the map (NaN); here the
  evaluation images are letterboxed, so only pixels whose centre lies in ``emb["image_box"]``
  count, inside and outside alike. Without ``image_box`` the whole frame is image.
- **CNR** = |μ_in − μ_out| / sqrt(σ²_in + σ²_out) over the image area, in the paper's notation
  with A the boxes' interior and Ā its exterior. The variances are population variances (ddof 0,
  as :func:`grounding.cnr`): the paper does not say, and the two differ by a factor n / (n − 1),
  under 1% at the hundreds of pixels of a region.
- **mIoU**: IoU of the union mask with the map thresholded on the image area, averaged over the
  thresholds 0.1, …, 0.5 (``thresholds``: the range public re-implementations of the protocol
  use; we could not read the paper's own list, so it is an option). Ours: a pixel is predicted
  at ≥ t, and a threshold no pixel reaches scores 0 rather than being skipped.
- **Aggregation**: each metric averaged over the phrases of each MS-CXR category, then over the
  categories (macro: each category weighs the same, whatever its count of phrases). Ours:
  phrases whose boxes cover none or all of the image area have no CNR and are left out.

Beside them, under their own names, the project's per-box metrics of :mod:`grounding` (signed
CNR and pointing game on the whole frame, one box at a time), so one table holds both.
"""

from collections.abc import Sequence

import numpy as np

from region_medclip.evaluators import grounding, plots

# The keys of ``config.evals.<name>`` this evaluator reads, with their defaults.
OPTIONS = dict(
    thresholds=(0.1, 0.2, 0.3, 0.4, 0.5),  # mIoU thresholds on the cosine map
    tolerance=0.0,  # pointing-game tolerance in pixels for the per-box game (0: strict only)
)


def contrast_to_noise(
    heatmap: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None
) -> float:
    """|μ_in − μ_out| / sqrt(σ²_in + σ²_out) of ``heatmap [H, W]`` inside vs outside
    ``mask [H, W]``, counting only pixels where ``valid [H, W]`` (default all); NaN if either
    region is empty."""
    valid = np.ones(mask.shape, bool) if valid is None else valid
    # The signed ratio of grounding.cnr on the image-area pixels only; its magnitude is BioViL's.
    return abs(grounding.cnr(heatmap[valid], mask[valid]))


def mean_iou(
    heatmap: np.ndarray,
    mask: np.ndarray,
    thresholds: Sequence[float],
    valid: np.ndarray | None = None,
) -> float:
    """Mean over ``thresholds`` of the IoU between ``mask [H, W]`` and the pixels where
    ``heatmap [H, W] ≥ t``, both restricted to ``valid [H, W]`` (default all). NaN if the mask
    has no valid pixel or no thresholds are given."""
    valid = np.ones(mask.shape, bool) if valid is None else valid
    truth = mask & valid
    if not truth.any() or not len(thresholds):
        return float("nan")
    scores = []
    for t in thresholds:
        predicted = (heatmap >= t) & valid
        scores.append(np.sum(predicted & truth) / np.sum(predicted | truth))
    return float(np.mean(scores))


def image_area(emb: dict[str, np.ndarray], i: int, size: int) -> np.ndarray:
    """``[size, size]`` bool: the pixels of image ``i``'s frame whose centre lies in its
    content, ``emb["image_box"] [N, 4]`` normalised xyxy (the whole frame without it)."""
    if "image_box" not in emb:
        return np.ones((size, size), bool)
    return grounding.boxes_mask(np.asarray(emb["image_box"][i])[None] * size, size, size)


def phrases(emb: dict[str, np.ndarray], no_finding: int = -1) -> list[tuple[int, np.ndarray]]:
    """Each phrase as ``(image index, ROI indices [k])``: the ROIs of :func:`grounding.phrase_mask`
    of one image that share ``emb["cap_ids"] [N, R]`` (each ROI alone without ``cap_ids``), in
    order of first appearance."""
    keep = grounding.phrase_mask(emb, no_finding)
    out = []
    for i in np.flatnonzero(keep.any(axis=1)):
        rois = np.flatnonzero(keep[i])
        if "cap_ids" not in emb:
            out.extend((int(i), rois[k : k + 1]) for k in range(len(rois)))
            continue
        ids = np.asarray(emb["cap_ids"])[i, rois]
        out.extend((int(i), rois[ids == caption]) for caption in dict.fromkeys(ids.tolist()))
    return out


def _phrase_map(
    emb: dict[str, np.ndarray], i: int, rois: np.ndarray, grid: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(heatmap, union mask, image area)``, each ``[S, S]``, of one phrase."""
    size = emb["images"].shape[1]
    # Every ROI of a phrase carries the same caption, so any one's embedding is the phrase's.
    heat = grounding._heatmap(emb, i, int(rois[0]), grid)
    mask = grounding.boxes_mask(np.asarray(emb["boxes"])[i, rois] * size, size, size)
    return heat, mask, image_area(emb, i, size)


def _macro(
    scores: dict[str, list[float]], categories: list[int], names: Sequence[str]
) -> dict[str, float]:
    """Per-category means of each ``scores[metric] [P]`` (phrase p in ``categories[p]``) as
    ``<metric>/<name>``, and their mean over the categories present as ``<metric>``."""
    out = {}
    present = sorted(set(categories))
    labels = np.asarray(categories)
    for metric, values in scores.items():
        values = np.asarray(values, np.float64)
        means = [float(values[labels == c].mean()) for c in present]
        out[metric] = float(np.mean(means)) if means else float("nan")
        out.update({f"{metric}/{names[c]}": m for c, m in zip(present, means, strict=True)})
    return out


def phrase_grounding_metrics(
    emb: dict[str, np.ndarray],
    *,
    grid: int,
    class_names: Sequence[str],
    thresholds: Sequence[float] = OPTIONS["thresholds"],
    tolerance: float = 0.0,
    no_finding: int = -1,
) -> dict[str, float]:
    """BioViL's CNR and mIoU per phrase, macro-averaged over categories (module docstring), with
    the per-box metrics of :func:`grounding.grounding_metrics` beside them.

    ``emb``: ``images [N, S, S]``, ``zpatch [N, grid², D]``, ``zcap [N, R, D]``, ``boxes
    [N, R, 4]`` normalised xyxy, ``roi_mask [N, R]``, ``box_labels [N, R]`` (indices into
    ``class_names``), ``cap_ids [N, R]`` and optionally ``image_box [N, 4]``.

    Returns: ``cnr``, ``miou`` (macro over categories), ``cnr/<name>``, ``miou/<name>`` for each
    category with a phrase, ``phrases`` and ``categories`` (how many were scored),
    ``signed_cnr``, ``pointing_game`` (and ``pointing_game@<t>px`` with ``tolerance > 0``), the
    per-box means, and ``boxes``, how many boxes those scored. Phrases whose category is not one
    of ``class_names`` are left out.
    """
    scores: dict[str, list[float]] = {"cnr": [], "miou": []}
    categories = []
    for i, rois in phrases(emb, no_finding):
        category = int(emb["box_labels"][i, rois[0]])
        if not 0 <= category < len(class_names):
            continue
        heat, mask, valid = _phrase_map(emb, i, rois, grid)
        if not (mask & valid).any() or not (valid & ~mask).any():
            continue  # no inside (or no outside) on the image: CNR undefined
        scores["cnr"].append(contrast_to_noise(heat, mask, valid))
        scores["miou"].append(mean_iou(heat, mask, thresholds, valid))
        categories.append(category)
    out = _macro(scores, categories, class_names)
    out["phrases"] = float(len(categories))
    out["categories"] = float(len(set(categories)))
    per_box = grounding.grounding_metrics(
        emb, grid=grid, threshold=0.5, tolerance=tolerance, no_finding=no_finding
    )
    out["signed_cnr"] = per_box["cnr"]
    out.update({k: v for k, v in per_box.items() if k.startswith("pointing_game")})
    out["boxes"] = per_box["phrases"]
    return out


def run(emb: dict[str, np.ndarray], *, ctx, thresholds, tolerance) -> dict[str, float]:
    """The ``phrase_grounding`` evaluator: :func:`phrase_grounding_metrics` on the ``ctx.grid``
    patch cells, categories named by ``ctx.dataset.class_names()``, its "no finding" boxes
    left out."""
    return phrase_grounding_metrics(
        emb,
        grid=ctx.grid,
        class_names=ctx.dataset.class_names(),
        thresholds=tuple(thresholds),
        tolerance=tolerance,
        no_finding=ctx.dataset.no_finding_index(),
    )


def _caption(tokenizer, ids: np.ndarray) -> str:
    """Token ``ids [L]`` → text, without the pad, BOS and EOS ids."""
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    return tokenizer.tokenizer.decode([int(t) for t in ids if t not in specials])


def plot(
    emb: dict[str, np.ndarray], path: str, *, ctx, thresholds, tolerance, count: int = 8
) -> None:
    """The maps of the first ``count`` phrases over their images, every box of the phrase
    outlined, the padding band left uncoloured; titled with the phrase and its category
    (``thresholds`` and ``tolerance`` unused: the maps are drawn unthresholded)."""
    del thresholds, tolerance
    names = ctx.dataset.class_names()
    picks = [
        (i, rois)
        for i, rois in phrases(emb, ctx.dataset.no_finding_index())
        if 0 <= int(emb["box_labels"][i, rois[0]]) < len(names)
    ][:count]
    size = emb["images"].shape[1]
    panels = []
    for i, rois in picks:
        heat, _, valid = _phrase_map(emb, i, rois, ctx.grid)
        title = _caption(ctx.text.tokenizer, emb["captions"][i, rois[0]])
        category = names[int(emb["box_labels"][i, rois[0]])]
        boxes = np.asarray(emb["boxes"])[i, rois] * size
        panels.append((emb["images"][i], np.where(valid, heat, np.nan), boxes, title, category))
    _plot_panels(panels, path)


def _plot_panels(panels: list[tuple], path: str) -> None:
    """Draws ``(image [S, S], heatmap [S, S], boxes [k, 4] pixel xyxy, title, category)``
    panels, four a row, and saves them as a PNG (an empty figure when there are none)."""
    plt = plots._pyplot()
    columns = max(1, min(4, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, heat, boxes, title, category) in zip(axes.flat, panels, strict=False):
        ax.imshow(image, cmap="gray")
        # The fixed cosine range, as hi-ml draws its maps, so panels compare with one another.
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=-1.0, vmax=1.0)
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(
                plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1.5)
            )
        ax.set_title(f"{title}\n({category})", fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
