"""The training state and its sharded creation."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from region_medclip import sharding as sharding_lib

MODEL_INPUTS = ("images", "texts", "boxes", "roi_mask")


class TrainState(flax.struct.PyTreeNode):
    """Everything a resumed run needs besides the data iterator (the teacher is not in it).

    Attributes:
      step: [] int32, updates attempted (skipped non-finite steps count too, so the schedule and
        the data stay aligned).
      params: model params (unboxed).
      opt_state: optimizer state.
      rng: [] PRNG key data (uint32 [2]) for dropout/augmentation inside the step.
      skipped: [] int32, steps skipped because the loss or gradient was not finite.
      bad_streak: [] int32, consecutive skipped steps (reset by a good one).
      ema: the exponential moving average of ``params`` (``config.train.ema_decay``), or None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    bad_streak: jax.Array
    ema: Any = None


def ema_update(ema, params, step: jax.Array, decay: float):
    """``ema`` moved toward ``params`` after update ``step`` (0-based): the decay is
    ``min(decay, (1 + step) / (10 + step))``, so the average is not anchored to the random
    init for the first thousands of steps (TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``)."""
    t = step.astype(jnp.float32)
    d = jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


def init_params(model: nn.Module, rng: jax.Array, example: dict[str, jax.Array]):
    """Boxed (logically partitioned) params of ``model`` for the example inputs (arrays or
    ``ShapeDtypeStruct``s: only shapes are used)."""
    x = {k: jnp.zeros(example[k].shape, example[k].dtype) for k in MODEL_INPUTS}
    return model.init(rng, *(x[k] for k in MODEL_INPUTS))["params"]


def create(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    example: dict[str, jax.Array],
    init_params_fn: Callable[[Any], Any] | None = None,
    ema: bool = False,
) -> TrainState:
    """A fresh state (unsharded; wrap in ``jax.jit`` with ``out_shardings`` to shard it).

    Args:
      model: the ``RegionCLIP`` module.
      tx: the optimizer.
      rng: [2] uint32 PRNG key.
      example: model inputs with the batch shape (values are not used beyond shapes).
      init_params_fn: optional params → params replacing the random init (pretrained weights).
      ema: keep a moving average of the params, starting from them.
    """
    init_rng, state_rng = jax.random.split(rng)
    params = nn.meta.unbox(init_params(model, init_rng, example))
    if init_params_fn is not None:
        params = init_params_fn(params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(params),
        rng=state_rng,
        skipped=zero,
        bad_streak=zero,
        ema=jax.tree.map(jnp.copy, params) if ema else None,
    )


def shardings(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example: dict[str, jax.Array],
    mesh: Mesh,
    ema: bool = False,
) -> tuple[TrainState, TrainState]:
    """The abstract state (shapes) and a matching pytree of ``NamedSharding``.

    Params (and their moving average, with ``ema``) follow the logical rules of
    :mod:`region_medclip.sharding`; optimizer moments mirror their params (matched by key path
    and shape); everything else is replicated.
    """
    rng = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(lambda: init_params(model, rng, example))
    params_sharding = sharding_lib.param_shardings(boxed, mesh)
    abstract = jax.eval_shape(lambda: create(model, tx, rng, example, ema=ema))
    replicated = sharding_lib.replicated(mesh)

    opt_state_sharding = _like_params(
        abstract.opt_state, abstract.params, params_sharding, replicated
    )
    state_sharding = TrainState(
        step=replicated,
        params=params_sharding,
        opt_state=opt_state_sharding,
        rng=replicated,
        skipped=replicated,
        bad_streak=replicated,
        ema=params_sharding if ema else None,
    )
    return abstract, state_sharding


def _like_params(tree, params, params_sharding, default):
    """Shards each leaf of ``tree`` whose key path ends in a param's path (with its shape) like
    that param; other leaves get ``default``. Optimizer states nest params-shaped trees (moments,
    masked per tower) under their own keys, so the trailing dict keys identify the param."""
    by_path = {
        tuple(k.key for k in path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_leaves_with_path(params),
            jax.tree.leaves(params_sharding),
            strict=True,
        )
    }

    def pick(path, leaf):
        keys = []
        for entry in reversed(path):
            if not isinstance(entry, jax.tree_util.DictKey):
                break
            keys.insert(0, entry.key)
        shape, sharding = by_path.get(tuple(keys), (None, default))
        return sharding if shape == getattr(leaf, "shape", None) else default

    return jax.tree_util.tree_map_with_path(pick, tree)
