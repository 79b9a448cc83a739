"""Matching evaluators: what the contrastive losses train, scored as retrieval.

- ``retrieval``: image↔report recall@K and median rank, both directions, on ``zimg, ztxt
  [N, D]``; reports with the same tokens (e.g. normal studies) are all correct matches.
- ``regions``: region↔caption matching within each image and across the split (fine-grained
  lesion-description retrieval), on ``zroi, zcap [N, R, D]``.
- ``modality_gap``: the distance between the centroids of the image and report embeddings on
  the sphere, and their PCA.

Each kind's evaluator is ``run_<kind>(emb, *, ctx) → metrics`` and ``plot_<kind>(emb, path,
*, ctx)`` (``emb``: the arrays of :func:`embeddings.embed_split`).
"""

import numpy as np

from region_medclip.evaluators import plots


def ranks_of_positives(similarity: np.ndarray, positives: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of the best-ranked positive of each query.

    Args:
      similarity: ``[Q, N]`` query × gallery scores.
      positives: ``[Q, N]`` bool; default: the diagonal (query i matches item i).

    Returns:
      ``[Q]`` int ranks; a positive tied with negatives gets the pessimistic rank (ties are not
      counted in the model's favour).
    """
    similarity = np.asarray(similarity, np.float64)
    if positives is None:
        positives = np.eye(*similarity.shape, dtype=bool)
    best_positive = np.where(positives, similarity, -np.inf).max(axis=1)
    # Items scoring at least as high as the best positive, that are not positives.
    beaten_by = ((similarity >= best_positive[:, None]) & ~positives).sum(axis=1)
    return beaten_by + 1


def same_text_positives(texts: np.ndarray) -> np.ndarray:
    """``[N, L]`` token ids of the reports → ``[N, N]`` bool: report j is a correct match for
    image i when its token sequence equals report i's (e.g. identical normal studies).

    Decided on the tokens, never on the embeddings: a text tower that maps different reports to
    the same point must not have them counted as matches of each other.
    """
    texts = np.asarray(texts).reshape(len(texts), -1)
    _, text_id = np.unique(texts, axis=0, return_inverse=True)
    text_id = text_id.reshape(-1)
    return text_id[:, None] == text_id[None, :]


def recall_at_k(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose positive ranks within the top k, for each k."""
    ranks = np.asarray(ranks)
    return {k: float(np.mean(ranks <= k)) for k in ks}


def retrieval_metrics(
    zimg: np.ndarray, ztxt: np.ndarray, positives: np.ndarray | None = None, ks=(1, 5, 10)
) -> dict[str, float]:
    """``zimg [N, D]``, ``ztxt [M, D]`` (L2-normalised); ``positives [N, M]`` (default diagonal).

    Returns ``i2t/R@k``, ``t2i/R@k``, ``i2t/median_rank``, ``t2i/median_rank``.
    """
    similarity = np.asarray(zimg) @ np.asarray(ztxt).T
    out = {}
    for name, sim, pos in (
        ("i2t", similarity, positives),
        ("t2i", similarity.T, None if positives is None else positives.T),
    ):
        ranks = ranks_of_positives(sim, pos)
        out.update({f"{name}/R@{k}": v for k, v in recall_at_k(ranks, ks).items()})
        out[f"{name}/median_rank"] = float(np.median(ranks))
    return out


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
    out = retrieval_metrics(rois, caps, positives, ks)
    out = {k.replace("i2t", "r2c").replace("t2i", "c2r"): v for k, v in out.items()}
    out["r2c/top1"] = out["r2c/R@1"]
    return out


def modality_gap(zimg: np.ndarray, ztxt: np.ndarray) -> float:
    """Euclidean distance between the centroids of ``zimg [N, D]`` and ``ztxt [M, D]``
    (L2-normalised embeddings; 0 when the two clouds share a centre, up to 2)."""
    return float(np.linalg.norm(np.mean(zimg, axis=0) - np.mean(ztxt, axis=0)))


def both_ranks(similarity: np.ndarray, positives: np.ndarray, names: tuple[str, str]) -> dict:
    """``similarity, positives [Q, N]`` → ``{names[0]: ranks [Q], names[1]: ranks [N]}``: the
    1-based rank of each query's best positive, rows against columns and back."""
    forward, backward = names
    return {
        forward: ranks_of_positives(similarity, positives),
        backward: ranks_of_positives(similarity.T, positives.T),
    }


def run_retrieval(emb: dict[str, np.ndarray], *, ctx) -> dict[str, float]:
    """The ``retrieval`` evaluator: :func:`retrieval_metrics` of ``emb["zimg"]`` against
    ``emb["ztxt"]`` (``[N, D]``), every report with the same ``emb["texts"] [N, L]`` a match."""
    del ctx
    same_text = same_text_positives(emb["texts"])
    return retrieval_metrics(emb["zimg"], emb["ztxt"], same_text)


def plot_retrieval(emb: dict[str, np.ndarray], path: str, *, ctx) -> None:
    """Recall@K curves of image→report and report→image retrieval."""
    same_text = same_text_positives(emb["texts"])
    similarity = emb["zimg"] @ emb["ztxt"].T
    ranks = both_ranks(similarity, same_text, ("image→report", "report→image"))
    plots.plot_recall(ranks, path, title=f"retrieval, {len(similarity)} {ctx.split} pairs")


def run_regions(emb: dict[str, np.ndarray], *, ctx) -> dict[str, float]:
    """The ``regions`` evaluator: :func:`split_retrieval` over the valid ROIs of the split
    (``emb["roi_mask"] [N, R]``; captions equal by ``emb["cap_ids"] [N, R]`` also match), and
    :func:`within_image_top1` / :func:`within_image_top1_multi`."""
    del ctx
    zroi, zcap, roi_mask = emb["zroi"], emb["zcap"], emb["roi_mask"]
    out = split_retrieval(zroi, zcap, roi_mask, emb["cap_ids"])
    out["within_image_top1"] = within_image_top1(zroi, zcap, roi_mask)
    out["within_image_top1_multi"] = within_image_top1_multi(zroi, zcap, roi_mask)
    return out


def plot_regions(emb: dict[str, np.ndarray], path: str, *, ctx) -> None:
    """Recall@K curves of region→caption and caption→region matching over the split."""
    del ctx
    valid = emb["roi_mask"].astype(bool)
    zroi, zcap = emb["zroi"][valid], emb["zcap"][valid]
    ids = emb["cap_ids"][valid]
    positives = ids[:, None] == ids[None, :]  # the same caption text elsewhere also counts
    ranks = both_ranks(zroi @ zcap.T, positives, ("region→caption", "caption→region"))
    plots.plot_recall(ranks, path, title=f"region matching, {len(zroi)} regions")


def run_modality_gap(emb: dict[str, np.ndarray], *, ctx) -> dict[str, float]:
    """The ``modality_gap`` evaluator: ``{"gap": float}`` of ``emb["zimg"], emb["ztxt"]``."""
    del ctx
    return {"gap": modality_gap(emb["zimg"], emb["ztxt"])}


def plot_modality_gap(emb: dict[str, np.ndarray], path: str, *, ctx) -> None:
    """The image and report embeddings on their first two principal components."""
    del ctx
    plots.plot_pca(emb["zimg"], emb["ztxt"], path)
