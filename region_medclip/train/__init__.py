"""Training: mesh → sharded state → jitted train step → loop with checkpoints and metrics.

- ``state``: the ``TrainState`` pytree and its sharded creation.
- ``optim``: the optax chain from ``config.optim``.
- ``init``: model, optimizer and state layout (``setup``); params from another run; restore.
- ``step``: forward, the sharded loss, accumulation and the guarded update.
- ``distillation``: the frozen teacher and its concept vocabulary.
- ``loop``: ``train_and_evaluate``.
"""

import importlib

from region_medclip.train.init import Setup, load_init_params, overlay_params, setup
from region_medclip.train.step import forward, make_train_step, sharded_total_loss

# The loop and the teacher read data (grain, TFDS); they are imported when first named, so that
# the model, the optimizer and the step (``setup``, ``make_train_step``) import without them, as
# ``bench gpu`` does on a machine that has neither.
_LAZY = {
    "Teacher": "distillation",
    "concept_vocabulary": "distillation",
    "train_and_evaluate": "loop",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
