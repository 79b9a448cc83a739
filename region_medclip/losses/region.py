"""Region losses: ROI↔caption InfoNCE, hard-negative captions and concept distillation.

Equations: docs/design.md §4.5. Every loss takes `roi_mask [b, R]`: padded ROIs may hold any
garbage, NaN included; they are zeroed before use and reach neither the loss nor the gradient,
and means are taken over the valid ROIs of the global batch (0 when there are none).
"""

import jax
import jax.numpy as jnp
from jax import lax

from region_medclip.losses.collectives import (
    Metrics,
    diagonal_mask,
    gather_rows,
    global_mean,
    masked_logsumexp,
    masked_rows,
    row_offset,
    top1_hits,
)


def _multi_positive_cross_entropy(logits, positive, valid_cols):
    """−Σ_j y_ij log softmax_j(l_ij) over valid columns, y_i uniform over the row's positives.

    logits, positive, valid_cols: [n, N]. Returns [n].
    """
    num_positive = jnp.maximum(jnp.sum(positive, axis=-1), 1)
    positive_mean = jnp.sum(jnp.where(positive, logits, 0.0), axis=-1) / num_positive
    return masked_logsumexp(logits, valid_cols) - positive_mean


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
    rois = masked_rows(zroi.reshape(b * num_rois, -1), mask)
    caps = masked_rows(zcap.reshape(b * num_rois, -1), mask)
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    all_rois, all_caps = gather_rows(rois, axis_name), gather_rows(caps, axis_name)
    all_mask = gather_rows(mask, axis_name)
    # l_ij = t · zroi_i · zcap_j over local rows and global columns, and the transpose direction.
    logits_r2c = logit_scale * rois @ all_caps.T
    logits_c2r = logits_r2c.T if axis_name is None else logit_scale * caps @ all_rois.T
    positive = diagonal_mask(b * num_rois, all_mask.shape[0], row_offset(b * num_rois, axis_name))
    if cap_ids is not None:
        ids = jnp.asarray(cap_ids).reshape(b * num_rois)
        positive |= ids[:, None] == gather_rows(ids, axis_name)[None, :]
    valid_cols = jnp.broadcast_to(all_mask[None, :], positive.shape)
    positive &= valid_cols
    loss_r2c, num_valid = global_mean(
        _multi_positive_cross_entropy(logits_r2c, positive, valid_cols), mask, axis_name
    )
    # The positive relation is symmetric, so the same [local, global] mask serves captions→ROIs.
    loss_c2r, _ = global_mean(
        _multi_positive_cross_entropy(logits_c2r, positive, valid_cols), mask, axis_name
    )
    loss = 0.5 * (loss_r2c + loss_c2r)
    hits, _ = global_mean(top1_hits(logits_r2c, positive, valid_cols), mask, axis_name)
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
    zroi, zcap = masked_rows(zroi, roi_mask), masked_rows(zcap, roi_mask)
    zneg = masked_rows(zneg, neg_mask)
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    positive = logit_scale * jnp.sum(zroi * zcap, axis=-1)  # t s_i+: [b, R]
    negative = logit_scale * jnp.einsum("brd,brkd->brk", zroi, zneg)  # [b, R, K]
    # The positive is always present, so the logsumexp is finite even with every negative padded.
    logits = jnp.concatenate([positive[..., None], jnp.where(neg_mask, negative, -jnp.inf)], -1)
    per_roi = jax.nn.logsumexp(logits, axis=-1) - positive
    loss, num_valid = global_mean(per_roi, roi_mask, axis_name)
    # initial=-inf: K = 0 (no negatives configured) gives loss 0 and accuracy 1, not an error.
    hits = positive > jnp.max(jnp.where(neg_mask, negative, -jnp.inf), axis=-1, initial=-jnp.inf)
    accuracy, _ = global_mean(hits.astype(jnp.float32), roi_mask, axis_name)
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
    student_logits = masked_rows(student_logits, roi_mask)
    teacher_logits = masked_rows(lax.stop_gradient(teacher_logits), roi_mask)
    log_student = jax.nn.log_softmax(student_logits, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits, axis=-1)
    # Finite logits give finite log-probabilities, so p_t (log p_t − log p_s) is 0, not NaN,
    # where p_t underflows.
    kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    loss, num_valid = global_mean(kl, roi_mask, axis_name)
    agree = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
    agreement, _ = global_mean(agree.astype(jnp.float32), roi_mask, axis_name)
    return loss, dict(loss=loss, top1_agreement=agreement, num_rois=num_valid)
