"""Softmax (CLIP), MedCLIP and DHN-NCE: sharded == dense, NumPy references, parity with
open_clip, hand cases, no NaN."""

import jax
import losses_cases as lc
import numpy as np
import pytest
from losses_reference import np_dhn_nce_literal

from conftest import require_peer
from region_medclip import losses

CASES = lc.CASE_GROUPS["contrastive"]


@pytest.fixture(scope="module")
def mesh():
    return lc.make_mesh()


@pytest.mark.parametrize("local_batch", lc.LOCAL_BATCHES)
@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_dense(mesh, case, local_batch):
    lc.check_sharded_equals_dense(mesh, case, local_batch)


@pytest.mark.parametrize("case", lc.with_reference("contrastive"))
def test_dense_equals_numpy_reference(case):
    lc.check_dense_equals_reference(case)


@pytest.mark.parametrize("case", CASES)
def test_no_nan_with_identical_embeddings(case):
    lc.check_no_nan_with_identical_embeddings(case)


@pytest.mark.parametrize("scale", lc.EXTREME_SCALES)
@pytest.mark.parametrize("case", CASES)
def test_no_nan_at_extreme_logit_scale(case, scale):
    lc.check_no_nan_at_extreme_logit_scale(case, scale)


@pytest.mark.parity
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_softmax_matches_open_clip_clip_loss(batch):
    open_clip_loss = require_peer("open_clip.loss")
    zimg, ztxt = lc.parity_inputs(batch, batch)
    logit_scale = np.float32(1 / 0.07)
    theirs = lc.torch_value_and_grads(open_clip_loss.ClipLoss(), zimg, ztxt, logit_scale)

    def loss_fn(zimg, ztxt, logit_scale):
        return losses.softmax_contrastive_loss(zimg=zimg, ztxt=ztxt, logit_scale=logit_scale)[0]

    ours = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(zimg, ztxt, logit_scale)
    lc.assert_parity(ours, theirs)


def test_softmax_aligned_embeddings_give_zero_loss():
    z = np.eye(6, lc.DIM, dtype=np.float32)  # orthonormal, each image identical to its text
    loss, metrics = lc.jit(losses.softmax_contrastive_loss)(zimg=z, ztxt=z, logit_scale=100.0)
    assert float(loss) < 1e-6
    assert float(metrics["i2t_accuracy"]) == 1.0 and float(metrics["t2i_accuracy"]) == 1.0
    # ... and at scale 1 the same embeddings give log(e + 5) − 1 in both directions.
    loss, _ = lc.jit(losses.softmax_contrastive_loss)(zimg=z, ztxt=z, logit_scale=1.0)
    np.testing.assert_allclose(float(loss), np.log(np.e + 5) - 1, rtol=1e-6)


def test_dhn_nce_closed_form_equals_literal_equations():
    rng = np.random.default_rng(3)
    zimg, ztxt = lc.unit(rng, 7, lc.DIM), lc.unit(rng, 7, lc.DIM)
    dhn_nce_sum = lc.jit(losses.dhn_nce_loss, reduction="sum")
    for beta1, beta2 in [(0.15, 0.15), (0.0, 0.5), (1.0, 2.0)]:
        loss, _ = dhn_nce_sum(zimg=zimg, ztxt=ztxt, temperature=0.6, beta1=beta1, beta2=beta2)
        expected = np_dhn_nce_literal(zimg, ztxt, 0.6, beta1, beta2, "sum")
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_dhn_nce_with_zero_beta_is_infonce_without_the_positive():
    # β = 0 makes every W_ij = 1: the loss is Σ_i −s_ii + log Σ_{j≠i} e^{s_ij} in each direction.
    z = np.eye(3, lc.DIM, dtype=np.float32)
    loss, _ = lc.jit(losses.dhn_nce_loss, reduction="sum")(
        zimg=z, ztxt=z, temperature=0.5, beta1=0.0, beta2=0.0
    )
    np.testing.assert_allclose(float(loss), 2 * 3 * (-2.0 + np.log(2.0)), rtol=1e-6)


def test_medclip_all_negative_labels_get_a_no_finding_dimension():
    # Two "no finding" images and texts: label similarity 1 within, so targets are uniform, and
    # with equal embeddings the loss is log 2 per direction; without the extra dimension the
    # cosine of zero vectors would be NaN.
    z = np.tile(np.eye(1, lc.DIM, dtype=np.float32), (2, 1))
    labels = np.zeros((2, lc.NUM_CLASSES), np.float32)
    loss, _ = lc.jit(losses.medclip_loss)(
        zimg=z, ztxt=z, img_labels=labels, txt_labels=labels, logit_scale=3.0
    )
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)


def test_report_hard_negatives_join_the_image_to_report_direction_only():
    rng = np.random.default_rng(0)
    _, arrays, _, _ = lc.case_softmax_hard_negatives(rng, 2)
    plain = {k: v for k, v in arrays.items() if k not in ("zneg", "neg_mask")}
    _, with_negs = losses.softmax_contrastive_loss(**arrays)
    _, without = losses.softmax_contrastive_loss(**plain)
    np.testing.assert_allclose(with_negs["loss_t2i"], without["loss_t2i"], rtol=1e-6)
    assert with_negs["loss_i2t"] > without["loss_i2t"]
    # A hard negative equal to the paired report ties it: never beaten, and log 2 more loss for
    # an image whose other columns are negligible.
    zimg = np.eye(4, dtype=np.float32)
    _, tied = losses.softmax_contrastive_loss(
        zimg=zimg, ztxt=zimg, logit_scale=np.float32(50.0), zneg=zimg[:, None]
    )
    assert float(tied["hard_negative_accuracy"]) == 0.0
    np.testing.assert_allclose(tied["loss_i2t"], np.log(2), rtol=1e-4)
