"""Box-free detection: the window proposals, non-maximum suppression, the calibrated scores and
the boxes grown from a phrase's heatmap, on hand-computed cases."""

import numpy as np
import pytest

from region_medclip.evaluators import detect


def test_window_proposals_tile_the_frame_at_each_size_and_aspect():
    boxes = detect.window_proposals(sizes=(0.2,), aspects=(1.0, 4.0), stride=0.5)
    assert (boxes >= -1e-6).all() and (boxes <= 1 + 1e-6).all()
    sides = np.round(boxes[:, 2:] - boxes[:, :2], 4)
    square, wide = sides[:, 0] == sides[:, 1], sides[:, 0] > sides[:, 1]
    # Square 0.2 windows every 0.1: centres 0.1, 0.2, ..., 0.9 → 9 × 9.
    assert square.sum() == 81 and np.allclose(sides[square], 0.2)
    # Aspect 4: 0.4 × 0.1, centres every 0.2 along x (0.2 ... 0.8) and 0.05 along y (0.05 ... 0.95).
    assert wide.sum() == 4 * 19 and np.allclose(sides[wide], [0.4, 0.1])
    assert len(detect.window_proposals(sizes=(1.5,))) == 0  # larger than the frame: none


def test_nms_keeps_the_best_of_each_cluster():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 9, 10]], float)
    scores = np.array([0.9, 0.95, 0.5, 0.1])
    np.testing.assert_array_equal(detect.nms(boxes, scores, iou=0.5, top_k=10), [1, 2])
    np.testing.assert_array_equal(detect.nms(boxes, scores, iou=0.5, top_k=1), [1])
    # IoU of boxes 0 and 1 is 81 / 119 = 0.68: a looser threshold keeps both.
    assert detect.box_iou(boxes[:1], boxes[1:2])[0, 0] == pytest.approx(81 / 119)
    np.testing.assert_array_equal(detect.nms(boxes, scores, iou=0.7, top_k=10), [1, 0, 2])


def test_calibrated_logits_weigh_the_phrase_against_the_nearest_clear_region():
    zroi = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    zphrase = np.array([[1.0, 0.0, 0.0]])
    znormal = np.array([[0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    logits = detect.calibrated_logits(zroi, zphrase, znormal, logit_scale=10.0)
    # Box 0: phrase 1.0, nearest normal 0.6 → 4; box 1: phrase 0, nearest normal 1 → −10.
    np.testing.assert_allclose(logits[:, 0], [4.0, -10.0])
    probs = detect.calibrated_scores(zroi, zphrase, znormal, logit_scale=10.0)
    np.testing.assert_allclose(probs[:, 0], 1 / (1 + np.exp(-np.array([4.0, -10.0]))))


def test_boxes_grow_from_each_peak_over_the_cells_above_the_fraction():
    heat = np.full((5, 5), -1.0)
    heat[1, 1], heat[1, 2], heat[2, 1] = 4.0, 2.5, 1.0  # a cluster: 2.5 ≥ 0.5 × 4, 1.0 is not
    heat[4, 4] = 3.0  # a second peak
    ys, xs = np.mgrid[0:5, 0:5] / 4.0
    centres = np.stack([xs, ys], -1)  # x, y in [0, 1] every 0.25
    boxes, scores = detect.grown_boxes(heat, centres, fraction=0.5, top_k=5, half=0.1)
    np.testing.assert_allclose(scores, [4.0, 3.0, 1.0])
    # Cells (1, 1) and (1, 2): x 0.25..0.5, y 0.25; widened by 0.1.
    np.testing.assert_allclose(boxes[0], [0.15, 0.15, 0.6, 0.35], atol=1e-6)
    np.testing.assert_allclose(boxes[1], [0.9, 0.9, 1.0, 1.0], atol=1e-6)  # clipped to the frame
    boxes, _ = detect.grown_boxes(heat, centres, fraction=0.2, top_k=1, half=0.0)
    np.testing.assert_allclose(boxes[0], [0.25, 0.25, 0.5, 0.5], atol=1e-6)  # 1.0 ≥ 0.2 × 4
    assert len(detect.grown_boxes(-heat - 10, centres, fraction=0.5, top_k=5, half=0.1)[0]) == 0


def test_detect_runs_each_phrase_through_the_region_head():
    proposals = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.4, 0.5]])

    def encode_regions_fn(tokens, boxes):
        # The embedding of a box says which quadrant it lies in: [top-left, bottom-right, 0].
        top_left = (boxes[..., 2] <= 0.5).astype(float)
        return np.stack([top_left, 1 - top_left, np.zeros_like(top_left)], -1)

    zphrase = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    znormal = np.array([[0.0, 0.0, 1.0]])
    [found] = detect.detect(
        np.zeros((1, 2, 2, 4)),
        zphrase,
        znormal,
        encode_regions_fn=encode_regions_fn,
        logit_scale=10.0,
        proposals=proposals,
        iou=0.5,
    )
    # Phrase 0 finds the two top-left boxes (overlapping: IoU 0.8, one kept), phrase 1 the other.
    np.testing.assert_array_equal(found.phrases, [0, 1])
    np.testing.assert_allclose(found.boxes, proposals[[0, 1]])
    # A box on the padding is left out.
    [found] = detect.detect(
        np.zeros((1, 2, 2, 4)),
        zphrase,
        znormal,
        encode_regions_fn=encode_regions_fn,
        logit_scale=10.0,
        proposals=proposals,
        image_box=np.array([[0.0, 0.0, 1.0, 0.45]]),
    )
    assert 1 not in found.phrases.tolist()


def test_the_detection_plot_of_a_split_without_findings_is_a_figure(tmp_path):
    from PIL import Image

    from region_medclip.evaluators import plots

    plots.plot_detections(np.zeros((0, 8, 8)), [], [], [], str(tmp_path / "none.png"))
    with Image.open(tmp_path / "none.png") as image:
        assert image.format == "PNG"


def _quadrant_regions(tokens, boxes):
    """The embedding of a box says which quadrant it lies in: [top-left, bottom-right, 0]."""
    top_left = (boxes[..., 2] <= 0.5).astype(float)
    return np.stack([top_left, 1 - top_left, np.zeros_like(top_left)], -1)


def _log_odds(p):
    return np.log(p / (1 - p))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_joint_logits_share_a_box_among_the_phrases_and_the_background():
    """p(phrase | box) is a softmax over the phrases and the nearest clear region, times
    σ(objectness); with one phrase it is the two-way calibrated odds."""
    zroi = np.array([[1.0, 0.0, 0.0]])
    zphrase = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    znormal = np.array([[0.0, 0.0, 1.0], [0.0, 0.6, 0.8]])
    logits = detect.joint_logits(zroi, zphrase, znormal, np.array([1.5]), logit_scale=10.0)
    # Logits 10, 6 and the background max(0, 0) = 0.
    softmax = np.exp([10.0, 6.0]) / (np.exp(10.0) + np.exp(6.0) + 1.0)
    np.testing.assert_allclose(logits[0], _log_odds(softmax * _sigmoid(1.5)), rtol=1e-9)
    one = detect.joint_logits(zroi, zphrase[:1], znormal, np.array([50.0]), logit_scale=10.0)
    calibrated = detect.calibrated_logits(zroi, zphrase[:1], znormal, logit_scale=10.0)
    np.testing.assert_allclose(one, calibrated, rtol=1e-6)


def test_proposals_are_ranked_by_phrase_and_objectness():
    """Two top-left proposals read alike as the phrase; the one the box head calls a finding
    wins, with the joint odds of the two; a degenerate box is no proposal."""
    proposals = np.array(
        [[[0.0, 0.0, 0.5, 0.5], [0.05, 0.0, 0.45, 0.5], [0.6, 0.6, 0.6, 0.9]]], np.float32
    )
    objectness = np.array([[-2.0, 3.0, 50.0]])
    zphrase = np.array([[1.0, 0.0, 0.0]])
    znormal = np.array([[0.0, 0.0, 1.0]])
    [found] = detect.detect_proposals(
        np.zeros((1, 2, 2, 4)),
        zphrase,
        znormal,
        proposals,
        objectness,
        encode_regions_fn=_quadrant_regions,
        logit_scale=10.0,
        iou=0.5,
    )
    np.testing.assert_allclose(found.boxes, proposals[0, [1]])
    # Phrase 1.0 against the nearest normal 0.0 at scale 10, and objectness 3.
    np.testing.assert_allclose(found.scores, _log_odds(_sigmoid(10.0) * _sigmoid(3.0)))
    # min_score drops what does not reach it.
    [found] = detect.detect_proposals(
        np.zeros((1, 2, 2, 4)),
        zphrase,
        znormal,
        proposals,
        objectness,
        encode_regions_fn=_quadrant_regions,
        logit_scale=10.0,
        min_score=3.0,
    )
    assert len(found.boxes) == 0


def test_find_in_tokens_picks_the_box_head_when_there_is_one():
    from region_medclip.evaluators import detection

    proposals = np.array([[[0.1, 0.1, 0.4, 0.4]]], np.float32)

    def propose_fn(tokens):
        return np.repeat(proposals, len(tokens), 0), np.full((len(tokens), 1), 2.0)

    kw = dict(encode_regions_fn=_quadrant_regions, logit_scale=10.0)
    zphrase, znormal = np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 1.0]])
    tokens = np.zeros((2, 2, 2, 4))
    found = detection.find_in_tokens(tokens, zphrase, znormal, propose_fn=propose_fn, **kw)
    assert len(found) == 2
    np.testing.assert_allclose(found[0].boxes, proposals[0])
    np.testing.assert_allclose(found[1].scores, _log_odds(_sigmoid(10.0) * _sigmoid(2.0)))
    with pytest.raises(ValueError, match="box head"):
        detection.find_in_tokens(tokens, zphrase, znormal, method="boxes", **kw)
    # Without a box head, auto grows boxes from the heatmap instead.
    grown = detection.find_in_tokens(tokens, zphrase, znormal, **kw)
    assert all(len(f.boxes) for f in grown)
