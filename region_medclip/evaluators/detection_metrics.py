"""Detection metrics for a lesion detector, on the host in numpy: COCO-style AP and FROC.

Inputs are per image, as length-``N`` sequences (one entry per image, images without findings
included): ground truth ``gt_boxes[i] [G_i, 4]`` with ``gt_classes[i] [G_i]``, detections
``det_boxes[i] [K_i, 4]`` with ``det_scores[i] [K_i]`` and ``det_classes[i] [K_i]``. Boxes are
pixel ``(x1, y1, x2, y2)`` in continuous coordinates: a box's area is ``(x2 - x1) * (y2 - y1)``
(no +1, as in current pycocotools); an inverted box (``x2 < x1``) overlaps nothing. Class ids are
``0 .. C - 1``.

**Average precision** (:func:`average_precision`, :func:`detection_map`) is COCO's, and equals
pycocotools' ``COCOeval`` (bbox, ``useCats=1``, one area range holding every box, ``maxDets`` at
least the most detections of one class in one image) to rounding:

- Matching, per image and class: detections in descending score, each takes the unmatched ground
  truth with the highest IoU ≥ the threshold (IoU equal to the threshold matches); among equally
  good ground truths the last one in input order (COCOeval replaces its best on ``>=``). A second
  detection of a matched lesion is a false positive; so is a detection of the wrong class.
- Order, per class over all images: descending score; ties by image, then by the detection's
  position in its image (COCOeval's stable sorts, images in input order).
- Precision at each rank is made monotone (its upper envelope from the right) and read at COCO's
  101 recall points ``np.linspace(0, 1, 101)`` — at the first rank whose recall reaches the point,
  0 past the highest recall; AP is the mean of the 101 values.
- No crowd or ignored boxes, and no per-image cap on detections (COCO's default caps at 100 per
  image and class; cap the detector's output to reproduce it).
- A class without ground truth has AP NaN (COCOeval's -1): it is left out of the macro mean and
  counted in ``map/classes_without_gt``; its detections do not count against any other class.
- ``map@0.4`` is VinDr-CXR's challenge metric; ``map@0.5:0.95`` averages COCO's ten thresholds
  ``np.linspace(0.5, 0.95, 10)`` (the same floats as COCOeval's, so that IoUs on a threshold
  compare alike).

**FROC** (:func:`froc_curve`, :func:`froc`) is lesion-level, pooled over classes: sensitivity is
the fraction of all ground-truth boxes (every class together) that some detection hits, against
the average number of false positives per image (over all ``N`` images). A detection hits a
lesion of its own class (any class with ``class_agnostic``) when their IoU ≥ ``iou_threshold``
(default 0.4, as the VinDr-CXR mAP), or with ``hit="centre"`` when the detection's box centre lies
in the lesion's box (edges included), the box analogue of LUNA16's candidate within the nodule's
radius and CAMELYON16's detection inside the tumour region. As in those two challenges, further
hits on a lesion count once and are not false positives; a false positive is a detection hitting
no lesion. ``one_to_one=True`` instead matches greedily as AP does, so a second hit of a lesion
is a false positive (it penalises duplicates that NMS left).

Operating points are the distinct detection scores (a threshold cannot split tied scores). The
sensitivity at ``f`` false positives per image is the highest sensitivity reachable with at most
``f · N`` false positives in total: a step function, so every reported value is a real threshold's
(LUNA16's and CAMELYON16's scripts interpolate linearly between thresholds instead). The FROC
score is the mean sensitivity at ``fps_per_image``, defaulting to 0.5, 1, 2 and 4 — the averaging
of LUNA16's CPM (Setio et al., Med. Image Anal. 2017, after ANODE09's, Niemeijer et al. 2011; 1/8
to 8 FPs per scan) and of CAMELYON16's FROC score (Bejnordi et al., JAMA 2017; 1/4 to 8 FPs per
slide), at points that suit a few findings per radiograph.
"""

from collections.abc import Sequence

import numpy as np

# COCO's thresholds and recall points, built as COCOeval builds them: the same floats decide the
# same comparisons (np.arange would give 0.6000000000000001 where linspace gives 0.6).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
VINDR_IOU_THRESHOLD = 0.4
FROC_FPS_PER_IMAGE = (0.5, 1.0, 2.0, 4.0)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every pair: ``boxes_a [N, 4]``, ``boxes_b [M, 4]`` xyxy → ``[N, M]`` float64.

    Continuous coordinates (area ``(x2 - x1) * (y2 - y1)``); boxes that do not overlap, touching
    ones and inverted ones included, have IoU 0.
    """
    a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    intersection = np.where((width > 0) & (height > 0), width * height, 0.0)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    # The same order of operations as COCO's bbIou (det area + gt area - intersection).
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(union), where=intersection > 0)


def _centre_inside(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """``[K, 4]``, ``[G, 4]`` → ``[K, G]`` bool: the detection's centre lies in the ground-truth box
    (edges included)."""
    cx = (det_boxes[:, 0] + det_boxes[:, 2])[:, None] / 2
    cy = (det_boxes[:, 1] + det_boxes[:, 3])[:, None] / 2
    g = gt_boxes[None]
    return (g[..., 0] <= cx) & (cx <= g[..., 2]) & (g[..., 1] <= cy) & (cy <= g[..., 3])


def _as_images(gt_boxes, gt_classes, det_boxes, det_scores, det_classes, num_classes=None):
    """Validates the per-image sequences; returns a list of ``(gt_boxes [G, 4], gt_classes [G],
    det_boxes [K, 4], det_scores [K], det_classes [K])`` numpy tuples, one per image."""
    columns = (gt_boxes, gt_classes, det_boxes, det_scores, det_classes)
    if len({len(column) for column in columns}) != 1:
        raise ValueError(f"per-image sequences differ in length: {[len(c) for c in columns]}")
    if not len(gt_boxes):
        raise ValueError("no images")
    images = []
    for i, (gb, gc, db, ds, dc) in enumerate(zip(*columns, strict=True)):
        gb, db = (
            np.asarray(gb, np.float64).reshape(-1, 4),
            np.asarray(db, np.float64).reshape(-1, 4),
        )
        gc, dc = np.asarray(gc, np.int64).reshape(-1), np.asarray(dc, np.int64).reshape(-1)
        ds = np.asarray(ds, np.float64).reshape(-1)
        if len(gb) != len(gc) or not len(db) == len(ds) == len(dc):
            raise ValueError(f"image {i}: boxes, scores and classes differ in length")
        if not np.all(np.isfinite(ds)):
            raise ValueError(f"image {i}: non-finite detection scores")
        classes = np.concatenate([gc, dc])
        if num_classes is not None and np.any((classes < 0) | (classes >= num_classes)):
            raise ValueError(f"image {i}: class ids outside 0..{num_classes - 1}")
        images.append((gb, gc, db, ds, dc))
    return images


def _greedy_match(iou: np.ndarray, allowed: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """COCO's greedy matching in one image, for ``T`` criteria at once.

    Args:
      iou: ``[K, G]`` detection × ground-truth IoU, the quality a detection maximises.
      allowed: ``[T, K, G]`` bool, the pairs that may match under each criterion.
      scores: ``[K]`` detection scores; higher scores choose first, ties in input order.

    Returns:
      ``[T, K]`` int: the ground truth each detection matched, -1 for none.
    """
    num_criteria, num_dets, num_gt = allowed.shape
    matches = np.full((num_criteria, num_dets), -1)
    if num_gt == 0:
        return matches
    taken = np.zeros((num_criteria, num_gt), bool)
    rows = np.arange(num_criteria)
    for k in np.argsort(-scores, kind="stable"):
        candidate = np.where(allowed[:, k] & ~taken, iou[k], -np.inf)
        # The last of equally good ground truths, as COCOeval (it replaces its best on >=).
        best = num_gt - 1 - np.argmax(candidate[:, ::-1], axis=1)
        found = np.isfinite(candidate[rows, best])
        taken[rows[found], best[found]] = True
        matches[found, k] = best[found]
    return matches


def _interpolated_ap(true_positive: np.ndarray, num_gt: int) -> np.ndarray:
    """``[T, D]`` bool, one class's detections in rank order → ``[T]`` COCO AP (101 points)."""
    num_criteria, num_dets = true_positive.shape
    if num_dets == 0:
        return np.zeros(num_criteria)
    tp = np.cumsum(true_positive, axis=1, dtype=np.float64)
    fp = np.cumsum(~true_positive, axis=1, dtype=np.float64)
    recall = tp / num_gt
    # tp + fp is the rank (≥ 1); COCOeval adds np.spacing(1) to it, a 1e-16 relative difference.
    precision = tp / (tp + fp)
    envelope = np.flip(np.maximum.accumulate(np.flip(precision, axis=1), axis=1), axis=1)
    ap = np.empty(num_criteria)
    for t in range(num_criteria):
        first = np.searchsorted(recall[t], RECALL_POINTS, side="left")
        sampled = np.where(first < num_dets, envelope[t, np.minimum(first, num_dets - 1)], 0.0)
        ap[t] = sampled.mean()
    return ap


def average_precision(
    *,
    gt_boxes: Sequence[np.ndarray],
    gt_classes: Sequence[np.ndarray],
    det_boxes: Sequence[np.ndarray],
    det_scores: Sequence[np.ndarray],
    det_classes: Sequence[np.ndarray],
    num_classes: int,
    iou_thresholds: Sequence[float] = (0.5,),
) -> np.ndarray:
    """COCO's per-class AP at each IoU threshold (the module docstring has the definition).

    Args:
      gt_boxes, gt_classes: per image ``[G_i, 4]`` xyxy and ``[G_i]`` class ids.
      det_boxes, det_scores, det_classes: per image ``[K_i, 4]``, ``[K_i]``, ``[K_i]``.
      num_classes: ``C``; class ids are ``0 .. C - 1``.
      iou_thresholds: ``T`` thresholds, e.g. ``(0.5,)`` or :data:`COCO_IOU_THRESHOLDS`.

    Returns:
      ``[T, C]`` AP; NaN for a class without ground truth.
    """
    images = _as_images(gt_boxes, gt_classes, det_boxes, det_scores, det_classes, num_classes)
    # COCOeval's threshold is min(t, 1 - 1e-10): at t = 1 a box equal up to rounding still matches.
    thresholds = np.minimum(np.asarray(iou_thresholds, np.float64), 1 - 1e-10)
    num_gt = np.zeros(num_classes, np.int64)
    scores, classes, image_ids, positions, true_positive = [], [], [], [], []
    for i, (gb, gc, db, ds, dc) in enumerate(images):
        iou = box_iou(db, gb)
        same_class = dc[:, None] == gc[None, :]
        allowed = same_class[None] & (iou[None] >= thresholds[:, None, None])
        true_positive.append(_greedy_match(iou, allowed, ds) >= 0)
        num_gt += np.bincount(gc, minlength=num_classes)
        scores.append(ds)
        classes.append(dc)
        image_ids.append(np.full(len(ds), i))
        positions.append(np.arange(len(ds)))
    scores, classes = np.concatenate(scores), np.concatenate(classes)
    true_positive = np.concatenate(true_positive, axis=1)
    # Descending score; ties by image, then by position within the image (COCOeval's order).
    order = np.lexsort((np.concatenate(positions), np.concatenate(image_ids), -scores))
    ap = np.full((len(thresholds), num_classes), np.nan)
    for c in np.flatnonzero(num_gt):
        ranked = order[classes[order] == c]
        ap[:, c] = _interpolated_ap(true_positive[:, ranked], int(num_gt[c]))
    return ap


def _macro(ap: np.ndarray) -> float:
    """Mean over the classes with ground truth (non-NaN); NaN when there are none."""
    valid = ap[~np.isnan(ap)]
    return float(valid.mean()) if valid.size else float("nan")


def detection_map(
    *,
    gt_boxes: Sequence[np.ndarray],
    gt_classes: Sequence[np.ndarray],
    det_boxes: Sequence[np.ndarray],
    det_scores: Sequence[np.ndarray],
    det_classes: Sequence[np.ndarray],
    class_names: Sequence[str],
) -> dict[str, float]:
    """Per-class and macro AP at IoU 0.4 (VinDr-CXR), 0.5 and 0.5:0.95 (COCO).

    Args: as :func:`average_precision`; ``class_names [C]`` names class ids ``0 .. C - 1``.

    Returns:
      ``map@0.4``, ``map@0.5``, ``map@0.5:0.95`` (macro means over classes with ground truth),
      ``ap@<iou>/<class name>`` for each of the three (NaN for a class without ground truth) and
      ``map/classes_without_gt`` (their count).
    """
    thresholds = np.concatenate([[VINDR_IOU_THRESHOLD], COCO_IOU_THRESHOLDS])
    ap = average_precision(
        gt_boxes=gt_boxes,
        gt_classes=gt_classes,
        det_boxes=det_boxes,
        det_scores=det_scores,
        det_classes=det_classes,
        num_classes=len(class_names),
        iou_thresholds=thresholds,
    )
    # COCO_IOU_THRESHOLDS[0] is exactly 0.5: row 1 is AP@0.5.
    per_iou = {"0.4": ap[0], "0.5": ap[1], "0.5:0.95": ap[1:].mean(axis=0)}
    metrics = {f"map@{iou}": _macro(values) for iou, values in per_iou.items()}
    for iou, values in per_iou.items():
        metrics.update(
            {f"ap@{iou}/{name}": float(v) for name, v in zip(class_names, values, strict=True)}
        )
    metrics["map/classes_without_gt"] = float(np.isnan(ap[0]).sum())
    return metrics


def _froc_scores(images, *, hit, iou_threshold, class_agnostic, one_to_one):
    """Per lesion, the score at which it is first found (-inf if never); the scores of the false
    positives. Returns ``(lesion_scores [L], false_positive_scores [F])`` over all images."""
    lesion_scores, false_positive_scores = [], []
    for gb, gc, db, ds, dc in images:
        iou = box_iou(db, gb)
        hits = iou >= iou_threshold if hit == "iou" else _centre_inside(db, gb)
        if not class_agnostic:
            hits &= dc[:, None] == gc[None, :]
        if one_to_one:
            match = _greedy_match(iou, hits[None], ds)[0]
            found = np.full(len(gb), -np.inf)
            found[match[match >= 0]] = ds[match >= 0]
            is_false_positive = match < 0
        else:
            found = np.where(hits, ds[:, None], -np.inf).max(axis=0, initial=-np.inf)
            is_false_positive = ~hits.any(axis=1)
        lesion_scores.append(found)
        false_positive_scores.append(ds[is_false_positive])
    return np.concatenate(lesion_scores), np.concatenate(false_positive_scores)


def froc_curve(
    *,
    gt_boxes: Sequence[np.ndarray],
    gt_classes: Sequence[np.ndarray],
    det_boxes: Sequence[np.ndarray],
    det_scores: Sequence[np.ndarray],
    det_classes: Sequence[np.ndarray],
    hit: str = "iou",
    iou_threshold: float = VINDR_IOU_THRESHOLD,
    class_agnostic: bool = False,
    one_to_one: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The FROC curve at every operating point (the module docstring has the definition).

    Args:
      gt_boxes, gt_classes, det_boxes, det_scores, det_classes: as :func:`average_precision`.
      hit: ``"iou"`` (IoU ≥ ``iou_threshold``) or ``"centre"`` (detection centre in the lesion).
      iou_threshold: for ``hit="iou"``.
      class_agnostic: a detection of any class may hit a lesion.
      one_to_one: greedy one-to-one matching; repeated hits of a lesion are false positives.

    Returns:
      ``fps_per_image [P + 1]`` and ``sensitivity [P + 1]``, from keeping nothing (0, 0) to
      keeping every detection, one point per distinct score ``P``; sensitivity NaN without
      lesions.
    """
    if hit not in ("iou", "centre"):
        raise ValueError(f"hit must be 'iou' or 'centre', got {hit!r}")
    images = _as_images(gt_boxes, gt_classes, det_boxes, det_scores, det_classes)
    lesions, false_positives = _froc_scores(
        images,
        hit=hit,
        iou_threshold=iou_threshold,
        class_agnostic=class_agnostic,
        one_to_one=one_to_one,
    )
    all_scores = np.concatenate([ds for *_, ds, _ in images])
    cuts = np.unique(all_scores)[::-1]  # keep the detections scoring ≥ cut

    def count_at_least(values):
        return len(values) - np.searchsorted(np.sort(values), cuts, side="left")

    fps = np.concatenate([[0], count_at_least(false_positives)]) / len(images)
    found = np.concatenate([[0], count_at_least(lesions)])
    sensitivity = found / len(lesions) if len(lesions) else np.full(len(found), np.nan)
    return fps, sensitivity


def froc(
    *,
    gt_boxes: Sequence[np.ndarray],
    gt_classes: Sequence[np.ndarray],
    det_boxes: Sequence[np.ndarray],
    det_scores: Sequence[np.ndarray],
    det_classes: Sequence[np.ndarray],
    fps_per_image: Sequence[float] = FROC_FPS_PER_IMAGE,
    **curve_options,
) -> dict[str, float]:
    """Sensitivity at given false positives per image, and their mean (the FROC score).

    Args: as :func:`froc_curve` (``curve_options``: ``hit``, ``iou_threshold``,
      ``class_agnostic``, ``one_to_one``); ``fps_per_image [F]`` the operating points.

    Returns:
      ``froc/sens@<f>fp`` for each ``f`` (``froc/sens@0.5fp``, ``froc/sens@1fp``, ...): the
      highest sensitivity with at most ``f`` false positives per image (a step function, no
      interpolation); ``froc/score``: their mean. NaN without lesions.
    """
    fps, sensitivity = froc_curve(
        gt_boxes=gt_boxes,
        gt_classes=gt_classes,
        det_boxes=det_boxes,
        det_scores=det_scores,
        det_classes=det_classes,
        **curve_options,
    )
    metrics = {}
    for f in fps_per_image:
        # The first point (nothing kept, 0 false positives) is always reachable; the curve is
        # monotone, so the last reachable point has the highest sensitivity.
        reachable = np.flatnonzero(fps <= f)[-1]
        metrics[f"froc/sens@{f:g}fp"] = float(sensitivity[reachable])
    metrics["froc/score"] = float(np.mean([metrics[f"froc/sens@{f:g}fp"] for f in fps_per_image]))
    return metrics
