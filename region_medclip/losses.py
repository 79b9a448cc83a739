"""Contrastive, region and distillation losses (DESIGN.md section 4).

Every loss is a pure function with keyword-only arguments that returns `(loss, metrics)`.
Embeddings are L2-normalised. With `axis_name=None` a loss is the dense loss over what it is given.
With an axis name it must run inside `jax.shard_map` (with the default `check_vma=True`) over that
mesh axis: it receives the local shard of the batch and returns the loss of the *global* batch,
identical on every device, and so are all its metrics. Sharded values and gradients equal the dense
ones (tests/losses_test.py).

A `logit_scale` argument is the multiplier `t = exp(t')` itself, not its log; `total_loss` is the
one place that exponentiates the model's `t'`.
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Metrics = dict[str, jax.Array]
GLOBAL_KINDS = ("softmax", "sigmoid", "medclip", "dhn_nce")

# --------------------------------------------------------------------------------------------------
# Helpers shared by the losses.


def _gather_rows(x, axis_name):
    """[n, ...] local shard -> [N, ...] global batch, in device order; identity when dense."""
    if axis_name is None:
        return x
    return lax.all_gather(x, axis_name, axis=0, tiled=True)


def _global_sum(x, axis_name):
    """Sum of `x` over the global batch; the psum makes it identical on every device."""
    total = jnp.sum(x)
    return total if axis_name is None else lax.psum(total, axis_name)


def _row_offset(num_local, axis_name):
    """Global index of this shard's first row (tiled all_gather puts shard k at k * n)."""
    return 0 if axis_name is None else lax.axis_index(axis_name) * num_local


def _masked_logsumexp(logits, mask):
    """logsumexp over the last axis of the entries where `mask` is True.

    A row with no valid entry would give log(0) and a NaN gradient, so such rows are computed over
    all their entries instead; callers drop those rows from the loss.
    """
    any_valid = jnp.any(mask, axis=-1, keepdims=True)
    return jax.nn.logsumexp(jnp.where(mask | ~any_valid, logits, -jnp.inf), axis=-1)


def _top1_hits(logits, positive, valid=None):
    """1.0 where a row's best positive column scores above every other valid column."""
    valid = jnp.ones_like(positive) if valid is None else valid
    best_positive = jnp.max(jnp.where(positive & valid, logits, -jnp.inf), axis=-1)
    best_negative = jnp.max(jnp.where(~positive & valid, logits, -jnp.inf), axis=-1)
    return (best_positive > best_negative).astype(jnp.float32)


def _diagonal_mask(num_rows, num_cols, offset):
    """[n, N] bool, True at column `offset + i` of row i: the positive pair of each local row."""
    return jnp.arange(num_cols)[None, :] == (offset + jnp.arange(num_rows))[:, None]


def _as_varying(x, axis_name):
    """Marks a replicated value as per-device before it enters a custom_vjp inside shard_map.

    The custom_vjp returns per-device cotangents; typing the input as per-device makes the
    transpose of this cast (a psum) add them up into the gradient of the replicated value.
    """
    x = jnp.asarray(x, jnp.float32)
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    # Only the axes it is not yet per-device over (jax 0.10 type field).
    missing = tuple(a for a in names if a not in jax.typeof(x).mat.varying)
    return lax.pcast(x, missing, to="varying") if missing else x


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


# --------------------------------------------------------------------------------------------------
# 4.1 Softmax (CLIP / InfoNCE).


def softmax_contrastive_loss(
    *, zimg, ztxt, logit_scale, axis_name=None
) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE of CLIP: mean over the N pairs of ½ (CE image→text + CE text→image).

    Args:
      zimg: [n, D] L2-normalised image embeddings (local shard when `axis_name` is set).
      ztxt: [n, D] L2-normalised text embeddings; row i is paired with image row i.
      logit_scale: [] multiplier t = exp(t') of the cosine similarities.
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.

    Returns:
      loss: [] mean over the global batch.
      metrics: loss_i2t, loss_t2i, i2t_accuracy, t2i_accuracy (top-1 among the global batch),
        logit_scale, temperature (1 / t).
    """
    zimg, ztxt, logit_scale = _f32(zimg, ztxt, logit_scale)
    n = zimg.shape[0]
    all_img, all_txt = _gather_rows(zimg, axis_name), _gather_rows(ztxt, axis_name)
    num_global = all_txt.shape[0]
    # Each device scores its own rows against every column in both directions (open_clip's
    # local_loss + gather_with_grad): [n, N] logits instead of [N, N], and the gradient of the
    # all_gather routes the column terms back to the devices that own them.
    logits_i2t = logit_scale * zimg @ all_txt.T
    logits_t2i = logits_i2t.T if axis_name is None else logit_scale * ztxt @ all_img.T
    positive = _diagonal_mask(n, num_global, _row_offset(n, axis_name))

    def cross_entropy(logits):
        return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(positive, logits, 0), -1)

    loss_i2t = _global_sum(cross_entropy(logits_i2t), axis_name) / num_global
    loss_t2i = _global_sum(cross_entropy(logits_t2i), axis_name) / num_global
    loss = 0.5 * (loss_i2t + loss_t2i)
    metrics = dict(
        loss=loss,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        i2t_accuracy=_global_sum(_top1_hits(logits_i2t, positive), axis_name) / num_global,
        t2i_accuracy=_global_sum(_top1_hits(logits_t2i, positive), axis_name) / num_global,
        logit_scale=logit_scale,
        temperature=1.0 / logit_scale,
    )
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# 4.2 Sigmoid (SigLIP).


def _sigmoid_block_sum(logits, positive):
    """Σ −log σ(label · z) over a block, label +1 on `positive` and −1 elsewhere (Algorithm 1)."""
    labels = jnp.where(positive, 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def _ring_permutation(axis_name):
    size = lax.axis_size(axis_name)
    return [(source, (source + 1) % size) for source in range(size)]


def _per_device_zeros(shape, axis_name, fill=0.0):
    """A loop carry that will hold per-device values must start out typed as per-device."""
    return _as_varying(jnp.full(shape, fill, jnp.float32), axis_name)


# The ring loops run D trips and end every trip with a hop, so the last hop of the forward pass
# only brings a text chunk home. That costs one [n, D] transfer, and buys a loop that XLA never
# collapses into straight-line code (it does for one trip), where the blocks of different hops
# and of the forward and backward passes could be alive at the same time.


def _ring_forward(zimg, ztxt, logit_scale, logit_bias, axis_name):
    """Local rows' sigmoid loss sum against every text chunk, passed around the ring.

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
        chunk = lax.ppermute(chunk, axis_name, _ring_permutation(axis_name))
        return chunk, loss_sum, best_negative

    carry = (ztxt, _per_device_zeros((), axis_name), _per_device_zeros((n,), axis_name, -jnp.inf))
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
            (chunk, dchunk + grads[1]), axis_name, _ring_permutation(axis_name)
        )
        return chunk, dchunk, dzimg + grads[0], dscale + grads[2], dbias + grads[3]

    zeros = _per_device_zeros(ztxt.shape, axis_name)
    scalar = _per_device_zeros((), axis_name)
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
    zimg, ztxt, logit_scale, logit_bias = _f32(zimg, ztxt, logit_scale, logit_bias)
    n = zimg.shape[0]
    if axis_name is not None and impl == "ring":
        loss_sum, positive_logit, best_negative = _ring_sigmoid(
            zimg,
            ztxt,
            _as_varying(logit_scale, axis_name),
            _as_varying(logit_bias, axis_name),
            axis_name,
        )
        hits = (positive_logit > best_negative).astype(jnp.float32)
    else:
        all_txt = _gather_rows(ztxt, axis_name)
        logits = logit_scale * zimg @ all_txt.T + logit_bias
        positive = _diagonal_mask(n, all_txt.shape[0], _row_offset(n, axis_name))
        loss_sum = _sigmoid_block_sum(logits, positive)
        hits = _top1_hits(logits, positive)
    num_global = n if axis_name is None else n * lax.axis_size(axis_name)
    loss = _global_sum(loss_sum, axis_name) / num_global
    metrics = dict(
        loss=loss,
        i2t_accuracy=_global_sum(hits, axis_name) / num_global,
        logit_scale=logit_scale,
        logit_bias=logit_bias,
        temperature=1.0 / logit_scale,
    )
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# 4.3 MedCLIP semantic matching.


def _label_directions(labels):
    """[n, C] multi-hot -> [n, C + 1] unit vectors; the extra dimension is "no finding".

    Without it an all-zero label vector has no direction and its cosine is undefined.
    """
    labels = jnp.asarray(labels, jnp.float32)
    no_finding = jnp.all(labels == 0, axis=-1, keepdims=True).astype(jnp.float32)
    labels = jnp.concatenate([labels, no_finding], axis=-1)
    return labels / jnp.linalg.norm(labels, axis=-1, keepdims=True)


def medclip_loss(
    *,
    zimg,
    ztxt,
    img_labels,
    txt_labels,
    logit_scale,
    label_temperature=1.0,
    axis_name=None,
) -> tuple[jax.Array, Metrics]:
    """MedCLIP semantic-matching loss with soft targets from label similarity.

    Images and texts need not be paired: they may come from different sources and sizes.

    Args:
      zimg: [n_img, D] L2-normalised image embeddings (local shard when `axis_name` is set).
      ztxt: [n_txt, D] L2-normalised text embeddings.
      img_labels: [n_img, C] multi-hot findings of the images (all zeros = no finding).
      txt_labels: [n_txt, C] multi-hot findings of the texts.
      logit_scale: [] multiplier t = exp(t') of the embedding similarities.
      label_temperature: τ_label of the soft targets softmax(s_ij / τ_label).
      axis_name: None for the dense loss, else the mesh axis both batches are sharded over.

    Returns:
      loss: [] ½ (L^{v→t} + L^{t→v}), each a mean over its global rows.
      metrics: loss_i2t, loss_t2i, i2t_accuracy / t2i_accuracy (top-1 has the highest label
        similarity of its row), logit_scale, temperature.
    """
    zimg, ztxt, logit_scale = _f32(zimg, ztxt, logit_scale)
    img_dirs, txt_dirs = _label_directions(img_labels), _label_directions(txt_labels)

    def direction(rows, row_dirs, cols, col_dirs):
        # s_ij: cosine of the label vectors; targets y_i = softmax_j(s_ij / τ_label); predictions
        # ŷ_i = softmax_j(t x_i·y_j); per-row cross-entropy −Σ_j y_ij log ŷ_ij.
        similarity = row_dirs @ _gather_rows(col_dirs, axis_name).T
        targets = jax.nn.softmax(similarity / label_temperature, axis=-1)
        logits = logit_scale * rows @ _gather_rows(cols, axis_name).T
        cross_entropy = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
        best_match = similarity >= jnp.max(similarity, axis=-1, keepdims=True)
        num_global = logits.shape[1]  # global size of the *other* batch
        return cross_entropy, _top1_hits(logits, best_match), num_global

    ce_i2t, hits_i2t, num_txt = direction(zimg, img_dirs, ztxt, txt_dirs)
    ce_t2i, hits_t2i, num_img = direction(ztxt, txt_dirs, zimg, img_dirs)
    loss_i2t = _global_sum(ce_i2t, axis_name) / num_img
    loss_t2i = _global_sum(ce_t2i, axis_name) / num_txt
    loss = 0.5 * (loss_i2t + loss_t2i)
    metrics = dict(
        loss=loss,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        i2t_accuracy=_global_sum(hits_i2t, axis_name) / num_img,
        t2i_accuracy=_global_sum(hits_t2i, axis_name) / num_txt,
        logit_scale=logit_scale,
        temperature=1.0 / logit_scale,
    )
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# 4.4 DHN-NCE (MedCLIP-SAM).


def _dhn_nce_rows(similarity, positive, beta):
    """Per-row −s_ii + log Σ_{j≠i} W_ij e^{s_ij} (eq. 1–2) with W_ij of eq. 4–5 in closed form.

    similarity: [n, N] s_ij = x_i·y_j / τ of the local rows; positive: [n, N] the diagonal.
    """
    num_global = similarity.shape[1]
    s_ii = jnp.sum(jnp.where(positive, similarity, 0), axis=-1)
    if num_global == 1:  # No negatives at all: only the positive term is defined.
        return -s_ii
    # W_ij = (N−1) e^{β s_ij} / Σ_{k≠i} e^{β s_ik}, so
    # log Σ_{j≠i} W_ij e^{s_ij} = log(N−1) + LSE_{j≠i}((1+β) s_ij) − LSE_{j≠i}(β s_ij),
    # which never forms e^{s} and never puts the positive in the denominator.
    negative = ~positive
    log_weighted = (
        jnp.log(num_global - 1.0)
        + _masked_logsumexp((1.0 + beta) * similarity, negative)
        - _masked_logsumexp(beta * similarity, negative)
    )
    return -s_ii + log_weighted


def dhn_nce_loss(
    *, zimg, ztxt, temperature, beta1, beta2, axis_name=None, reduction="mean"
) -> tuple[jax.Array, Metrics]:
    """Decoupled hard-negative NCE of MedCLIP-SAM (eq. 1–5): L = L^{v→t} + L^{t→v}.

    Args:
      zimg: [n, D] L2-normalised image embeddings (local shard when `axis_name` is set).
      ztxt: [n, D] L2-normalised text embeddings; row i is paired with image row i.
      temperature: τ, s_ij = x_i·y_j / τ (MedCLIP-SAM: 0.6).
      beta1: hardness β1 of the image→text weights (0.15).
      beta2: hardness β2 of the text→image weights (0.15).
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.
      reduction: "sum" reproduces eq. 1–3 exactly; "mean" divides by N so that the scale does not
        grow with the batch.

    Returns:
      loss: [] the reduced loss over the global batch.
      metrics: loss_i2t, loss_t2i (same reduction), i2t_accuracy, t2i_accuracy, temperature.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    zimg, ztxt, temperature = _f32(zimg, ztxt, temperature)
    n = zimg.shape[0]
    all_img, all_txt = _gather_rows(zimg, axis_name), _gather_rows(ztxt, axis_name)
    num_global = all_txt.shape[0]
    similarity_i2t = zimg @ all_txt.T / temperature
    similarity_t2i = similarity_i2t.T if axis_name is None else ztxt @ all_img.T / temperature
    positive = _diagonal_mask(n, num_global, _row_offset(n, axis_name))
    divisor = num_global if reduction == "mean" else 1
    loss_i2t = _global_sum(_dhn_nce_rows(similarity_i2t, positive, beta1), axis_name) / divisor
    loss_t2i = _global_sum(_dhn_nce_rows(similarity_t2i, positive, beta2), axis_name) / divisor
    loss = loss_i2t + loss_t2i
    metrics = dict(
        loss=loss,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        i2t_accuracy=_global_sum(_top1_hits(similarity_i2t, positive), axis_name) / num_global,
        t2i_accuracy=_global_sum(_top1_hits(similarity_t2i, positive), axis_name) / num_global,
        temperature=temperature,
    )
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# 4.5 Region losses.


def _masked_rows(x, mask):
    """Zeroes padded entries: garbage (even NaN) in them reaches neither loss nor gradient."""
    return jnp.where(mask[..., None], jnp.asarray(x, jnp.float32), 0.0)


def _global_mean(values, mask, axis_name):
    """Mean of `values` over the True entries of `mask` in the global batch; 0 if there are none."""
    total = _global_sum(jnp.where(mask, values, 0.0), axis_name)
    count = _global_sum(mask.astype(jnp.float32), axis_name)
    return total / jnp.maximum(count, 1.0), count


def _multi_positive_cross_entropy(logits, positive, valid_cols):
    """−Σ_j y_ij log softmax_j(l_ij) over valid columns, y_i uniform over the row's positives."""
    num_positive = jnp.maximum(jnp.sum(positive, axis=-1), 1)
    positive_mean = jnp.sum(jnp.where(positive, logits, 0.0), axis=-1) / num_positive
    return _masked_logsumexp(logits, valid_cols) - positive_mean


def roi_contrastive_loss(
    *, zroi, zcap, roi_mask, cap_ids=None, logit_scale, axis_name=None
) -> tuple[jax.Array, Metrics]:
    """Symmetric region↔caption InfoNCE over the valid ROIs of the global batch.

    Args:
      zroi: [b, R, D] L2-normalised ROI embeddings (local shard when `axis_name` is set).
      zcap: [b, R, D] L2-normalised embeddings of each ROI's caption.
      roi_mask: [b, R] bool, False for padded ROIs (rows and columns are excluded).
      cap_ids: optional [b, R] int caption ids; ROIs whose captions share an id are positives of
        each other, otherwise identical captions would be counted as false negatives.
      logit_scale: [] multiplier t (1 / roi temperature).
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.

    Returns:
      loss: [] ½ (L_r + L_c), each a mean over the valid ROIs; 0 when there are none.
      metrics: loss_r2c, loss_c2r, r2c_accuracy (top-1 is a positive), num_rois (valid, global).
    """
    b, num_rois, _ = zroi.shape
    mask = jnp.asarray(roi_mask, bool).reshape(b * num_rois)
    rois = _masked_rows(zroi.reshape(b * num_rois, -1), mask)
    caps = _masked_rows(zcap.reshape(b * num_rois, -1), mask)
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    all_rois, all_caps = _gather_rows(rois, axis_name), _gather_rows(caps, axis_name)
    all_mask = _gather_rows(mask, axis_name)
    # l_ij = t · zroi_i · zcap_j over local rows and global columns, and the transpose direction.
    logits_r2c = logit_scale * rois @ all_caps.T
    logits_c2r = logits_r2c.T if axis_name is None else logit_scale * caps @ all_rois.T
    positive = _diagonal_mask(b * num_rois, all_mask.shape[0], _row_offset(b * num_rois, axis_name))
    if cap_ids is not None:
        ids = jnp.asarray(cap_ids).reshape(b * num_rois)
        positive |= ids[:, None] == _gather_rows(ids, axis_name)[None, :]
    valid_cols = jnp.broadcast_to(all_mask[None, :], positive.shape)
    positive &= valid_cols
    loss_r2c, num_valid = _global_mean(
        _multi_positive_cross_entropy(logits_r2c, positive, valid_cols), mask, axis_name
    )
    # The positive relation is symmetric, so the same [local, global] mask serves captions→ROIs.
    loss_c2r, _ = _global_mean(
        _multi_positive_cross_entropy(logits_c2r, positive, valid_cols), mask, axis_name
    )
    loss = 0.5 * (loss_r2c + loss_c2r)
    hits, _ = _global_mean(_top1_hits(logits_r2c, positive, valid_cols), mask, axis_name)
    metrics = dict(
        loss=loss, loss_r2c=loss_r2c, loss_c2r=loss_c2r, r2c_accuracy=hits, num_rois=num_valid
    )
    return loss, metrics


def negative_caption_loss(
    *, zroi, zcap, zneg, roi_mask, neg_mask, logit_scale, axis_name=None
) -> tuple[jax.Array, Metrics]:
    """Each ROI against its own caption and its K hard-negative captions.

    L_neg = −mean_i log(e^{t s_i+} / (e^{t s_i+} + Σ_k e^{t s(z_r^i, z_neg^{ik})})) over valid ROIs.

    Args:
      zroi: [b, R, D] L2-normalised ROI embeddings (local shard when `axis_name` is set).
      zcap: [b, R, D] L2-normalised embeddings of each ROI's caption.
      zneg: [b, R, K, D] L2-normalised embeddings of K perturbed captions per ROI.
      roi_mask: [b, R] bool, False for padded ROIs.
      neg_mask: [b, R, K] bool, False for padded negatives.
      logit_scale: [] multiplier t.
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over (only the
        mean is global: no embedding crosses devices).

    Returns:
      loss: [] mean over the valid ROIs of the global batch; 0 when there are none.
      metrics: accuracy (own caption above all its negatives), num_rois.
    """
    roi_mask = jnp.asarray(roi_mask, bool)
    neg_mask = jnp.asarray(neg_mask, bool) & roi_mask[..., None]
    zroi, zcap = _masked_rows(zroi, roi_mask), _masked_rows(zcap, roi_mask)
    zneg = _masked_rows(zneg, neg_mask)
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    positive = logit_scale * jnp.sum(zroi * zcap, axis=-1)  # t s_i+: [b, R]
    negative = logit_scale * jnp.einsum("brd,brkd->brk", zroi, zneg)  # [b, R, K]
    # The positive is always present, so the logsumexp is finite even with every negative padded.
    logits = jnp.concatenate([positive[..., None], jnp.where(neg_mask, negative, -jnp.inf)], -1)
    per_roi = jax.nn.logsumexp(logits, axis=-1) - positive
    loss, num_valid = _global_mean(per_roi, roi_mask, axis_name)
    # initial=-inf: K = 0 (no negatives configured) gives loss 0 and accuracy 1, not an error.
    hits = positive > jnp.max(jnp.where(neg_mask, negative, -jnp.inf), axis=-1, initial=-jnp.inf)
    accuracy, _ = _global_mean(hits.astype(jnp.float32), roi_mask, axis_name)
    return loss, dict(loss=loss, accuracy=accuracy, num_rois=num_valid)


def distillation_loss(
    *, student_logits, teacher_logits, roi_mask, axis_name=None
) -> tuple[jax.Array, Metrics]:
    """KL(p_teacher ‖ p_student) per ROI over the concept vocabulary, mean over valid ROIs.

    Args:
      student_logits: [b, R, C] student ROI-concept logits, already divided by its temperature.
      teacher_logits: [b, R, C] teacher logits, already divided by its temperature; no gradient
        flows into them.
      roi_mask: [b, R] bool, False for padded ROIs.
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.

    Returns:
      loss: [] mean KL over the valid ROIs of the global batch; 0 when there are none.
      metrics: top1_agreement (student and teacher pick the same concept), num_rois.
    """
    roi_mask = jnp.asarray(roi_mask, bool)
    student_logits = _masked_rows(student_logits, roi_mask)
    teacher_logits = _masked_rows(lax.stop_gradient(teacher_logits), roi_mask)
    log_student = jax.nn.log_softmax(student_logits, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits, axis=-1)
    # Finite logits give finite log-probabilities, so p_t (log p_t − log p_s) is 0, not NaN,
    # where p_t underflows.
    kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    loss, num_valid = _global_mean(kl, roi_mask, axis_name)
    agree = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
    agreement, _ = _global_mean(agree.astype(jnp.float32), roi_mask, axis_name)
    return loss, dict(loss=loss, top1_agreement=agreement, num_rois=num_valid)


# --------------------------------------------------------------------------------------------------
# Weighted total.


def _global_term(kind, out, batch, loss_config, logit_scale, axis_name):
    if kind == "softmax":
        return softmax_contrastive_loss(
            zimg=out["zimg"], ztxt=out["ztxt"], logit_scale=logit_scale, axis_name=axis_name
        )
    if kind == "sigmoid":
        return sigmoid_contrastive_loss(
            zimg=out["zimg"],
            ztxt=out["ztxt"],
            logit_scale=logit_scale,
            logit_bias=out["logit_bias"],
            axis_name=axis_name,
            impl=loss_config.sigmoid_impl,
        )
    if kind == "medclip":
        return medclip_loss(
            zimg=out["zimg"],
            ztxt=out["ztxt"],
            img_labels=batch["labels"],
            txt_labels=batch.get("txt_labels", batch["labels"]),
            logit_scale=logit_scale,
            label_temperature=loss_config.medclip.label_temperature,
            axis_name=axis_name,
        )
    if kind == "dhn_nce":
        cfg = loss_config.dhn_nce
        return dhn_nce_loss(
            zimg=out["zimg"],
            ztxt=out["ztxt"],
            temperature=cfg.temperature,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            axis_name=axis_name,
            reduction=cfg.reduction,
        )
    raise ValueError(f"config.loss.global_kind must be one of {GLOBAL_KINDS}, got {kind!r}")


def total_loss(
    *,
    out: Mapping[str, Any],
    batch: Mapping[str, Any],
    loss_config,
    student_logits=None,
    teacher_logits=None,
    axis_name=None,
) -> tuple[jax.Array, Metrics]:
    """L_total = α L_global + β L_ROI + γ L_neg + λ L_distill (DESIGN.md 4.5).

    A term whose weight is 0 is not computed (its inputs may be absent) and reports 0.

    Args:
      out: model outputs. Always `zimg [n, D]`, `ztxt [n, D]` and `logit_scale []` — the log-scale
        t' parameter, exponentiated here. Also `logit_bias []` for the sigmoid loss; `zroi
        [n, R, D]` and `zcap [n, R, D]` (embeddings of the ROI captions) when β > 0 or γ > 0;
        `zneg [n, R, K, D]` (hard-negative captions) when γ > 0.
      batch: `roi_mask [n, R]` when β, γ or λ > 0; optional `cap_ids [n, R]` (duplicates are ROI
        positives); `neg_mask [n, R, K]` when γ > 0; `labels [n, C]` for global_kind "medclip"
        (also the text labels unless `txt_labels [n, C]` is given).
      loss_config: `config.loss`: global_kind ("softmax" | "sigmoid" | "medclip" | "dhn_nce"),
        alpha, beta, gamma, lambda_, roi_temperature (τ of the region losses; 0 or None: the
        learned t), sigmoid_impl ("ring" | "gather"), dhn_nce.{temperature, beta1, beta2,
        reduction}, medclip.label_temperature.
      student_logits, teacher_logits: [n, R, C] ROI-concept logits divided by their temperatures;
        without teacher logits the distillation term is skipped (λ treated as 0).
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.

    Returns:
      loss: [] the weighted total.
      metrics: `loss`, `<term>/loss` and every metric of each term (`global/`, `roi/`, `neg/`,
        `distill/`), the weights, `logit_scale` (t) and `temperature` (1 / t).
    """
    cfg = loss_config
    logit_scale = jnp.exp(jnp.asarray(out["logit_scale"], jnp.float32))
    roi_temperature = cfg.get("roi_temperature")
    # Region losses use a fixed τ when one is configured (> 0), else the learned global scale.
    if roi_temperature is None or roi_temperature <= 0:
        roi_scale = logit_scale
    else:
        roi_scale = jnp.float32(1.0 / roi_temperature)
    if teacher_logits is not None and student_logits is None:
        raise ValueError("total_loss got teacher_logits but no student_logits to distil into")
    lambda_ = cfg.lambda_ if teacher_logits is not None else 0.0
    terms = {"global": cfg.alpha, "roi": cfg.beta, "neg": cfg.gamma, "distill": lambda_}
    term_fns = {
        "global": lambda: _global_term(cfg.global_kind, out, batch, cfg, logit_scale, axis_name),
        "roi": lambda: roi_contrastive_loss(
            zroi=out["zroi"],
            zcap=out["zcap"],
            cap_ids=batch.get("cap_ids"),
            logit_scale=roi_scale,
            roi_mask=batch["roi_mask"],
            axis_name=axis_name,
        ),
        "neg": lambda: negative_caption_loss(
            zroi=out["zroi"],
            zcap=out["zcap"],
            zneg=out["zneg"],
            neg_mask=batch["neg_mask"],
            logit_scale=roi_scale,
            roi_mask=batch["roi_mask"],
            axis_name=axis_name,
        ),
        "distill": lambda: distillation_loss(
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            roi_mask=batch["roi_mask"],
            axis_name=axis_name,
        ),
    }
    total = jnp.float32(0.0)
    metrics = {}
    for name, weight in terms.items():
        metrics[f"{name}/weight"] = jnp.float32(weight)
        if weight == 0:
            metrics[f"{name}/loss"] = jnp.float32(0.0)
            continue
        value, term_metrics = term_fns[name]()
        total = total + weight * value
        metrics.update({f"{name}/{key}": v for key, v in term_metrics.items()})
    metrics.update(loss=total, logit_scale=logit_scale, temperature=1.0 / logit_scale)
    metrics["roi_temperature"] = 1.0 / roi_scale
    return total, metrics
