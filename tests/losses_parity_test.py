"""Parity with open_clip: our softmax / sigmoid losses equal ClipLoss / SigLipLoss (float32, 1e-5).

Values and gradients, on the same random inputs; open_clip's losses take the multiplier
t = exp(t') as their logit_scale, as ours do.
"""

import jax
import numpy as np
import pytest

from conftest import require_peer
from region_medclip import losses

pytestmark = pytest.mark.parity


def _inputs(seed, batch, dim=32):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(2, batch, dim))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return z[0].astype(np.float32), z[1].astype(np.float32)


def _torch_value_and_grads(loss_module, *arrays):
    torch = require_peer("torch")
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    loss = loss_module(*tensors)
    loss.backward()
    return loss.item(), [t.grad.numpy() for t in tensors]


def _assert_parity(ours, theirs):
    (our_loss, our_grads), (their_loss, their_grads) = ours, theirs
    np.testing.assert_allclose(float(our_loss), their_loss, rtol=1e-5)
    for ours_grad, theirs_grad in zip(our_grads, their_grads, strict=True):
        # atol for entries that nearly cancel; gradients here are of order 0.1 to 1.
        np.testing.assert_allclose(np.asarray(ours_grad), theirs_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_softmax_matches_open_clip_clip_loss(batch):
    open_clip_loss = require_peer("open_clip.loss")
    zimg, ztxt = _inputs(batch, batch)
    logit_scale = np.float32(1 / 0.07)
    theirs = _torch_value_and_grads(open_clip_loss.ClipLoss(), zimg, ztxt, logit_scale)

    def loss_fn(zimg, ztxt, logit_scale):
        return losses.softmax_contrastive_loss(zimg=zimg, ztxt=ztxt, logit_scale=logit_scale)[0]

    ours = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(zimg, ztxt, logit_scale)
    _assert_parity(ours, theirs)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_sigmoid_matches_open_clip_siglip_loss(batch):
    open_clip_loss = require_peer("open_clip.loss")
    zimg, ztxt = _inputs(100 + batch, batch)
    logit_scale, logit_bias = np.float32(10.0), np.float32(-10.0)
    theirs = _torch_value_and_grads(
        open_clip_loss.SigLipLoss(), zimg, ztxt, logit_scale, logit_bias
    )

    def loss_fn(zimg, ztxt, logit_scale, logit_bias):
        return losses.sigmoid_contrastive_loss(
            zimg=zimg, ztxt=ztxt, logit_scale=logit_scale, logit_bias=logit_bias
        )[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))
    ours = value_and_grad(zimg, ztxt, logit_scale, logit_bias)
    _assert_parity(ours, theirs)
