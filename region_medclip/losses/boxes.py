"""The box head's loss: DETR's L1 + generalised IoU on assigned cells, and objectness.

Equations: docs/design.md §4.7. Every cell of the patch grid proposes a box and an objectness
logit (models/boxes.py); the cells a finding box is assigned to (``models.boxes.assign``)
regress it, and every cell learns whether it is one of them:

    L_box = w_1 · mean_pos ‖b − b*‖₁ + w_g · mean_pos (1 − GIoU(b, b*)) + w_o · mean_all BCE(o, pos)

Means run over the global batch (the assigned cells, and all cells), so the sharded loss equals
the dense one; a batch without findings has only the objectness term.
"""

import jax
import jax.numpy as jnp
import optax

from region_medclip.losses.collectives import Metrics, global_mean

# Where a cell has no target, its box is compared with the whole frame instead of a zero box:
# the IoU of a degenerate box divides by zero, and a NaN in a masked branch still poisons the
# gradient of ``jnp.where``.
_FRAME = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)


def generalized_iou(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a, b [..., 4]`` xyxy (positive extents) → ``(giou [...], iou [...])`` (Rezatofighi
    et al., CVPR 2019): IoU minus the share of the enclosing box that neither covers."""
    low, high = jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:])
    inter = jnp.prod(jnp.clip(high - low, 0.0, None), -1)
    area_a = jnp.prod(jnp.clip(a[..., 2:] - a[..., :2], 0.0, None), -1)
    area_b = jnp.prod(jnp.clip(b[..., 2:] - b[..., :2], 0.0, None), -1)
    union = jnp.maximum(area_a + area_b - inter, 1e-9)
    iou = inter / union
    hull = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), -1)
    return iou - (hull - union) / jnp.maximum(hull, 1e-9), iou


def box_loss(
    *,
    boxes: jax.Array,
    objectness: jax.Array,
    targets: jax.Array,
    positive: jax.Array,
    l1: float = 5.0,
    giou: float = 2.0,
    objectness_weight: float = 1.0,
    axis_name=None,
) -> tuple[jax.Array, Metrics]:
    """L_box of the box head's proposals.

    Args:
      boxes: ``[n, K, 4]`` each cell's box, normalised xyxy (local shard when sharded).
      objectness: ``[n, K]`` logits.
      targets: ``[n, K, 4]`` each cell's assigned finding box (anything where not positive).
      positive: ``[n, K]`` bool, the cells a finding box is assigned to.
      l1, giou, objectness_weight: the three terms' weights (``config.loss.box``).
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.

    Returns:
      loss: [] the weighted sum.
      metrics: ``l1``, ``giou_loss``, ``objectness`` (each term unweighted), ``iou`` (mean IoU of
      the assigned cells' boxes), ``positives`` (assigned cells in the global batch).
    """
    boxes, objectness = jnp.asarray(boxes, jnp.float32), jnp.asarray(objectness, jnp.float32)
    positive = jnp.asarray(positive, bool)
    targets = jnp.where(positive[..., None], jnp.asarray(targets, jnp.float32), _FRAME)
    distance = jnp.sum(jnp.abs(boxes - targets), -1)
    loss_l1, count = global_mean(distance, positive, axis_name)
    gen, iou = generalized_iou(boxes, targets)
    loss_giou, _ = global_mean(1.0 - gen, positive, axis_name)
    mean_iou, _ = global_mean(iou, positive, axis_name)
    bce = optax.sigmoid_binary_cross_entropy(objectness, positive.astype(jnp.float32))
    loss_obj, _ = global_mean(bce, jnp.ones_like(positive), axis_name)
    loss = l1 * loss_l1 + giou * loss_giou + objectness_weight * loss_obj
    metrics = dict(
        loss=loss,
        l1=loss_l1,
        giou_loss=loss_giou,
        objectness=loss_obj,
        iou=mean_iou,
        positives=count,
    )
    return loss, metrics
