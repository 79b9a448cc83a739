"""Lesion-description retrieval without boxes: a description ranks every film of a split.

Each distinct finding caption of the split ("small nodule in the right upper zone") is a query.
A film's score for it is its best proposal's (:mod:`.detect`: the same boxes and calibrated
scores as detection, with the caption as the phrase), so no box is given at any point. Two
recalls at K: that a film holding the described finding (a box with that very caption) is among
the K best, and that it is there *with the right box*, its best proposal at IoU ≥ 0.4 with the
described box. The second is what a radiologist searching an archive for "a small nodule in the
right upper zone" needs: the film, and where on it.
"""

import numpy as np

from region_medclip.evaluators import detect

KS = (1, 5, 10)
IOU = 0.4  # VinDr-CXR's threshold, as the detection evaluator's headline mAP


def queries(emb, no_finding: int) -> tuple[np.ndarray, np.ndarray]:
    """The split's distinct finding captions: ``(cap_ids [Q], zcap [Q, D])``, each caption's
    embedding taken from its first box (equal captions have equal ids and embeddings). Boxes
    of the ``no_finding`` class (clear regions) are no lesion."""
    finding = emb["roi_mask"].astype(bool) & (emb["box_labels"] != no_finding)
    ids = emb["cap_ids"][finding]
    zcap = emb["zcap"][finding]
    unique, first = np.unique(ids, return_index=True)
    return unique, zcap[first]


def best_per_query(found: list, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """``found`` (one :class:`detect.Detections` a film, phrases = queries) → ``scores [N, Q]``
    of each film's best box for each query (−inf: none) and those ``boxes [N, Q, 4]``."""
    scores = np.full((len(found), num_queries), -np.inf)
    boxes = np.zeros((len(found), num_queries, 4), np.float32)
    for i, film in enumerate(found):
        for k in np.argsort(film.scores, kind="stable"):  # the best written last
            scores[i, film.phrases[k]] = film.scores[k]
            boxes[i, film.phrases[k]] = film.boxes[k]
    return scores, boxes


def recalls(
    scores: np.ndarray,
    boxes: np.ndarray,
    query_ids: np.ndarray,
    roi_boxes: np.ndarray,
    roi_ids: np.ndarray,
    roi_valid: np.ndarray,
    ks=KS,
    iou: float = IOU,
) -> dict[str, float]:
    """Recall at each K of films, and of films with the right box, over the queries.

    Args:
      scores: ``[N, Q]`` each film's score for each query (−inf: nothing found, never counted
        as retrieved).
      boxes: ``[N, Q, 4]`` the box behind each score.
      query_ids: ``[Q]`` the caption id of each query.
      roi_boxes, roi_ids, roi_valid: ``[N, R, 4]``, ``[N, R]``, ``[N, R]`` the split's boxes,
        their caption ids and which are real findings.

    Returns:
      ``films_R@K``, ``box_R@K`` and ``queries`` (Q).
    """
    if not len(query_ids):
        return no_queries(ks)
    holds = roi_valid[:, None, :] & (roi_ids[:, None, :] == query_ids[None, :, None])  # [N,Q,R]
    relevant = holds.any(-1)
    overlap = np.zeros(holds.shape)
    for i in range(len(scores)):
        if holds[i].any():
            overlap[i] = detect.box_iou(boxes[i], roi_boxes[i])  # [Q, R]
    right = (holds & (overlap >= iou)).any(-1)
    order = np.argsort(-scores, axis=0, kind="stable")  # [N, Q] films, best first
    out = {"queries": float(len(query_ids))}
    for k in ks:
        top = order[:k]  # [k, Q]
        found = np.take_along_axis(np.isfinite(scores), top, 0)
        films = np.take_along_axis(relevant, top, 0) & found
        with_box = np.take_along_axis(right, top, 0) & found
        out[f"films_R@{k}"] = float(films.any(0).mean())
        out[f"box_R@{k}"] = float(with_box.any(0).mean())
    return out


def no_queries(ks=KS) -> dict[str, float]:
    """The keys of :func:`recalls` for a split without a finding: 0 queries, NaN recalls."""
    out = {"queries": 0.0}
    for k in ks:
        out[f"films_R@{k}"] = out[f"box_R@{k}"] = float("nan")
    return out
