"""Contrastive, region, word–patch and distillation losses; the equations are in docs/design.md §4.

Every loss is a pure function with keyword-only arguments that returns `(loss, metrics)`.
Embeddings are L2-normalised. With `axis_name=None` a loss is the dense loss over what it is given.
With an axis name it must run inside `jax.shard_map` (with the default `check_vma=True`) over that
mesh axis: it receives the local shard of the batch and returns the loss of the *global* batch,
identical on every device, and so are all its metrics. Sharded values and gradients equal the dense
ones (tests/losses_*_test.py).

A `logit_scale` argument is the multiplier `t = exp(t')` itself, not its log; `total_loss` is the
one place that exponentiates the model's `t'`.

Modules:
  collectives  gathers, global sums and means, masks, the per-device typing of shard_map.
  contrastive  softmax_contrastive_loss (§4.1), medclip_loss (§4.3), dhn_nce_loss (§4.4).
  sigmoid      sigmoid_contrastive_loss (§4.2): all-gather, or a ppermute ring with a custom VJP.
  region       roi_contrastive_loss, negative_caption_loss, distillation_loss (§4.5).
  local        gloria_local_loss and its local_similarity (§4.6): report words attend over patches.
  boxes        box_loss (§4.7): the box head's L1 + generalised IoU and objectness.
  total        total_loss (§4.5) and GLOBAL_KINDS, the choices of config.loss.global_kind.
"""

from region_medclip.losses.boxes import box_loss
from region_medclip.losses.collectives import Metrics
from region_medclip.losses.contrastive import dhn_nce_loss, medclip_loss, softmax_contrastive_loss
from region_medclip.losses.local import gloria_local_loss, local_similarity
from region_medclip.losses.region import (
    distillation_loss,
    negative_caption_loss,
    roi_contrastive_loss,
)
from region_medclip.losses.sigmoid import sigmoid_contrastive_loss
from region_medclip.losses.total import GLOBAL_KINDS, total_loss

__all__ = [
    "GLOBAL_KINDS",
    "Metrics",
    "box_loss",
    "dhn_nce_loss",
    "distillation_loss",
    "gloria_local_loss",
    "local_similarity",
    "medclip_loss",
    "negative_caption_loss",
    "roi_contrastive_loss",
    "sigmoid_contrastive_loss",
    "softmax_contrastive_loss",
    "total_loss",
]
