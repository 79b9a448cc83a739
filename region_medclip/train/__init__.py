"""Training: mesh → sharded state → jitted train step → loop with checkpoints and metrics.

- ``state``: the ``TrainState`` pytree and its sharded creation.
- ``optim``: the optax chain from ``config.optim``.
- ``init``: model, optimizer and state layout (``setup``); params from another run; restore.
- ``step``: forward, the sharded loss, accumulation and the guarded update.
- ``distillation``: the frozen teacher and its concept vocabulary.
- ``loop``: ``train_and_evaluate``.
"""

from region_medclip.train.distillation import Teacher, concept_vocabulary
from region_medclip.train.init import Setup, load_init_params, overlay_params, setup
from region_medclip.train.loop import train_and_evaluate
from region_medclip.train.step import forward, make_train_step, sharded_total_loss

__all__ = [
    "Setup",
    "Teacher",
    "concept_vocabulary",
    "forward",
    "load_init_params",
    "make_train_step",
    "overlay_params",
    "setup",
    "sharded_total_loss",
    "train_and_evaluate",
]
