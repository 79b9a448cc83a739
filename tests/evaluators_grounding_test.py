"""Phrase grounding: heatmap metrics on hand-computed cases, their aggregation over the phrases of
a split, and the ``grounding`` evaluator (the dataset's "no finding" boxes left out)."""

import types

import numpy as np
import pytest
from PIL import Image

from region_medclip.data import registry as data_registry
from region_medclip.evaluators import grounding, registry


def test_grounding_metrics():
    mask = grounding.boxes_mask(np.array([[1, 1, 3, 3]]), 4, 4)
    assert mask.sum() == 4 and mask[1:3, 1:3].all()
    heat = np.zeros((4, 4))
    heat[1:3, 1:3] = [[1.0, 3.0], [1.0, 3.0]]
    # inside: [1, 3, 1, 3] mean 2 var 1; outside: zeros mean 0 var 0 → CNR 2.
    assert grounding.cnr(heat, mask) == pytest.approx(2.0)
    assert grounding.pointing_game(heat, mask) == 1.0
    assert grounding.pointing_game(-heat, mask) == 0.0
    # Normalised ≥ 0.5: the two 3.0 pixels → IoU 2 / 4.
    assert grounding.iou_at_threshold(heat, mask, 0.5) == pytest.approx(0.5)
    assert grounding.iou_at_threshold(heat, mask, 0.2) == pytest.approx(1.0)


def test_pointing_game_tolerance():
    mask = grounding.boxes_mask(np.array([[13, 4, 20, 9]]), 32, 32)  # x 13..19, y 4..8
    heat = np.zeros((32, 32))
    heat[6, 10] = 1.0  # 3 px left of the box's first column, level with it
    assert grounding.pointing_game(heat, mask) == 0.0
    assert grounding.pointing_game(heat, mask, tolerance=3.0) == 1.0
    assert grounding.pointing_game(heat, mask, tolerance=2.9) == 0.0
    heat[6, 10], heat[12, 10] = 0.0, 1.0  # 3 px left of and 4 px below the corner (13, 8): 5 px
    assert grounding.pointing_game(heat, mask, tolerance=5.0) == 1.0
    assert grounding.pointing_game(heat, mask, tolerance=4.9) == 0.0
    assert grounding.pointing_game(heat, np.zeros_like(mask), tolerance=5.0) == 0.0


def test_a_box_between_patch_centres_needs_the_tolerance():
    # 3 × 3 cells on a 24-px image, cell centres at 4, 12 and 20 px. A perfect map peaks at the
    # middle cell (pixels 11-12), but the thin box (rows 14-15) holds no cell centre.
    emb = dict(
        images=np.zeros((1, 24, 24)),
        zpatch=np.eye(9)[None],
        zcap=np.eye(9)[None, [4]],
        boxes=np.array([[[8 / 24, 14 / 24, 16 / 24, 16 / 24]]]),
        roi_mask=np.array([[True]]),
    )
    out = grounding.grounding_metrics(emb, grid=3, threshold=0.5, tolerance=3.0)
    assert out["pointing_game"] == 0.0 and out["pointing_game@3px"] == 1.0
    assert "pointing_game@3px" not in grounding.grounding_metrics(emb, grid=3, threshold=0.5)


def test_upsample_is_bilinear_and_keeps_constants():
    np.testing.assert_allclose(grounding.upsample(np.full((2, 2), 3.0), 8, 8), 3.0)
    up = grounding.upsample(np.array([[0.0, 1.0]]), 1, 4)
    np.testing.assert_allclose(up, [[0.0, 0.25, 0.75, 1.0]])


def _oracle_split() -> dict[str, np.ndarray]:
    """One 8-px film of 2 × 2 patch cells, cell k embedded as e_k; ROI 0 (the top-left cell's
    box) is described like cell 0, ROI 1 (bottom-right) like cell 3."""
    e = np.eye(4)
    return dict(
        images=np.zeros((1, 8, 8)),
        zpatch=e[None],
        zcap=e[None, [0, 3]],
        boxes=np.array([[[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]]),
        roi_mask=np.array([[True, True]]),
    )


def test_grounding_on_an_oracle_heatmap():
    e = np.eye(4)
    emb = _oracle_split()
    out = grounding.grounding_metrics(emb, grid=2, threshold=0.5)
    assert out["pointing_game"] == 1.0 and out["phrases"] == 2
    assert out["cnr"] > 1.0 and out["miou@0.5"] > 0.5
    emb["zcap"] = e[None, [3, 0]]  # phrases swapped: both point to the other corner
    out = grounding.grounding_metrics(emb, grid=2, threshold=0.5)
    assert out["pointing_game"] == 0.0 and out["cnr"] < 0
    # A clear-region box (label "no finding") is not a phrase to ground: only ROI 0 is scored.
    emb["zcap"] = e[None, [0, 0]]
    emb["box_labels"] = np.array([[3, 0]])
    out = grounding.grounding_metrics(emb, grid=2, threshold=0.5, no_finding=0)
    assert out["phrases"] == 1 and out["pointing_game"] == 1.0
    # A dataset without that class (no_finding -1) grounds every box.
    assert grounding.grounding_metrics(emb, grid=2, threshold=0.5, no_finding=-1)["phrases"] == 2
    np.testing.assert_array_equal(grounding.phrase_mask(emb, 0), [[True, False]])


def test_the_grounding_evaluator_leaves_out_the_datasets_no_finding_boxes():
    emb = _oracle_split()
    emb["zcap"] = np.eye(4)[None, [0, 0]]
    emb["box_labels"] = np.array([[3, 0]])  # ROI 1 is a clear region in synth_cxr (class 0)
    synth = data_registry.get("synth_cxr")
    assert synth.no_finding_index() == 0
    ctx = registry.Context(dataset=synth, text=None, grid=2)
    out = grounding.run(emb, ctx=ctx, **grounding.OPTIONS)
    assert out == grounding.grounding_metrics(emb, grid=2, threshold=0.5, no_finding=0)
    assert out["phrases"] == 1 and out["pointing_game"] == 1.0
    assert "pointing_game@0px" not in out  # tolerance 0: the strict game only
    # roco has no labels, hence no "no finding" class: both boxes are phrases.
    roco = registry.Context(dataset=data_registry.get("roco"), text=None, grid=2)
    out = grounding.run(emb, ctx=roco, threshold=0.3, tolerance=2.0)
    assert out["phrases"] == 2 and set(out) >= {"miou@0.3", "pointing_game@2px"}


def test_the_grounding_evaluator_plots_the_phrases_on_their_films(tmp_path):
    emb = _oracle_split()
    emb["images"] = np.random.default_rng(0).random((1, 8, 8))
    emb["captions"] = np.array([[[1, 7, 8, 2, 0], [1, 9, 2, 0, 0]]])  # BOS ... EOS PAD
    decoded = []

    def decode(ids):
        decoded.append(ids)
        return " ".join(map(str, ids))

    tokenizer = types.SimpleNamespace(
        pad_id=0, bos_id=1, eos_id=2, tokenizer=types.SimpleNamespace(decode=decode)
    )
    text = types.SimpleNamespace(tokenizer=tokenizer)
    ctx = registry.Context(dataset=data_registry.get("roco"), text=text, grid=2)
    grounding.plot(emb, str(tmp_path / "grounding.png"), ctx=ctx, **grounding.OPTIONS)
    assert decoded == [[7, 8], [9]]  # each phrase titled without its special tokens
    with Image.open(tmp_path / "grounding.png") as image:
        assert image.format == "PNG" and min(image.size) > 100
