"""SigLIP's sigmoid loss, sharded by all-gather or by a ppermute ring with a custom VJP.

Equation: docs/design.md §4.2. The ring keeps at most one [n, n] logits block per device, in the
forward and the backward pass, whatever the number of devices D (tests/losses_sigmoid_test.py
checks the compiled program).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from region_medclip.losses.collectives import (
    Metrics,
    as_varying,
    diagonal_mask,
    f32,
    gather_rows,
    global_sum,
    per_device_zeros,
    ring_permutation,
    row_offset,
    top1_hits,
)


def _sigmoid_block_sum(logits, positive):
    """Σ −log σ(label · z) over a block, label +1 on `positive` and −1 elsewhere (Algorithm 1)."""
    labels = jnp.where(positive, 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


# The ring loops run D trips and end every trip with a hop, so the last hop of the forward pass
# only brings a text chunk home. That costs one [n, D] transfer, and buys a loop that XLA never
# collapses into straight-line code (it does for one trip), where the blocks of different hops
# and of the forward and backward passes could be alive at the same time.


def _ring_forward(zimg, ztxt, logit_scale, logit_bias, axis_name):
    """Local rows' sigmoid loss sum against every text chunk, passed around the ring.

    zimg, ztxt: [n, D] local shards; logit_scale, logit_bias: [] typed per-device.
    Returns (loss_sum [], positive logit [n], best negative logit [n]); the last two only feed the
    accuracy metric.
    """
    n = zimg.shape[0]
    eye = jnp.eye(n, dtype=bool)

    def hop(k, carry):
        # At hop k the device holds the text chunk of device (i − k) mod D; only its own chunk
        # (hop 0) holds positives, on the diagonal.
        chunk, loss_sum, best_negative = carry
        logits = (logit_scale * zimg) @ chunk.T + logit_bias
        positive = eye & (k == 0)
        loss_sum = loss_sum + _sigmoid_block_sum(logits, positive)
        negatives = jnp.where(positive, -jnp.inf, logits)
        best_negative = jnp.maximum(best_negative, jnp.max(negatives, axis=-1))
        chunk = lax.ppermute(chunk, axis_name, ring_permutation(axis_name))
        return chunk, loss_sum, best_negative

    carry = (ztxt, per_device_zeros((), axis_name), per_device_zeros((n,), axis_name, -jnp.inf))
    _, loss_sum, best_negative = lax.fori_loop(0, lax.axis_size(axis_name), hop, carry)
    positive_logit = logit_scale * jnp.sum(zimg * ztxt, axis=-1) + logit_bias
    return loss_sum, positive_logit, best_negative


def _ring_block_grads(zimg, chunk, logit_scale, logit_bias, positive, scale):
    """Gradients of `scale` × one block's sigmoid loss sum w.r.t. zimg, chunk, t and b."""
    labels = jnp.where(positive, 1.0, -1.0)
    logits = (logit_scale * zimg) @ chunk.T + logit_bias
    # d/dz [−log σ(y z)] = −y σ(−y z) with z = t x·y + b. Every product below touches [n, D]
    # arrays, not the block, so XLA keeps a single [n, n] temporary beside the logits.
    dlogits = scale * -labels * jax.nn.sigmoid(-labels * logits)
    dlogits_chunk = dlogits @ chunk  # Σ_j dz_ij y_j: [n, D]
    return (
        logit_scale * dlogits_chunk,
        logit_scale * (dlogits.T @ zimg),
        jnp.sum(dlogits_chunk * zimg),  # Σ_ij dz_ij x_i·y_j, without an [n, n] product
        jnp.sum(dlogits),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_sigmoid(zimg, ztxt, logit_scale, logit_bias, axis_name):
    return _ring_forward(zimg, ztxt, logit_scale, logit_bias, axis_name)


def _ring_sigmoid_fwd(zimg, ztxt, logit_scale, logit_bias, axis_name):
    # Only the inputs are kept for the backward pass, never the [n, n] blocks: memory stays one
    # block per device whatever the number of devices.
    outputs = _ring_forward(zimg, ztxt, logit_scale, logit_bias, axis_name)
    return outputs, (zimg, ztxt, logit_scale, logit_bias, outputs[0])


def _ring_sigmoid_bwd(axis_name, residuals, cotangents):
    zimg, ztxt, logit_scale, logit_bias, loss_sum = residuals
    scale = cotangents[0]  # The positive/negative logits are metrics only: no gradient.
    # Nothing in the backward ring depends on the forward one, so XLA may interleave them and hold
    # blocks of both; tying the inputs to the forward result makes the forward finish first.
    zimg, ztxt, scale, _ = lax.optimization_barrier((zimg, ztxt, scale, loss_sum))
    eye = jnp.eye(zimg.shape[0], dtype=bool)

    def hop(k, carry):
        # The text chunk travels the ring again, with the gradient accumulated for it so far;
        # after D hops both are back on the chunk's own device.
        chunk, dchunk, dzimg, dscale, dbias = carry
        grads = _ring_block_grads(zimg, chunk, logit_scale, logit_bias, eye & (k == 0), scale)
        chunk, dchunk = lax.ppermute(
            (chunk, dchunk + grads[1]), axis_name, ring_permutation(axis_name)
        )
        return chunk, dchunk, dzimg + grads[0], dscale + grads[2], dbias + grads[3]

    zeros = per_device_zeros(ztxt.shape, axis_name)
    scalar = per_device_zeros((), axis_name)
    carry = (ztxt, zeros, zeros, scalar, scalar)
    _, dztxt, dzimg, dscale, dbias = lax.fori_loop(0, lax.axis_size(axis_name), hop, carry)
    return dzimg, dztxt, dscale, dbias


_ring_sigmoid.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def sigmoid_contrastive_loss(
    *, zimg, ztxt, logit_scale, logit_bias, axis_name=None, impl="ring"
) -> tuple[jax.Array, Metrics]:
    """SigLIP loss: −(1/N) Σ_i Σ_j log σ(label_ij (t x_i·y_j + b)), label +1 iff i = j.

    Args:
      zimg: [n, D] L2-normalised image embeddings (local shard when `axis_name` is set).
      ztxt: [n, D] L2-normalised text embeddings; row i is paired with image row i.
      logit_scale: [] multiplier t = exp(t').
      logit_bias: [] bias b.
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.
      impl: "ring" passes text chunks around the devices with ppermute (D − 1 hops) so that no
        device holds more than one [n, n] logits block, in the forward and the backward pass;
        "gather" all-gathers the text and forms [n, N] logits. Ignored when dense.

    Returns:
      loss: [] sum over all N² pairs divided by N.
      metrics: i2t_accuracy (positive above every negative of its row), logit_scale, logit_bias,
        temperature (1 / t).
    """
    if impl not in ("ring", "gather"):
        raise ValueError(f"sigmoid impl must be 'ring' or 'gather', got {impl!r}")
    zimg, ztxt, logit_scale, logit_bias = f32(zimg, ztxt, logit_scale, logit_bias)
    n = zimg.shape[0]
    if axis_name is not None and impl == "ring":
        loss_sum, positive_logit, best_negative = _ring_sigmoid(
            zimg,
            ztxt,
            as_varying(logit_scale, axis_name),
            as_varying(logit_bias, axis_name),
            axis_name,
        )
        hits = (positive_logit > best_negative).astype(jnp.float32)
    else:
        all_txt = gather_rows(ztxt, axis_name)
        logits = logit_scale * zimg @ all_txt.T + logit_bias
        positive = diagonal_mask(n, all_txt.shape[0], row_offset(n, axis_name))
        loss_sum = _sigmoid_block_sum(logits, positive)
        hits = top1_hits(logits, positive)
    num_global = n if axis_name is None else n * lax.axis_size(axis_name)
    loss = global_sum(loss_sum, axis_name) / num_global
    metrics = dict(
        loss=loss,
        i2t_accuracy=global_sum(hits, axis_name) / num_global,
        logit_scale=logit_scale,
        logit_bias=logit_bias,
        temperature=1.0 / logit_scale,
    )
    return loss, metrics
