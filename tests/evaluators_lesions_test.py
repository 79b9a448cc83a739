"""Lesion-description retrieval without boxes (evaluators/lesions.py), by hand."""

import numpy as np
import pytest

from region_medclip.evaluators import detect, lesions


def test_queries_are_the_distinct_finding_captions():
    emb = dict(
        roi_mask=np.array([[True, True, False], [True, True, True]]),
        box_labels=np.array([[1, 0, 2], [1, 3, 0]]),
        cap_ids=np.array([[7, 9, 8], [7, 5, 9]]),
        zcap=np.arange(6 * 2, dtype=float).reshape(2, 3, 2),
    )
    ids, zcap = lesions.queries(emb, no_finding=0)
    # Caption 9 is a clear region (class 0), caption 8's box is padding.
    np.testing.assert_array_equal(ids, [5, 7])
    np.testing.assert_array_equal(zcap, [emb["zcap"][1, 1], emb["zcap"][0, 0]])


def test_best_per_query_keeps_each_films_best_box():
    found = [
        detect.Detections(
            boxes=np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], np.float32),
            scores=np.array([1.0, 3.0, 2.0]),
            phrases=np.array([0, 0, 1]),
        ),
        detect.Detections(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, np.int64)),
    ]
    scores, boxes = lesions.best_per_query(found, 2)
    np.testing.assert_array_equal(scores, [[3.0, 2.0], [-np.inf, -np.inf]])
    np.testing.assert_array_equal(boxes[0, 0], [0, 0, 0.5, 0.5])


def test_recalls_by_hand():
    """Three films, two queries. Query 0 (caption 4) is on film 2, whose best box is off it;
    film 1 ranks first. Query 1 (caption 6) is on film 0 at the right box, ranked first; film 2
    found nothing for it and is never counted."""
    roi_boxes = np.array(
        [[[0.1, 0.1, 0.3, 0.3]], [[0.6, 0.6, 0.9, 0.9]], [[0.1, 0.1, 0.3, 0.3]]], np.float32
    )
    roi_ids = np.array([[6], [5], [4]])
    valid = np.ones((3, 1), bool)
    scores = np.array([[0.5, 9.0], [2.0, 1.0], [1.0, -np.inf]])
    boxes = np.zeros((3, 2, 4), np.float32)
    boxes[0, 1] = [0.1, 0.1, 0.3, 0.32]  # IoU 0.91 with film 0's box
    boxes[2, 0] = [0.6, 0.6, 0.8, 0.8]  # nowhere near film 2's box
    out = lesions.recalls(scores, boxes, np.array([4, 6]), roi_boxes, roi_ids, valid, ks=(1, 2, 3))
    # R@1: query 1 only (film 0); R@2: query 0's film 2 joins (rank 2), its box is wrong.
    assert out["films_R@1"] == pytest.approx(0.5) and out["box_R@1"] == pytest.approx(0.5)
    assert out["films_R@2"] == pytest.approx(1.0) and out["box_R@2"] == pytest.approx(0.5)
    assert out["films_R@3"] == pytest.approx(1.0) and out["queries"] == 2


def test_a_split_without_findings_has_no_queries():
    out = lesions.recalls(
        np.zeros((2, 0)),
        np.zeros((2, 0, 4)),
        np.zeros(0, int),
        np.zeros((2, 1, 4)),
        np.zeros((2, 1), int),
        np.zeros((2, 1), bool),
    )
    assert out["queries"] == 0 and set(out) == set(lesions.no_queries())
    assert all(np.isnan(v) for k, v in out.items() if k != "queries")
