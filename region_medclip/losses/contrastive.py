"""Softmax-family global losses: CLIP's InfoNCE, MedCLIP semantic matching and DHN-NCE.

Equations: docs/design.md §4.1 (softmax), §4.3 (MedCLIP), §4.4 (DHN-NCE).
"""

import jax
import jax.numpy as jnp

from region_medclip.losses.collectives import (
    Metrics,
    diagonal_mask,
    f32,
    gather_rows,
    global_sum,
    masked_logsumexp,
    row_offset,
    top1_hits,
)

# --------------------------------------------------------------------------------------------------
# docs/design.md §4.1 Softmax (CLIP / InfoNCE).


def softmax_contrastive_loss(
    *, zimg, ztxt, logit_scale, axis_name=None, zneg=None, neg_mask=None
) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE of CLIP: mean over the N pairs of ½ (CE image→text + CE text→image),
    optionally with hard-negative reports in the image→text direction (NegCLIP).

    Args:
      zimg: [n, D] L2-normalised image embeddings (local shard when `axis_name` is set).
      ztxt: [n, D] L2-normalised text embeddings; row i is paired with image row i.
      logit_scale: [] multiplier t = exp(t') of the cosine similarities.
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.
      zneg: optional [n, K, D] L2-normalised embeddings of image i's own hard-negative reports
        (its report with a finding, side or zone changed); they join row i of the image→text
        softmax only, so the text→image direction and the collectives are unchanged.
      neg_mask: optional [n, K] bool, True for real hard negatives (default: all).

    Returns:
      loss: [] mean over the global batch.
      metrics: loss_i2t, loss_t2i, i2t_accuracy, t2i_accuracy (top-1 among the global batch and,
        with `zneg`, the image's hard negatives), logit_scale, temperature (1 / t); with `zneg`
        also hard_negative_accuracy (the report beats every hard negative of its image).
    """
    zimg, ztxt, logit_scale = f32(zimg, ztxt, logit_scale)
    n = zimg.shape[0]
    all_img, all_txt = gather_rows(zimg, axis_name), gather_rows(ztxt, axis_name)
    num_global = all_txt.shape[0]
    # Each device scores its own rows against every column in both directions (open_clip's
    # local_loss + gather_with_grad): [n, N] logits instead of [N, N], and the gradient of the
    # all_gather routes the column terms back to the devices that own them.
    logits_i2t = logit_scale * zimg @ all_txt.T
    logits_t2i = logits_i2t.T if axis_name is None else logit_scale * ztxt @ all_img.T
    positive = diagonal_mask(n, num_global, row_offset(n, axis_name))

    positive_t2i = positive
    extra = {}
    if zneg is not None:
        logits_i2t, positive, extra = _with_hard_negatives(
            logits_i2t, positive, zimg, zneg, neg_mask, logit_scale, axis_name, num_global
        )

    def cross_entropy(logits, positive):
        return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(positive, logits, 0), -1)

    loss_i2t = global_sum(cross_entropy(logits_i2t, positive), axis_name) / num_global
    loss_t2i = global_sum(cross_entropy(logits_t2i, positive_t2i), axis_name) / num_global
    loss = 0.5 * (loss_i2t + loss_t2i)
    metrics = dict(
        loss=loss,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        i2t_accuracy=global_sum(top1_hits(logits_i2t, positive), axis_name) / num_global,
        t2i_accuracy=global_sum(top1_hits(logits_t2i, positive_t2i), axis_name) / num_global,
        logit_scale=logit_scale,
        temperature=1.0 / logit_scale,
        **extra,
    )
    return loss, metrics


def _with_hard_negatives(logits, positive, zimg, zneg, neg_mask, logit_scale, axis_name, total):
    """Row i of the image→text ``logits [n, N]`` and ``positive [n, N]`` extended by image i's
    own hard negatives ``zneg [n, K, D]`` (masked ones at −∞): ``[n, N + K]`` each, and the
    hard_negative_accuracy metric (over the ``total`` images of the global batch)."""
    zneg = jnp.asarray(zneg, jnp.float32)
    valid = jnp.ones(zneg.shape[:2], bool) if neg_mask is None else jnp.asarray(neg_mask, bool)
    own = logit_scale * jnp.einsum("nd,nkd->nk", zimg, zneg)
    own = jnp.where(valid, own, -jnp.inf)
    paired = jnp.sum(jnp.where(positive, logits, 0), -1)
    beats = jnp.all(paired[:, None] > own, axis=-1).astype(jnp.float32)
    metric = dict(hard_negative_accuracy=global_sum(beats, axis_name) / total)
    logits = jnp.concatenate([logits, own], axis=-1)
    positive = jnp.concatenate([positive, jnp.zeros(own.shape, bool)], axis=-1)
    return logits, positive, metric


# --------------------------------------------------------------------------------------------------
# docs/design.md §4.3 MedCLIP semantic matching.


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
    img_mask=None,
    txt_mask=None,
) -> tuple[jax.Array, Metrics]:
    """MedCLIP semantic-matching loss with soft targets from label similarity.

    Images and texts need not be paired: they may come from different sources and sizes, and a
    batch of rows that hold an image only or a report only masks out the side each lacks.

    Args:
      zimg: [n_img, D] L2-normalised image embeddings (local shard when `axis_name` is set).
      ztxt: [n_txt, D] L2-normalised text embeddings.
      img_labels: [n_img, C] multi-hot findings of the images (all zeros = no finding).
      txt_labels: [n_txt, C] multi-hot findings of the texts.
      logit_scale: [] multiplier t = exp(t') of the embedding similarities.
      label_temperature: τ_label of the soft targets softmax(s_ij / τ_label).
      axis_name: None for the dense loss, else the mesh axis both batches are sharded over.
      img_mask: optional [n_img] bool, False for rows without an image (default: all True):
        they are neither a row of L^{v→t} nor a column of L^{t→v}.
      txt_mask: optional [n_txt] bool, the same for texts.

    Returns:
      loss: [] ½ (L^{v→t} + L^{t→v}), each a mean over its global valid rows.
      metrics: loss_i2t, loss_t2i, i2t_accuracy / t2i_accuracy (top-1 has the highest label
        similarity of its row), logit_scale, temperature, images / texts (global valid rows).
    """
    zimg, ztxt, logit_scale = f32(zimg, ztxt, logit_scale)
    img_dirs, txt_dirs = _label_directions(img_labels), _label_directions(txt_labels)
    img_ok = _mask(img_mask, zimg.shape[0])
    txt_ok = _mask(txt_mask, ztxt.shape[0])

    def direction(rows, row_dirs, row_ok, cols, col_dirs, col_ok):
        # s_ij: cosine of the label vectors; targets y_i = softmax_j(s_ij / τ_label); predictions
        # ŷ_i = softmax_j(t x_i·y_j); per-row cross-entropy −Σ_j y_ij log ŷ_ij. Absent columns
        # take part in neither softmax; absent rows count nothing.
        valid = gather_rows(col_ok.astype(jnp.float32), axis_name)[None, :] > 0
        similarity = row_dirs @ gather_rows(col_dirs, axis_name).T
        targets = jax.nn.softmax(jnp.where(valid, similarity / label_temperature, -jnp.inf), -1)
        logits = jnp.where(valid, logit_scale * rows @ gather_rows(cols, axis_name).T, -jnp.inf)
        log_probs = jnp.where(valid, jax.nn.log_softmax(logits, axis=-1), 0.0)
        cross_entropy = -jnp.sum(targets * log_probs, axis=-1)
        best_match = similarity >= jnp.max(
            jnp.where(valid, similarity, -jnp.inf), -1, keepdims=True
        )
        hits = top1_hits(logits, best_match, jnp.broadcast_to(valid, logits.shape))
        return jnp.where(row_ok, cross_entropy, 0.0), jnp.where(row_ok, hits, 0.0)

    ce_i2t, hits_i2t = direction(zimg, img_dirs, img_ok, ztxt, txt_dirs, txt_ok)
    ce_t2i, hits_t2i = direction(ztxt, txt_dirs, txt_ok, zimg, img_dirs, img_ok)
    num_img = jnp.maximum(global_sum(img_ok.astype(jnp.float32), axis_name), 1.0)
    num_txt = jnp.maximum(global_sum(txt_ok.astype(jnp.float32), axis_name), 1.0)
    loss_i2t = global_sum(ce_i2t, axis_name) / num_img
    loss_t2i = global_sum(ce_t2i, axis_name) / num_txt
    loss = 0.5 * (loss_i2t + loss_t2i)
    metrics = dict(
        loss=loss,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        i2t_accuracy=global_sum(hits_i2t, axis_name) / num_img,
        t2i_accuracy=global_sum(hits_t2i, axis_name) / num_txt,
        logit_scale=logit_scale,
        temperature=1.0 / logit_scale,
        images=num_img,
        texts=num_txt,
    )
    return loss, metrics


def _mask(mask, n: int) -> jax.Array:
    """[n] bool: ``mask``, or all True when it is None."""
    return jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool)


# --------------------------------------------------------------------------------------------------
# docs/design.md §4.4 DHN-NCE (MedCLIP-SAM).


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
        + masked_logsumexp((1.0 + beta) * similarity, negative)
        - masked_logsumexp(beta * similarity, negative)
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
    zimg, ztxt, temperature = f32(zimg, ztxt, temperature)
    n = zimg.shape[0]
    all_img, all_txt = gather_rows(zimg, axis_name), gather_rows(ztxt, axis_name)
    num_global = all_txt.shape[0]
    similarity_i2t = zimg @ all_txt.T / temperature
    similarity_t2i = similarity_i2t.T if axis_name is None else ztxt @ all_img.T / temperature
    positive = diagonal_mask(n, num_global, row_offset(n, axis_name))
    divisor = num_global if reduction == "mean" else 1
    loss_i2t = global_sum(_dhn_nce_rows(similarity_i2t, positive, beta1), axis_name) / divisor
    loss_t2i = global_sum(_dhn_nce_rows(similarity_t2i, positive, beta2), axis_name) / divisor
    loss = loss_i2t + loss_t2i
    metrics = dict(
        loss=loss,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        i2t_accuracy=global_sum(top1_hits(similarity_i2t, positive), axis_name) / num_global,
        t2i_accuracy=global_sum(top1_hits(similarity_t2i, positive), axis_name) / num_global,
        temperature=temperature,
    )
    return loss, metrics
