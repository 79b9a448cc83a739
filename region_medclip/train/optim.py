"""The Optax optimizer from ``config.optim``.

AdamW with linear warmup then cosine (or linear / constant) decay, global-norm clipping, weight
decay only on matrices, per-tower learning-rate multipliers, layer-wise learning-rate decay,
and frozen towers or frozen lower blocks (LiT's partial unlocking: no optimizer state, zero
update, excluded from the gradient norm).
"""

import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# Top-level param collections → the tower they belong to (`config.optim.tower_lr` keys).
TOWERS = {
    "image_tower": "image",
    "text_tower": "text",
    "region_tower": "region",
    "box_tower": "region",
}
HEAD = "head"  # logit_scale, logit_bias and anything else outside the towers
FROZEN = "frozen"
# Param names (the first key inside a tower) that come before its first block: patch and token
# embeddings, position embeddings, the class token and the pre-norm. Layer 0 of the tower.
EMBEDDINGS = frozenset(
    {
        "class_embedding",
        "patch_embed",
        "stem",
        "pos_embedding",
        "ln_pre",
        "token_embedding",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "ln_embed",
    }
)
_BLOCK = re.compile(r"^block(\d+)$")


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


def _keys(path) -> list[str]:
    return [str(getattr(k, "key", k)) for k in path]


def layer_ids(params) -> dict:
    """Per-leaf ``(layer, depth)`` inside its tower, as BEiT's layer-wise decay counts them: 0
    for the embeddings (:data:`EMBEDDINGS`), ``i + 1`` for ``block{i}``, ``depth + 1`` for what
    follows the blocks (final norm, pooling head, projection), where ``depth`` is the tower's
    number of blocks. Leaves outside ``image_tower`` / ``text_tower`` (the region head, the
    temperature) are ``(1, 0)``: top layers of a tower without blocks."""

    def depth(tree) -> int:
        blocks = {
            int(m.group(1))
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)
            for m in map(_BLOCK.match, _keys(path))
            if m
        }
        return max(blocks) + 1 if blocks else 0

    def layer(path, tower_depth: int) -> tuple[int, int]:
        keys = _keys(path)
        for key in keys:
            if m := _BLOCK.match(key):
                return int(m.group(1)) + 1, tower_depth
        return (0 if keys and keys[0] in EMBEDDINGS else tower_depth + 1), tower_depth

    out = {}
    for name, sub in params.items():
        if name in ("image_tower", "text_tower"):
            d = depth(sub)
            out[name] = jax.tree_util.tree_map_with_path(lambda p, _, d=d: layer(p, d), sub)
        else:
            out[name] = jax.tree.map(lambda _: (1, 0), sub)
    return out


def param_labels(params, optim_config) -> dict:
    """Per-leaf group name: ``image`` | ``text`` | ``region`` | ``head`` | ``frozen``.

    A tower is frozen whole by ``optim.freeze.<tower>``, or all but its last ``N`` blocks and what
    follows them by ``optim.unlock.<tower> = N`` (LiT's partial unlocking; -1 unlocks all)."""
    freeze = dict(optim_config.freeze)
    unlock = dict(optim_config.get("unlock", {}))
    ids = layer_ids(params)

    def label(name: str, layer_depth: tuple[int, int]):
        group = TOWERS.get(name, HEAD)
        if freeze.get(group, False):
            return FROZEN
        n = int(unlock.get(group, -1))
        layer, depth = layer_depth
        return FROZEN if n >= 0 and layer <= depth - n else group

    return {
        name: jax.tree.map(
            functools.partial(label, name), ids[name], is_leaf=lambda x: isinstance(x, tuple)
        )
        for name in params
    }


def layer_scales(params, decay: float) -> dict:
    """Per-leaf learning-rate factor ``decay ** (depth + 1 - layer)`` (:func:`layer_ids`): 1 for
    the top of each tower, ``decay ** (depth + 1)`` for its embeddings."""
    return jax.tree.map(
        lambda ld: float(decay) ** (ld[1] + 1 - ld[0]),
        layer_ids(params),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def decay_mask(params):
    """Weight decay on matrices and higher-rank kernels / embeddings only, never on biases,
    norm scales or the scalar temperature and bias (docs/design.md §6)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _clipping(params, max_norm: float) -> list[optax.GradientTransformation]:
    """Global-norm clipping; the box head (``box_tower``) is clipped on its own norm. Its loss
    reaches only itself when detached (models/boxes.py), and its gradients must not shrink the
    clipped step of the towers either: a recipe trains the same with or without the head."""
    if "box_tower" not in params:
        return [optax.clip_by_global_norm(max_norm)]
    box = {
        name: jax.tree.map(lambda _, is_box=name == "box_tower": is_box, tree)
        for name, tree in params.items()
    }
    rest = jax.tree.map(lambda b: not b, box)
    return [
        optax.masked(optax.clip_by_global_norm(max_norm), rest),
        optax.masked(optax.clip_by_global_norm(max_norm), box),
    ]


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
    for key in dict(optim_config.get("unlock", {})):
        if key not in ("image", "text"):
            raise ValueError(
                f"config.optim.unlock.{key}: only the image and text towers have blocks"
            )
    layer_decay = float(optim_config.get("layer_decay", 1.0))
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"config.optim.layer_decay={layer_decay}: must lie in (0, 1]")

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
        chain += _clipping(params, optim_config.grad_clip)
    chain.append(optax.multi_transform(groups, labels))
    if layer_decay < 1.0:
        # AdamW's update (weight decay included) is linear in its learning rate, so scaling the
        # update per leaf is the per-layer learning rate.
        scales = layer_scales(params, layer_decay)
        chain.append(
            optax.stateless(lambda updates, _: jax.tree.map(jnp.multiply, updates, scales))
        )
    return optax.chain(*chain), lr_fn
