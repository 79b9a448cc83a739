"""ROI↔caption, negative-caption and distillation losses: sharded == dense, NumPy references,
hand cases, no NaN (also with padded ROIs holding NaN)."""

import jax
import losses_cases as lc
import numpy as np
import pytest

from region_medclip import losses

CASES = lc.CASE_GROUPS["region"]


@pytest.fixture(scope="module")
def mesh():
    return lc.make_mesh()


@pytest.mark.parametrize("local_batch", lc.LOCAL_BATCHES)
@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_dense(mesh, case, local_batch):
    lc.check_sharded_equals_dense(mesh, case, local_batch)


@pytest.mark.parametrize("case", lc.with_reference("region"))
def test_dense_equals_numpy_reference(case):
    lc.check_dense_equals_reference(case)


@pytest.mark.parametrize("case", CASES)
def test_no_nan_with_identical_embeddings(case):
    lc.check_no_nan_with_identical_embeddings(case)


@pytest.mark.parametrize("scale", lc.EXTREME_SCALES)
@pytest.mark.parametrize("case", CASES)
def test_no_nan_at_extreme_logit_scale(case, scale):
    lc.check_no_nan_at_extreme_logit_scale(case, scale)


@pytest.mark.parametrize("case", CASES)
def test_no_nan_when_rois_are_masked(mesh, case):
    rng = np.random.default_rng(13)
    loss_fn, arrays, static, diff = lc.CASES[case](rng, 2)
    # Padded slots hold NaN, as an embedding of an all-zero box could.
    for name in ("zroi", "zcap", "zneg", "student_logits"):
        if name in arrays:
            mask = arrays["neg_mask" if name == "zneg" else "roi_mask"]
            arrays[name] = np.where(mask[..., None], arrays[name], np.nan).astype(np.float32)
    # Images 0, 1 (all of device 0's shard) and 5 have every ROI padded.
    arrays["roi_mask"][[0, 1, 5]] = False
    for shard_mesh in (None, mesh):
        loss, metrics, grads = lc.value_and_grad(loss_fn, arrays, static, diff, mesh=shard_mesh)
        lc.assert_finite((loss, metrics, grads), case)
        for name in ("zroi", "zcap", "student_logits"):
            if name in grads:  # padded slots get exactly zero gradient
                assert not np.any(np.asarray(grads[name])[~arrays["roi_mask"]])
    # With every ROI of the global batch padded the loss is 0, not NaN.
    arrays["roi_mask"][:] = False
    loss, metrics, grads = lc.value_and_grad(loss_fn, arrays, static, diff, mesh=mesh)
    lc.assert_finite((loss, metrics, grads), case)
    assert float(loss) == 0.0 and float(metrics["num_rois"]) == 0.0


def test_roi_duplicate_caption_ids_are_positives():
    # Two ROIs matched to orthonormal captions, but both captions have the same id.
    z = np.eye(2, lc.DIM, dtype=np.float32).reshape(1, 2, lc.DIM)
    common = dict(zroi=z, zcap=z, roi_mask=np.ones((1, 2), bool), logit_scale=1.0)
    # Without ids: CE with one positive, −log(e / (e + 1)) = log(1 + e) − 1 in both directions.
    loss, _ = lc.jit(losses.roi_contrastive_loss)(**common)
    np.testing.assert_allclose(float(loss), np.log1p(np.e) - 1, rtol=1e-6)
    # With duplicate ids: uniform target over both, −½ (log p_own + log p_other) = log(1 + e) − ½.
    loss, metrics = lc.jit(losses.roi_contrastive_loss)(**common, cap_ids=np.array([[5, 5]]))
    np.testing.assert_allclose(float(loss), np.log1p(np.e) - 0.5, rtol=1e-6)
    assert float(metrics["r2c_accuracy"]) == 1.0


def test_roi_duplicates_are_not_pushed_apart():
    # ROI 0's caption text appears twice (captions 0 and 1, identical embeddings). With their ids
    # the two copies get the same gradient; without, copy 1 is pushed away from ROI 0.
    rng = np.random.default_rng(4)
    zroi = lc.unit(rng, 1, 3, lc.DIM)
    zcap = lc.unit(rng, 1, 3, lc.DIM)
    zcap[0, 1] = zcap[0, 0]
    common = dict(zroi=zroi, roi_mask=np.ones((1, 3), bool), logit_scale=5.0)

    def grad_caps(cap_ids):
        fn = lambda zcap: losses.roi_contrastive_loss(zcap=zcap, cap_ids=cap_ids, **common)[0]
        return np.asarray(jax.jit(jax.grad(fn))(zcap))

    with_ids = grad_caps(np.array([[1, 1, 2]]))
    np.testing.assert_allclose(with_ids[0, 0], with_ids[0, 1], rtol=1e-5, atol=1e-7)
    without_ids = grad_caps(None)
    assert np.abs(without_ids[0, 0] - without_ids[0, 1]).max() > 1e-2


def test_negative_caption_hand_value():
    z = np.eye(3, lc.DIM, dtype=np.float32)
    zroi, zcap = z[None, :1], z[None, :1]  # one ROI, its caption identical: s+ = 1
    zneg = np.stack([z[0], z[1], z[2]])[None, None]  # negatives: s = 1, 0, 0
    neg_mask = np.array([[[True, True, False]]])
    loss, _ = lc.jit(losses.negative_caption_loss)(
        zroi=zroi,
        zcap=zcap,
        zneg=zneg,
        roi_mask=np.ones((1, 1), bool),
        neg_mask=neg_mask,
        logit_scale=2.0,
    )
    expected = -np.log(np.exp(2) / (np.exp(2) + np.exp(2) + np.exp(0)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    # No negatives at all (data.num_negatives = 0): nothing to push away, loss 0.
    loss, metrics = lc.jit(losses.negative_caption_loss)(
        zroi=zroi,
        zcap=zcap,
        zneg=zneg[:, :, :0],
        roi_mask=np.ones((1, 1), bool),
        neg_mask=neg_mask[:, :, :0],
        logit_scale=2.0,
    )
    assert float(loss) == 0.0 and float(metrics["accuracy"]) == 1.0


def test_distillation_is_zero_for_equal_logits_and_never_updates_the_teacher():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, lc.NUM_ROIS, lc.NUM_CONCEPTS)).astype(np.float32)
    mask = np.ones((2, lc.NUM_ROIS), bool)
    loss, metrics = lc.jit(losses.distillation_loss)(
        student_logits=logits, teacher_logits=logits, roi_mask=mask
    )
    assert abs(float(loss)) < 1e-6 and float(metrics["top1_agreement"]) == 1.0
    fn = lambda student, teacher: losses.distillation_loss(
        student_logits=student, teacher_logits=teacher, roi_mask=mask
    )[0]
    d_student, d_teacher = jax.jit(jax.grad(fn, argnums=(0, 1)))(logits, 2 * logits)
    assert np.abs(d_student).max() > 1e-3 and not np.any(np.asarray(d_teacher))
