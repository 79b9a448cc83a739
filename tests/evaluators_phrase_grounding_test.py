"""BioViL's phrase grounding on hand-computed cases: |CNR| on the image area only, the union of a
phrase's boxes, mIoU over thresholds, per-category then macro aggregation, the "no finding"
boxes and an empty split, and the ``phrase_grounding`` evaluator with its plot."""

import types
import warnings

import numpy as np
import pytest
from PIL import Image

from region_medclip.evaluators import grounding, phrase_grounding

SQRT = np.sqrt


def _split(maps, boxes, cap_ids, labels, image_box=None, signs=None) -> dict[str, np.ndarray]:
    """N films of S × S pixels seen as S × S patch cells (grid = S, so upsampling changes
    nothing): cell k of film i embeds as the 1-d vector ``maps[i].flat[k]`` and each caption as
    ``[signs[i, r]]`` (default 1), so a phrase's map is ``maps[i]`` times its sign.

    ``boxes [N, R, 4]`` pixel xyxy, ``cap_ids, labels [N, R]`` (cap id -1: padding ROI).
    """
    maps = np.asarray(maps, np.float64)
    n, size, _ = maps.shape
    cap_ids = np.asarray(cap_ids)
    signs = np.ones(cap_ids.shape) if signs is None else np.asarray(signs, np.float64)
    emb = dict(
        images=np.zeros((n, size, size)),
        zpatch=maps.reshape(n, size * size, 1),
        zcap=signs[..., None],
        boxes=np.asarray(boxes, np.float64) / size,
        roi_mask=cap_ids >= 0,
        cap_ids=cap_ids,
        box_labels=np.asarray(labels),
    )
    if image_box is not None:
        emb["image_box"] = np.asarray(image_box, np.float64)
    return emb


CENTRE = [1, 1, 3, 3]  # the middle 2 × 2 pixels of a 4 × 4 film


def _centre_map(inside, outside=0.0) -> np.ndarray:
    heat = np.full((4, 4), outside, np.float64) if np.isscalar(outside) else np.array(outside)
    heat[1:3, 1:3] = inside
    return heat


def test_cnr_is_the_magnitude_of_the_contrast():
    mask = grounding.boxes_mask(np.array([CENTRE]), 4, 4)
    # Inside [3, 5, 3, 5]: mean 4, variance 1; outside a 0/2 checkerboard: mean 1, variance 1.
    heat = _centre_map([[3.0, 5.0], [3.0, 5.0]], np.indices((4, 4)).sum(0) % 2 * 2.0)
    assert phrase_grounding.contrast_to_noise(heat, mask) == pytest.approx(3 / SQRT(2))
    # A map anti-correlated with the box: the same BioViL CNR, where grounding.cnr turns negative.
    assert phrase_grounding.contrast_to_noise(-heat, mask) == pytest.approx(3 / SQRT(2))
    assert grounding.cnr(-heat, mask) == pytest.approx(-3 / SQRT(2))


def test_the_padding_band_is_left_out_of_both_regions():
    # Content in columns 0-2, a padded band in column 3 where the map reads 4.
    heat = _centre_map([[1.0, 3.0], [1.0, 3.0]])
    heat[:, 3] = 4.0
    mask = grounding.boxes_mask(np.array([CENTRE]), 4, 4)
    valid = grounding.boxes_mask(np.array([[0, 0, 3, 4]]), 4, 4)
    # Content only: inside mean 2 var 1, outside 8 zeros → 2. With the band: outside 8 zeros and
    # 4 fours, mean 4/3 var 32/9 → (2/3) / sqrt(41/9) = 2 / sqrt(41).
    assert phrase_grounding.contrast_to_noise(heat, mask, valid) == pytest.approx(2.0)
    assert phrase_grounding.contrast_to_noise(heat, mask) == pytest.approx(2 / SQRT(41))
    # Through the evaluator: image_box says where the content is; without it, the whole frame.
    emb = _split([heat], [[CENTRE]], [[7]], [[0]], image_box=[[0, 0, 0.75, 1]])
    out = phrase_grounding.phrase_grounding_metrics(emb, grid=4, class_names=["atelectasis"])
    assert out["cnr"] == pytest.approx(2.0)
    # Every inside pixel clears every threshold; with the band, its 4 pixels are predicted too.
    assert out["miou"] == pytest.approx(1.0)
    del emb["image_box"]
    out = phrase_grounding.phrase_grounding_metrics(emb, grid=4, class_names=["atelectasis"])
    assert out["cnr"] == pytest.approx(2 / SQRT(41)) and out["miou"] == pytest.approx(0.5)
    emb["image_box"] = np.array([[0.0, 0.0, 1.0, 1.0]])
    again = phrase_grounding.phrase_grounding_metrics(emb, grid=4, class_names=["atelectasis"])
    assert again["cnr"] == pytest.approx(out["cnr"])


def test_a_phrase_with_two_boxes_is_scored_on_their_union():
    box_a, box_b = [0, 0, 2, 1], [2, 3, 4, 4]  # row 0 cols 0-1; row 3 cols 2-3
    heat = np.ones((4, 4))
    heat[0, 0:2], heat[3, 2:4] = 2.0, 4.0
    emb = _split([heat], [[box_a, box_b]], [[5, 5]], [[0, 0]])
    out = phrase_grounding.phrase_grounding_metrics(emb, grid=4, class_names=["edema"])
    # Union inside [2, 2, 4, 4]: mean 3 var 1; outside 12 ones: var 0 → CNR 2. The map is ≥ 0.5
    # everywhere, so every threshold predicts all 16 pixels: IoU 4/16.
    assert out["cnr"] == pytest.approx(2.0) and out["miou"] == pytest.approx(0.25)
    assert out["phrases"] == 1 and out["boxes"] == 2
    # Box by box (grounding's per-box CNR): A alone 4/sqrt(54), B alone 20/sqrt(6).
    per_box = (4 / SQRT(54) + 20 / SQRT(6)) / 2
    assert out["signed_cnr"] == pytest.approx(per_box)
    # With different captions the two boxes are two phrases, each scored alone.
    emb["cap_ids"] = np.array([[5, 6]])
    out = phrase_grounding.phrase_grounding_metrics(emb, grid=4, class_names=["edema"])
    assert out["phrases"] == 2 and out["cnr"] == pytest.approx(per_box)


def test_phrases_group_an_images_rois_by_caption():
    emb = _split(
        np.zeros((2, 4, 4)), np.zeros((2, 3, 4)), [[5, 9, 5], [5, -1, -1]], np.zeros((2, 3))
    )
    found = [(i, rois.tolist()) for i, rois in phrase_grounding.phrases(emb)]
    assert found == [(0, [0, 2]), (0, [1]), (1, [0])]


def test_miou_averages_the_iou_over_the_thresholds():
    mask = grounding.boxes_mask(np.array([CENTRE]), 4, 4)
    heat = _centre_map([[0.35, 0.55], [0.35, 0.55]])
    heat[0, :] = 0.15
    # t = 0.1: the 4 inside and the 4 row-0 pixels, IoU 4/8; t = 0.2, 0.3: the inside, 1;
    # t = 0.4, 0.5: the two 0.55 pixels, 2/4. Mean (0.5 + 1 + 1 + 0.5 + 0.5) / 5 = 0.7. (On a
    # min-max normalised map it would be 0.8.)
    thresholds = phrase_grounding.OPTIONS["thresholds"]
    assert thresholds == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert phrase_grounding.mean_iou(heat, mask, thresholds) == pytest.approx(0.7)
    assert phrase_grounding.mean_iou(heat, mask, (0.2,)) == pytest.approx(1.0)
    assert phrase_grounding.mean_iou(heat, mask, (0.6,)) == 0.0  # nothing predicted
    # Restricted to columns 0-1: truth (1,1),(2,1) at 0.35; t = 0.1 adds (0,0),(0,1) → 2/4.
    valid = grounding.boxes_mask(np.array([[0, 0, 2, 4]]), 4, 4)
    assert phrase_grounding.mean_iou(heat, mask, (0.1, 0.3), valid) == pytest.approx(0.75)


def test_each_category_weighs_the_same_in_the_mean():
    # One atelectasis phrase with CNR 6, three edema phrases with CNR 2 each.
    six = _centre_map([[5.0, 7.0], [5.0, 7.0]])
    two = _centre_map([[1.0, 3.0], [1.0, 3.0]])
    emb = _split([six, two, two, two], [[CENTRE]] * 4, [[1], [2], [3], [4]], [[0], [1], [1], [1]])
    # The edema phrase of the last film reads its map negated: the same |CNR|.
    emb["zcap"][3] *= -1
    out = phrase_grounding.phrase_grounding_metrics(
        emb, grid=4, class_names=["atelectasis", "edema"]
    )
    assert out["cnr/atelectasis"] == pytest.approx(6.0) and out["cnr/edema"] == pytest.approx(2.0)
    assert out["cnr"] == pytest.approx((6 + 2) / 2)  # not (6 + 2 + 2 + 2) / 4 = 3
    assert out["phrases"] == 4 and out["categories"] == 2
    # The negated map lies below every threshold: IoU 0 for that phrase, 1 for the others.
    assert out["miou/edema"] == pytest.approx(2 / 3) and out["miou"] == pytest.approx(5 / 6)


def test_no_finding_boxes_and_unknown_categories_are_not_phrases():
    heat = _centre_map([[1.0, 3.0], [1.0, 3.0]])
    emb = _split([heat], [[CENTRE, CENTRE, CENTRE]], [[7, 8, 9]], [[0, 1, -1]])
    names = ["no finding", "atelectasis"]
    out = phrase_grounding.phrase_grounding_metrics(emb, grid=4, class_names=names, no_finding=0)
    assert out["phrases"] == 1 and out["categories"] == 1
    assert "cnr/atelectasis" in out and "cnr/no finding" not in out
    assert out["boxes"] == 2  # grounding's per-box metrics keep the -1 box, as grounding does


def test_an_empty_split_gives_nan_metrics_without_warnings():
    emb = _split(np.zeros((0, 4, 4)), np.zeros((0, 2, 4)), np.zeros((0, 2)), np.zeros((0, 2)))
    emb["image_box"] = np.zeros((0, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = phrase_grounding.phrase_grounding_metrics(
            emb, grid=4, class_names=["edema"], tolerance=2.0
        )
    assert out["phrases"] == 0 and out["categories"] == 0 and out["boxes"] == 0
    for key in ("cnr", "miou", "signed_cnr", "pointing_game", "pointing_game@2px"):
        assert np.isnan(out[key]), key


def _ctx(names, no_finding=-1, decode=None):
    dataset = types.SimpleNamespace(
        class_names=lambda: list(names), no_finding_index=lambda: no_finding
    )
    tokenizer = types.SimpleNamespace(
        pad_id=0, bos_id=1, eos_id=2, tokenizer=types.SimpleNamespace(decode=decode)
    )
    return types.SimpleNamespace(
        grid=4, dataset=dataset, text=types.SimpleNamespace(tokenizer=tokenizer)
    )


def test_the_evaluator_reports_both_tables():
    heat = _centre_map([[1.0, 3.0], [1.0, 3.0]])
    emb = _split([heat], [[CENTRE, CENTRE]], [[7, 8]], [[0, 1]])
    ctx = _ctx(["no finding", "atelectasis"], no_finding=0)
    out = phrase_grounding.run(emb, ctx=ctx, **phrase_grounding.OPTIONS)
    assert set(out) == {
        "cnr",
        "miou",
        "cnr/atelectasis",
        "miou/atelectasis",
        "phrases",
        "categories",
        "signed_cnr",
        "pointing_game",
        "boxes",
    }
    assert out["cnr"] == pytest.approx(2.0) and out["signed_cnr"] == pytest.approx(2.0)
    assert out["pointing_game"] == 1.0
    options = {**phrase_grounding.OPTIONS, "thresholds": [0.5, 2.0], "tolerance": 2.0}
    out = phrase_grounding.run(emb, ctx=ctx, **options)
    # t = 0.5 predicts the inside (IoU 1), t = 2 its two 3.0 pixels (IoU 1/2).
    assert out["miou"] == pytest.approx(0.75) and out["pointing_game@2px"] == 1.0


def test_the_evaluator_plots_the_phrases_on_their_films(tmp_path):
    heat = _centre_map([[1.0, 3.0], [1.0, 3.0]])
    emb = _split([heat], [[[0, 0, 2, 1], [2, 3, 4, 4], CENTRE]], [[5, 5, 6]], [[1, 1, 0]])
    emb["images"] = np.random.default_rng(0).random((1, 4, 4))
    emb["image_box"] = np.array([[0.0, 0.0, 0.75, 1.0]])
    emb["captions"] = np.array([[[1, 7, 8, 2], [1, 7, 8, 2], [1, 9, 2, 0]]])  # BOS … EOS PAD
    decoded = []

    def decode(ids):
        decoded.append(ids)
        return " ".join(map(str, ids))

    ctx = _ctx(["no finding", "edema"], no_finding=0, decode=decode)
    path = tmp_path / "phrase_grounding.png"
    phrase_grounding.plot(emb, str(path), ctx=ctx, **phrase_grounding.OPTIONS)
    assert decoded == [[7, 8]]  # one phrase (two boxes); the "no finding" box is not drawn
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100
