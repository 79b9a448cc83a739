"""The matching evaluators on hand-computed cases: image↔report retrieval, region↔caption
matching and the modality gap, each as metric functions and as its registry evaluator."""

import types

import numpy as np
import pytest
from PIL import Image

from region_medclip.evaluators import plots, registry, retrieval


def test_retrieval_ranks_and_recall():
    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.1], [0.3, 0.6, 0.2]])
    ranks = retrieval.ranks_of_positives(sim)
    np.testing.assert_array_equal(ranks, [1, 2, 3])
    assert retrieval.recall_at_k(ranks, (1, 2)) == {1: 1 / 3, 2: 2 / 3}
    # A tie with a negative is not counted in the model's favour.
    np.testing.assert_array_equal(retrieval.ranks_of_positives(np.array([[0.5, 0.5]])), [2])
    # Extra positives: query 2's best positive is column 1 (0.6) → rank 1.
    pos = np.eye(3, dtype=bool)
    pos[2, 1] = True
    np.testing.assert_array_equal(retrieval.ranks_of_positives(sim, pos), [1, 2, 1])


def test_retrieval_metrics_both_directions():
    z = np.eye(4)
    m = retrieval.retrieval_metrics(z, z, ks=(1,))
    assert m == {"i2t/R@1": 1.0, "i2t/median_rank": 1.0, "t2i/R@1": 1.0, "t2i/median_rank": 1.0}
    # Texts shifted by one: image i matches text i + 1 best; the true one ranks last.
    shifted = np.roll(z, 1, axis=0)
    m = retrieval.retrieval_metrics(z, shifted, ks=(1, 4))
    assert m["i2t/R@1"] == 0.0 and m["i2t/R@4"] == 1.0


def test_same_text_positives_come_from_tokens_not_embeddings():
    texts = np.array([[5, 6, 0], [5, 6, 0], [5, 7, 0], [8, 0, 0]])
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(retrieval.same_text_positives(texts), expected)
    # A collapsed text tower (four different reports, one embedding) scores every report alike
    # for an image: the true one ties with three others and gets the pessimistic rank 4. Had
    # equal embeddings counted as equal reports, every query would have scored R@1 = 1.
    rng = np.random.default_rng(0)
    zimg = rng.normal(size=(4, 8))
    ztxt = np.repeat(rng.normal(size=(1, 8)), 4, axis=0)
    distinct = retrieval.same_text_positives(np.arange(4)[:, None])
    m = retrieval.retrieval_metrics(zimg, ztxt, distinct, ks=(1, 4))
    assert m["i2t/R@1"] == 0.0 and m["i2t/median_rank"] == 4.0 and m["i2t/R@4"] == 1.0
    # Identical reports (rows 0 and 1 of `texts`) are matches of each other in both directions:
    # image 0 retrieves report 1 and report 0 retrieves image 1 (with the diagonal alone, 0.5).
    zimg, ztxt = np.eye(4), np.eye(4)[[1, 0, 2, 3]]
    m = retrieval.retrieval_metrics(zimg, ztxt, expected, ks=(1,))
    assert m["i2t/R@1"] == 1.0 and m["t2i/R@1"] == 1.0
    assert retrieval.retrieval_metrics(zimg, ztxt, ks=(1,))["i2t/R@1"] == 0.5


def test_region_matching():
    e = np.eye(3)
    zroi = np.stack([e, e])  # [2 images, 3 ROIs, D = 3]
    zcap = np.stack([e, e[[1, 0, 2]]])  # image 1's first two captions swapped
    mask = np.array([[True, True, False], [True, True, True]])
    # image 0: 2 of 2 right; image 1: ROI 2 right, ROIs 0 and 1 wrong → 3 / 5.
    assert retrieval.within_image_top1(zroi, zcap, mask) == pytest.approx(3 / 5)
    out = retrieval.split_retrieval(zroi, zcap, mask)
    # Across the split each ROI direction e_k matches several identical captions; ties count
    # against the model, so only ranks are checked to be ≥ 1 and R@10 = 1.
    assert out["r2c/R@10"] == 1.0 and out["r2c/top1"] == out["r2c/R@1"]
    # With caption ids saying which captions are the same text, duplicates are hits.
    ids = np.array([[0, 1, -1], [1, 0, 2]])
    out = retrieval.split_retrieval(zroi, zcap, mask, cap_ids=ids)
    assert out["r2c/R@1"] < 1.0  # image 1's swapped captions still miss


def test_modality_gap():
    zimg = np.array([[1.0, 0.0], [1.0, 0.0]])
    ztxt = np.array([[0.0, 1.0], [0.0, 1.0]])
    assert retrieval.modality_gap(zimg, ztxt) == pytest.approx(np.sqrt(2))
    assert retrieval.modality_gap(zimg, zimg) == 0.0


def test_pca_2d_finds_the_main_axes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 5)) * np.array([10.0, 3.0, 0.1, 0.1, 0.1])
    projected, ratio = plots.pca_2d(x)
    assert projected.shape == (500, 2)
    # The first two components are the two stretched input axes, up to sign.
    np.testing.assert_allclose(np.abs(projected[:, 0]), np.abs(x[:, 0] - x[:, 0].mean()), atol=0.2)
    assert ratio[0] > 0.85 and ratio[1] > 0.05


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _split(n: int = 12, rois: int = 3, dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """An embedded split of ``n`` films: ``zimg, ztxt [n, dim]``, ``texts [n, 4]`` (films 0 and
    1 share a report), ``zroi, zcap [n, rois, dim]``, ``roi_mask, cap_ids [n, rois]``."""
    rng = np.random.default_rng(seed)
    zimg = _normalised(rng.normal(size=(n, dim)))
    zroi = _normalised(rng.normal(size=(n, rois, dim)))
    texts = rng.integers(3, 50, (n, 4))
    texts[1] = texts[0]
    roi_mask = rng.random((n, rois)) < 0.7
    roi_mask[:, 0] = True
    return dict(
        zimg=zimg,
        ztxt=_normalised(zimg + 0.8 * rng.normal(size=(n, dim))),
        texts=texts,
        zroi=zroi,
        zcap=_normalised(zroi + 0.8 * rng.normal(size=(n, rois, dim))),
        roi_mask=roi_mask,
        cap_ids=rng.integers(0, 2 * n, (n, rois)),
    )


def test_the_matching_evaluators_are_their_metrics():
    emb = _split()
    ctx = registry.Context(dataset=None, text=None, grid=1)
    out = retrieval.run_retrieval(emb, ctx=ctx)
    positives = retrieval.same_text_positives(emb["texts"])
    assert out == retrieval.retrieval_metrics(emb["zimg"], emb["ztxt"], positives)
    assert positives[0, 1] and out["i2t/R@10"] >= out["i2t/R@1"]
    out = retrieval.run_regions(emb, ctx=ctx)
    zroi, zcap, mask = emb["zroi"], emb["zcap"], emb["roi_mask"]
    split = retrieval.split_retrieval(zroi, zcap, mask, emb["cap_ids"])
    assert {k: out[k] for k in split} == split
    assert out["within_image_top1"] == retrieval.within_image_top1(zroi, zcap, mask)
    assert out["within_image_top1_multi"] == retrieval.within_image_top1_multi(zroi, zcap, mask)
    assert set(out) == {*split, "within_image_top1", "within_image_top1_multi"}
    gap = retrieval.run_modality_gap(emb, ctx=ctx)
    assert gap == {"gap": retrieval.modality_gap(emb["zimg"], emb["ztxt"])}


def test_the_matching_evaluators_plot_pngs(tmp_path):
    emb = _split()
    ctx = registry.Context(dataset=None, text=types.SimpleNamespace(), grid=1, split="validation")
    for kind in ("retrieval", "regions", "modality_gap"):
        registry.KINDS[kind].plot(emb, str(tmp_path / f"{kind}.png"), ctx=ctx)
        with Image.open(tmp_path / f"{kind}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100
    similarity = emb["zimg"] @ emb["ztxt"].T
    ranks = retrieval.both_ranks(similarity, np.eye(12, dtype=bool), ("a", "b"))
    np.testing.assert_array_equal(ranks["a"], retrieval.ranks_of_positives(similarity))
    np.testing.assert_array_equal(ranks["b"], retrieval.ranks_of_positives(similarity.T))
