"""The Optax optimizer from ``config.optim``.

AdamW with linear warmup then cosine (or linear / constant) decay, global-norm clipping, weight
decay only on matrices, per-tower learning-rate multipliers and frozen towers (no optimizer state,
zero update, excluded from the gradient norm).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# Top-level param collections → the tower they belong to (`config.optim.tower_lr` keys).
TOWERS = {"image_tower": "image", "text_tower": "text", "region_tower": "region"}
HEAD = "head"  # logit_scale, logit_bias and anything else outside the towers
FROZEN = "frozen"


def schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Learning rate at each step: linear warmup to ``lr`` then ``optim.schedule`` decay to 0."""
    lr, warmup = float(optim_config.lr), int(optim_config.warmup_steps)
    total_steps = max(int(total_steps), warmup + 1)
    kind = optim_config.schedule
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=0.0)
    if kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, total_steps - warmup)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"config.optim.schedule={kind!r}: choose cosine, linear or constant")
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def param_labels(params, optim_config) -> dict:
    """Per-leaf group name: ``image`` | ``text`` | ``region`` | ``head`` | ``frozen``."""
    freeze = dict(optim_config.freeze)

    def label(name: str):
        group = TOWERS.get(name, HEAD)
        return FROZEN if freeze.get(group, False) else group

    return {
        name: jax.tree.map(functools.partial(lambda g, _: g, label(name)), sub)
        for name, sub in params.items()
    }


def decay_mask(params):
    """Weight decay on matrices and higher-rank kernels / embeddings only, never on biases,
    norm scales or the scalar temperature and bias (docs/design.md §6)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    optim_config, params, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
    """Builds the optimizer for ``params`` (a pytree, arrays or shapes).

    Returns:
      tx: the ``GradientTransformation``.
      lr_fn: step → base learning rate (towers scale it by ``optim.tower_lr``), for logging.
    """
    lr_fn = schedule(optim_config, total_steps)
    labels = param_labels(params, optim_config)
    mu_dtype = jnp.dtype(optim_config.mu_dtype)
    multipliers = dict(optim_config.tower_lr)
    for key in multipliers:
        if key not in (*TOWERS.values(), HEAD):
            raise ValueError(f"config.optim.tower_lr.{key}: unknown tower; use image/text/region")

    def adamw(multiplier: float) -> optax.GradientTransformation:
        return optax.adamw(
            lambda step: lr_fn(step) * multiplier,
            b1=optim_config.b1,
            b2=optim_config.b2,
            mu_dtype=mu_dtype,
            weight_decay=optim_config.weight_decay,
            mask=decay_mask,
        )

    groups = {
        group: adamw(float(multipliers.get(group, 1.0))) for group in (*TOWERS.values(), HEAD)
    }
    groups[FROZEN] = optax.set_to_zero()
    frozen = jax.tree.map(lambda g: g == FROZEN, labels)
    chain = [optax.masked(optax.set_to_zero(), frozen)]  # frozen grads out of the global norm
    if optim_config.grad_clip and optim_config.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(optim_config.grad_clip))
    chain.append(optax.multi_transform(groups, labels))
    return optax.chain(*chain), lr_fn
