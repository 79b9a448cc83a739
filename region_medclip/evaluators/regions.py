"""Region↔caption matching and fine-grained lesion-description retrieval."""

import numpy as np

from region_medclip.evaluators import retrieval


def within_image_top1(zroi: np.ndarray, zcap: np.ndarray, roi_mask: np.ndarray) -> float:
    """Top-1 accuracy of each valid ROI among the captions of its own image.

    Args:
      zroi, zcap: ``[n, R, D]`` L2-normalised ROI and caption embeddings (caption r describes ROI
        r).
      roi_mask: ``[n, R]`` bool.

    Images with a single ROI are counted too (their ROI is trivially right); use
    :func:`within_image_top1_multi` for images with at least two.
    """
    scores = np.einsum("nrd,ncd->nrc", zroi, zcap)
    scores = np.where(roi_mask[:, None, :], scores, -np.inf)  # only the image's real captions
    hit = scores.argmax(-1) == np.arange(zroi.shape[1])[None, :]
    return float(hit[roi_mask].mean()) if roi_mask.any() else float("nan")


def within_image_top1_multi(zroi, zcap, roi_mask) -> float:
    """:func:`within_image_top1` over images with two or more ROIs only."""
    multi = roi_mask.sum(1) >= 2
    if not multi.any():
        return float("nan")
    return within_image_top1(zroi[multi], zcap[multi], roi_mask[multi])


def split_retrieval(
    zroi: np.ndarray,
    zcap: np.ndarray,
    roi_mask: np.ndarray,
    cap_ids: np.ndarray | None = None,
    ks=(1, 5, 10),
) -> dict[str, float]:
    """Each valid ROI against every valid caption of the split (and back).

    A caption with the same ``cap_ids`` as the ROI's own (the same text elsewhere in the split)
    also counts as a hit: it describes the ROI equally well.

    Returns ``r2c/R@k``, ``c2r/R@k``, medians, and ``r2c/top1`` (= ``r2c/R@1``).
    """
    rois, caps = zroi[roi_mask], zcap[roi_mask]
    positives = np.eye(len(rois), dtype=bool)
    if cap_ids is not None:
        ids = cap_ids[roi_mask]
        positives |= ids[:, None] == ids[None, :]
    out = retrieval.retrieval_metrics(rois, caps, positives, ks)
    out = {k.replace("i2t", "r2c").replace("t2i", "c2r"): v for k, v in out.items()}
    out["r2c/top1"] = out["r2c/R@1"]
    return out
