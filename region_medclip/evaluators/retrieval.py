"""Image↔report retrieval metrics: recall@K and median rank, both directions."""

import numpy as np


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
