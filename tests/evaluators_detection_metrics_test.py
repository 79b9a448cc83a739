"""Detection metrics on hand-computed cases (IoU, COCO AP at 0.5, FROC) and against pycocotools'
COCOeval on random images (parity group: needs pycocotools)."""

import contextlib
import io

import numpy as np
import pytest

from conftest import require_peer
from region_medclip.evaluators import detection_metrics as dm

CLASS_NAMES = ("nodule", "effusion", "pneumothorax")


def test_box_iou_hand_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 20, 20]])
    b = np.array(
        [
            [0, 0, 10, 10],  # equal to a[0]
            [5, 0, 15, 10],  # half of a[0]: 50 / (100 + 100 - 50)
            [0, 0, 5, 5],  # inside a[0]: 25 / 100
            [10, 0, 20, 10],  # touches a[0]'s edge
            [10, 10, 0, 0],  # inverted: overlaps nothing
        ]
    )
    expected = [[1, 1 / 3, 1 / 4, 0, 0], [1 / 4, 100 / 400, 25 / 400, 1 / 4, 0]]
    np.testing.assert_allclose(dm.box_iou(a, b), expected, rtol=1e-15)
    assert dm.box_iou(a, np.zeros((0, 4))).shape == (2, 0)
    # Continuous coordinates, no +1: a 1.5 × 2 box inside a 3 × 2 box.
    assert dm.box_iou([[0, 0, 3, 2]], [[0.5, 0, 2, 2]])[0, 0] == pytest.approx(0.5, abs=1e-15)


def _hand_case():
    """Two images, three classes (0 nodule, 1 effusion, 2 pneumothorax without ground truth)."""
    gt_boxes = [
        [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 60, 60]],  # A (0), B (0), E (1)
        [[0, 0, 10, 10], [40, 40, 60, 60]],  # C (0), F (1)
    ]
    gt_classes = [[0, 0, 1], [0, 1]]
    det_boxes = [
        [
            [0, 0, 10, 10],  # d1 0.9 nodule on A: IoU 1
            [1, 0, 10, 10],  # d2 0.8 nodule on A again (IoU 0.9): a duplicate
            [20, 20, 30, 30],  # d5 0.5 nodule on B
            [40, 40, 60, 50],  # e2 0.85 effusion on E: IoU exactly 0.5, which matches
            [70, 70, 80, 80],  # g1 0.3 pneumothorax on nothing
        ],
        [
            [40, 40, 60, 60],  # d3 0.7 nodule on F, an effusion: wrong class
            [0, 0, 10, 10],  # d4 0.6 nodule on C
            [0, 0, 10, 10],  # e1 0.95 effusion on C, a nodule: wrong class
            [40, 40, 60, 60],  # e3 0.4 effusion on F
        ],
    ]
    det_scores = [[0.9, 0.8, 0.5, 0.85, 0.3], [0.7, 0.6, 0.95, 0.4]]
    det_classes = [[0, 0, 0, 1, 2], [0, 0, 1, 1]]
    return dict(
        gt_boxes=[np.array(b, float) for b in gt_boxes],
        gt_classes=[np.array(c) for c in gt_classes],
        det_boxes=[np.array(b, float) for b in det_boxes],
        det_scores=[np.array(s) for s in det_scores],
        det_classes=[np.array(c) for c in det_classes],
    )


# Nodule, 3 ground truths, detections by score:
#   det  score  match  TP FP  precision  recall  envelope
#   d1   0.9    A      1  0   1          1/3     1
#   d2   0.8    dup    1  1   1/2        1/3     3/5
#   d3   0.7    wrong  1  2   1/3        1/3     3/5
#   d4   0.6    C      2  2   1/2        2/3     3/5
#   d5   0.5    B      3  2   3/5        1       3/5
# The 101 recall points 0.00 .. 0.33 (34 of them) first reach recall at d1 (1), the 67 points
# 0.34 .. 1.00 at d4 or d5 (3/5): AP = (34 + 67 · 3/5) / 101 = 74.2 / 101 = 0.73465. Without the
# envelope it would be (34 + 33 / 2 + 34 · 3/5) / 101 = 0.70198; the exact area under the
# envelope is 1/3 + 2/3 · 3/5 = 0.73333, and the VOC/sklearn sum Σ ΔR · P is 0.7.
NODULE_AP = 74.2 / 101
# Effusion, 2 ground truths: e1 0.95 wrong class (P 0, R 0), e2 0.85 on E (P 1/2, R 1/2), e3 0.4
# on F (P 2/3, R 1). The envelope is 2/3 at every rank, recall point 0 included (read at e1), so
# AP = 2/3: the wrong-class detection ranked first costs nothing once a later one lifts it.
EFFUSION_AP = 2 / 3


def test_average_precision_hand_case():
    ap = dm.average_precision(**_hand_case(), num_classes=3, iou_thresholds=(0.5,))
    assert ap.shape == (1, 3)
    np.testing.assert_allclose(ap[0, :2], [NODULE_AP, EFFUSION_AP], rtol=1e-12)
    assert np.isnan(ap[0, 2])  # pneumothorax: no ground truth
    for wrong in (0.70198, 1 / 3 + 2 / 3 * 3 / 5, 0.7):
        assert abs(ap[0, 0] - wrong) > 1e-3
    # At 0.55 e2 (IoU exactly 0.5) no longer matches: only e3 does, at P 1/3 and R 1/2, so the 51
    # points 0.00 .. 0.50 read 1/3 and the rest 0.
    ap = dm.average_precision(**_hand_case(), num_classes=3, iou_thresholds=(0.55,))
    assert ap[0, 1] == pytest.approx(51 / 3 / 101, abs=1e-12)


def test_detection_map_keys_and_macro():
    metrics = dm.detection_map(**_hand_case(), class_names=CLASS_NAMES)
    assert metrics["map@0.5"] == pytest.approx((NODULE_AP + EFFUSION_AP) / 2, abs=1e-12)
    # Every match has IoU 0.5 or more, so 0.4 gives the same; 0.5:0.95 is lower (e2 drops out).
    assert metrics["map@0.4"] == pytest.approx(metrics["map@0.5"], abs=1e-12)
    assert metrics["map@0.5:0.95"] < metrics["map@0.5"]
    assert metrics["ap@0.5/nodule"] == pytest.approx(NODULE_AP, abs=1e-12)
    for iou in ("0.4", "0.5", "0.5:0.95"):
        assert np.isnan(metrics[f"ap@{iou}/pneumothorax"])
    assert metrics["map/classes_without_gt"] == 1.0
    expected_keys = {f"map@{iou}" for iou in ("0.4", "0.5", "0.5:0.95")}
    expected_keys |= {f"ap@{iou}/{n}" for iou in ("0.4", "0.5", "0.5:0.95") for n in CLASS_NAMES}
    assert set(metrics) == expected_keys | {"map/classes_without_gt"}


def _edge_case():
    """Three images, one class each, at IoU 0.3 and 0.5: where COCO's conventions decide."""
    tens = np.array([[20.0 * i, 50, 20 * i + 10, 60] for i in range(10)])
    return dict(
        gt_boxes=[
            np.array([[0.0, 0, 10, 10], [4, 0, 14, 10]]),
            np.array([[0.0, 0, 10, 10], [10, 0, 20, 10]]),
            tens,
        ],
        gt_classes=[np.zeros(2, int), np.ones(2, int), np.full(10, 2)],
        det_boxes=[
            np.array([[3.0, 0, 13, 10], [0, 0, 10, 10]]),
            np.array([[5.0, 0, 15, 10], [10, 0, 20, 10]]),
            np.concatenate([tens[:7], [[0.0, 80, 10, 90]], tens[7:8]]),
        ],
        det_scores=[np.array([0.9, 0.8]), np.array([0.9, 0.8]), np.linspace(0.9, 0.1, 9)],
        det_classes=[np.zeros(2, int), np.ones(2, int), np.full(9, 2)],
    )


# Class 0: the first detection overlaps G0 (IoU 70/130) and G1 (90/110) and takes G1, the best;
# the second (IoU 1 with G0, 60/140 with G1) takes G0: AP 1. Had the first taken the first
# ground truth over 0.5, the second would be a false positive (AP 51/101).
# Class 1: the first detection overlaps G0 and G1 equally (IoU 1/3); at 0.3 it takes G1, the last
# (COCOeval replaces its best on >=), so the second (on G1 only) is a false positive: P 1, 1/2 at
# R 1/2, 1/2 → 51/101 (taking G0 would give 1). At 0.5 the first misses: P 0, 1/2 → 25.5/101.
# Class 2: 10 ground truths, 7 hits, a false positive, a hit: recall 7/10 is 0.7 but COCO's point
# "0.70" is 0.7000000000000001, so it reads the next hit's 8/9 (points 0.00-0.69 read 1, 0.70-0.80
# read 8/9, the rest 0): (70 + 11 · 8/9) / 101, where an exact 0.7 would give (71 + 10 · 8/9) / 101.
EDGE_AP = [[1, 51 / 101, (70 + 88 / 9) / 101], [1, 25.5 / 101, (70 + 88 / 9) / 101]]


def test_coco_matching_and_recall_points_on_edge_cases():
    ap = dm.average_precision(**_edge_case(), num_classes=3, iou_thresholds=(0.3, 0.5))
    np.testing.assert_allclose(ap, EDGE_AP, rtol=1e-12)


def _froc_case():
    """Two images, four nodules (L1, L2 in image 0; L3, L4 in image 1), 12 detections."""
    lesions = np.array([[0.0, 0, 10, 10], [50, 50, 60, 60]])
    nowhere = [80.0, 80, 90, 90]
    det_boxes = [
        np.array([lesions[0], [1, 0, 11, 10], nowhere, lesions[1], nowhere, nowhere]),
        np.array([lesions[0], lesions[0], nowhere, nowhere, nowhere, lesions[1]]),
    ]
    return dict(
        gt_boxes=[lesions, lesions],
        gt_classes=[np.zeros(2, int), np.zeros(2, int)],
        det_boxes=det_boxes,
        # Image 0: L1, L1 again (IoU 0.82), FP, L2, FP, FP; image 1: an effusion on L3 (wrong
        # class), L3, FP, FP, FP, L4.
        det_scores=[
            np.array([0.9, 0.7, 0.5, 0.3, 0.15, 0.05]),
            np.array([0.8, 0.6, 0.4, 0.2, 0.1, 0.04]),
        ],
        det_classes=[np.zeros(6, int), np.array([1, 0, 0, 0, 0, 0])],
    )


# Keeping the detections scoring ≥ each distinct score (2 images, 4 lesions):
#   cut   0.9  0.8  0.7  0.6  0.5  0.4  0.3  0.2  0.15  0.1  0.05  0.04
#   FP    0    1    1    1    2    3    3    4    5     6    7     7     (the duplicate at 0.7
#   found 1    1    1    2    2    2    3    3    3     3    3     4      hits L1: not an FP)
# sens@0.5 FP/image (≤ 1 FP) = 2/4, @1 (≤ 2) = 2/4, @2 (≤ 4) = 3/4, @4 (≤ 8) = 4/4.
FROC_FPS = [0, 0, 0.5, 0.5, 0.5, 1, 1.5, 1.5, 2, 2.5, 3, 3.5, 3.5]
FROC_SENSITIVITY = [0, 0.25, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75, 0.75, 1]


def test_froc_hand_case():
    fps, sensitivity = dm.froc_curve(**_froc_case())
    np.testing.assert_array_equal(fps, FROC_FPS)
    np.testing.assert_array_equal(sensitivity, FROC_SENSITIVITY)
    assert dm.froc(**_froc_case()) == {
        "froc/sens@0.5fp": 0.5,
        "froc/sens@1fp": 0.5,
        "froc/sens@2fp": 0.75,
        "froc/sens@4fp": 1.0,
        "froc/score": 0.6875,
    }
    # One-to-one: the duplicate is a false positive, every later cut has one FP more, and at
    # 0.5 FP/image only the cuts 0.9 and 0.8 (1/4) remain.
    one_to_one = dm.froc(**_froc_case(), one_to_one=True)
    assert [one_to_one[f"froc/sens@{f}fp"] for f in ("0.5", "1", "2", "4")] == [0.25, 0.5, 0.75, 1]
    # Class-agnostic: the effusion at 0.8 finds L3: 2/4 at 0 FP, 3/4 at 2 FP (cut 0.3).
    agnostic = dm.froc(**_froc_case(), class_agnostic=True)
    assert agnostic["froc/sens@0.5fp"] == 0.5 and agnostic["froc/sens@1fp"] == 0.75


def test_froc_ties_centre_hits_and_no_lesions():
    lesion = [np.array([[0.0, 0, 20, 20]])]
    # A hit and a false positive with the same score: no threshold keeps one without the other.
    tied = dict(
        gt_boxes=lesion,
        gt_classes=[np.array([0])],
        det_boxes=[np.array([[0.0, 0, 20, 20], [50, 50, 60, 60]])],
        det_scores=[np.array([0.5, 0.5])],
        det_classes=[np.array([0, 0])],
    )
    np.testing.assert_array_equal(dm.froc_curve(**tied), [[0, 1], [0, 1]])
    tied_froc = dm.froc(**tied)
    assert tied_froc["froc/sens@0.5fp"] == 0.0 and tied_froc["froc/sens@1fp"] == 1.0
    # A small box at the lesion's centre: IoU 1/16 misses (and is a false positive), the
    # centre criterion hits.
    small = dict(det_boxes=[np.array([[5.0, 5, 10, 10]])], det_scores=[np.array([0.9])])
    small.update(gt_boxes=lesion, gt_classes=[np.array([0])], det_classes=[np.array([0])])
    assert dm.froc(**small)["froc/score"] == 0.0
    assert dm.froc(**small, hit="centre")["froc/score"] == 1.0
    with pytest.raises(ValueError, match="hit"):
        dm.froc(**small, hit="center-ish")
    no_lesions = dict(small, gt_boxes=[np.zeros((0, 4))], gt_classes=[np.zeros(0, int)])
    assert np.isnan(dm.froc(**no_lesions)["froc/score"])


def test_inputs_are_checked():
    case = _hand_case()
    with pytest.raises(ValueError, match="class ids"):
        dm.average_precision(**case, num_classes=2)
    with pytest.raises(ValueError, match="length"):
        dm.average_precision(**dict(case, det_scores=case["det_scores"][:1]), num_classes=3)
    with pytest.raises(ValueError, match="non-finite"):
        bad = [np.array([np.nan, 0.8, 0.5, 0.85, 0.3]), case["det_scores"][1]]
        dm.froc(**dict(case, det_scores=bad))


def _random_case(seed: int, *, grid: bool, num_images: int = 20):
    """Random ground truth (classes 0-2, 0-4 boxes an image, sometimes a duplicate box) and
    detections (jittered ground truth, some of the wrong class, and random boxes of classes 0-3;
    class 3 has no ground truth). ``grid``: integer coordinates, where IoUs land exactly on
    thresholds and tie between ground truths, and scores in tenths, which tie."""
    rng = np.random.default_rng(seed)

    def boxes(n):
        corner, size = rng.uniform(0, 100, (n, 2)), rng.uniform(8, 40, (n, 2))
        b = np.concatenate([corner, corner + size], axis=1)
        return np.round(b) if grid else b

    case = {k: [] for k in ("gt_boxes", "gt_classes", "det_boxes", "det_scores", "det_classes")}
    for _ in range(num_images):
        gt, gt_classes = boxes(rng.integers(0, 5)), rng.integers(0, 3, 5)
        if len(gt) >= 2 and rng.random() < 0.3:
            gt[1], gt_classes[1] = gt[0], gt_classes[0]
        copies = rng.integers(0, 3, len(gt))
        jitter = rng.uniform(-3, 3, (copies.sum(), 4))
        jittered = np.repeat(gt, copies, axis=0) + (np.round(jitter) if grid else jitter)
        classes = np.repeat(gt_classes[: len(gt)], copies)
        wrong = rng.random(len(classes)) < 0.15
        classes[wrong] = rng.integers(0, 4, wrong.sum())
        extra = rng.integers(0, 4)
        det = np.concatenate([jittered, boxes(extra)])
        scores = rng.integers(1, 10, len(det)) / 10 if grid else rng.random(len(det))
        case["gt_boxes"].append(gt)
        case["gt_classes"].append(gt_classes[: len(gt)])
        case["det_boxes"].append(det)
        case["det_scores"].append(scores)
        case["det_classes"].append(np.concatenate([classes, rng.integers(0, 4, extra)]))
    return case


def _cocoeval_precision(case, num_classes: int, iou_thresholds) -> np.ndarray:
    """COCOeval's ``precision [T, 101, C]`` (-1 for a class without ground truth): COCO json built
    in memory (xywh boxes, 1-based ids: COCOeval reads id 0 as unmatched), one area range holding
    every box, ``maxDets`` the most detections of an image."""
    coco_module = require_peer("pycocotools.coco")
    cocoeval = require_peer("pycocotools.cocoeval")

    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    gt = {"images": [], "annotations": [], "categories": []}
    gt["categories"] = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    results = []
    for i, (gb, gc, db, ds, dc) in enumerate(zip(*case.values(), strict=True)):
        gt["images"].append({"id": i + 1})
        for box, c in zip(gb.tolist(), gc.tolist(), strict=True):
            ann = {"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": c + 1}
            ann |= {"bbox": xywh(box), "area": xywh(box)[2] * xywh(box)[3], "iscrowd": 0}
            gt["annotations"].append(ann)
        for box, s, c in zip(db.tolist(), ds.tolist(), dc.tolist(), strict=True):
            results.append({"image_id": i + 1, "category_id": c + 1, "bbox": xywh(box), "score": s})
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress
        coco_gt = coco_module.COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = cocoeval.COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.params.iouThrs = np.asarray(iou_thresholds)
        evaluator.params.maxDets = [max(len(s) for s in case["det_scores"])]
        evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e10]], ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"][:, :, :, 0, 0]


@pytest.mark.parity
@pytest.mark.parametrize("grid", [True, False], ids=["grid_with_ties", "continuous"])
def test_average_precision_equals_cocoeval(grid):
    case = _random_case(seed=1 + grid, grid=grid)
    names = ("a", "b", "c", "never_annotated")
    thresholds = np.concatenate([[0.4], dm.COCO_IOU_THRESHOLDS])
    precision = _cocoeval_precision(case, len(names), thresholds)
    annotated = precision[0, 0] > -1
    assert annotated.tolist() == [True, True, True, False]
    coco_ap = np.where(annotated, precision.mean(axis=1), np.nan)  # [T, C]
    ap = dm.average_precision(**case, num_classes=len(names), iou_thresholds=thresholds)
    np.testing.assert_allclose(ap, coco_ap, rtol=0, atol=1e-9)
    assert np.all(np.isnan(ap[:, 3]))
    # The case must exercise the matcher: neither all hits nor all misses.
    assert 0.2 < np.nanmean(ap[1]) < 0.95 and np.nanmin(ap[1:]) < np.nanmax(ap[1:])
    metrics = dm.detection_map(**case, class_names=names)
    for i, iou in ((0, "0.4"), (1, "0.5")):
        assert metrics[f"map@{iou}"] == pytest.approx(coco_ap[i, :3].mean(), abs=1e-9)
    # COCO's headline AP (stats[0]): the mean of every valid precision entry over 0.5:0.95.
    valid = precision[1:]
    assert metrics["map@0.5:0.95"] == pytest.approx(valid[valid > -1].mean(), abs=1e-9)
    for c, name in enumerate(names[:3]):
        assert metrics[f"ap@0.5:0.95/{name}"] == pytest.approx(coco_ap[1:, c].mean(), abs=1e-9)


@pytest.mark.parity
def test_edge_cases_equal_cocoeval():
    coco_ap = _cocoeval_precision(_edge_case(), 3, (0.3, 0.5)).mean(axis=1)
    np.testing.assert_allclose(coco_ap, EDGE_AP, rtol=0, atol=1e-9)
