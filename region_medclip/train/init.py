"""What a run builds before any data: the model, optimizer and sharded state layout; and its
first state, fresh, from another run's params, or restored from its own latest checkpoint."""

import logging
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from region_medclip import checkpointing
from region_medclip.models import clip
from region_medclip.train import optim
from region_medclip.train import state as state_lib
from region_medclip.train.step import make_train_step

_log = logging.getLogger("region_medclip.train")


def _name(key) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in key)


def _take(path: str, flat: dict, source: dict, wanted: Callable) -> dict:
    """The wanted leaves of ``flat`` (the model's) from ``source`` (the checkpoint's), cast to
    the model's dtypes; a missing or differently shaped leaf is an error naming its path."""
    taken = {}
    for key, value in flat.items():
        if not wanted(key):
            continue
        if key not in source:
            raise ValueError(f"config.model.init_from={path}: no param {_name(key)}")
        if tuple(source[key].shape) != tuple(value.shape):
            raise ValueError(
                f"config.model.init_from={path}: {_name(key)} has shape "
                f"{tuple(source[key].shape)}, the model wants {tuple(value.shape)}"
            )
        taken[key] = jnp.asarray(source[key], value.dtype)
    return taken


def _nest(taken: dict) -> dict:
    """``{key path: leaf}`` → the nested dict of those leaves."""
    out: dict = {}
    for key, value in taken.items():
        node = out
        for part in [str(getattr(k, "key", k)) for k in key][:-1]:
            node = node.setdefault(part, {})
        node[str(getattr(key[-1], "key", key[-1]))] = value
    return out


def load_init_params(path: str, params):
    """Params from another run's latest checkpoint (or a ``convert`` output) for ``params`` (a
    pytree of arrays or shapes), as host arrays of the same dtypes.

    A whole-model checkpoint gives the whole tree. A partial one (``convert --format=hf_bert``:
    its config's ``partial.provides`` names the subtrees it holds, ``partial.keeps_init`` those
    of them it leaves to the model's init) gives a sub-dict with just what it holds; the caller
    overlays it on the random init (:meth:`Setup.init_state`).

    Raises:
      ValueError: naming the first param path missing from, or shaped differently in, ``path``.
    """
    loaded, stored, step = checkpointing.restore_params(path)
    partial = (stored or {}).get("partial")
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    source = dict(jax.tree_util.tree_leaves_with_path(loaded))

    def wanted(key) -> bool:
        if not partial:
            return True
        n = _name(key)
        inside = lambda prefixes: any(n == p or n.startswith(p + "/") for p in prefixes)  # noqa: E731
        return inside(partial["provides"]) and not inside(partial.get("keeps_init", []))

    # A box head is newer than converted CLIPs and most checkpoints: one without it leaves the
    # model's own to its init (it reads the towers without changing them, models/boxes.py).
    def is_box(key) -> bool:
        return _name(key).startswith("box_tower/")

    keep_box_init = any(map(is_box, flat)) and not any(map(is_box, source))
    taken = _take(
        path, flat, source, lambda key: wanted(key) and not (keep_box_init and is_box(key))
    )
    if not partial:
        _log.info("initialised params from %s (step %d)", path, step)
        if keep_box_init:
            _log.info("%s has no box head: the model's keeps its random init", path)
            return _nest(taken)
        return jax.tree_util.tree_map_with_path(lambda k, v: taken[k], params)
    unused = sorted(_name(k) for k in source if k not in taken)
    if unused:
        raise ValueError(
            f"config.model.init_from={path}: params the model has no place for: {unused[:5]}"
        )
    _log.info(
        "initialised %s from %s (%s); everything else keeps its random init",
        ", ".join(partial["provides"]),
        path,
        partial.get("format", "partial checkpoint"),
    )
    return _nest(taken)


def overlay_params(params, loaded):
    """``params`` with the leaves of ``loaded`` (a nested dict over a subset of its keys)."""
    if not isinstance(loaded, dict):
        return loaded
    return {k: overlay_params(v, loaded[k]) if k in loaded else v for k, v in params.items()}


class Setup(NamedTuple):
    """What a run builds from its config before any data: the model, optimizer and state layout."""

    model: clip.RegionCLIP
    tx: optax.GradientTransformation
    lr_fn: Callable
    example: dict[str, jax.ShapeDtypeStruct]
    abstract: state_lib.TrainState  # shapes
    shardings: state_lib.TrainState  # NamedShardings on the mesh

    def init_state(self, seed: int, params=None) -> state_lib.TrainState:
        """A fresh sharded state; ``params`` (host arrays: the whole tree, or a nested dict over
        some of it) replace the random init where given.

        Created inside jit even with given params: every leaf gets buffers of its own, which
        donation needs (an eager optimizer init may hand one array to two leaves).
        """

        def create(rng, params):
            # A partial ``params`` (one tower) overlays the random init; a whole one replaces it.
            init_fn = None if params is None else (lambda init: overlay_params(init, params))
            return state_lib.create(
                self.model,
                self.tx,
                rng,
                self.example,
                init_params_fn=init_fn,
                ema=self.abstract.ema is not None,
            )

        return jax.jit(create, out_shardings=self.shardings)(jax.random.PRNGKey(seed), params)

    def train_step(self, config, mesh: Mesh, teacher=None, max_traces=None) -> Callable:
        """:func:`~region_medclip.train.step.make_train_step` for this setup."""
        return make_train_step(
            model=self.model,
            tx=self.tx,
            lr_fn=self.lr_fn,
            config=config,
            mesh=mesh,
            state_sharding=self.shardings,
            teacher=teacher,
            max_traces=max_traces,
        )


def setup(config: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
    """Builds the model, the optimizer (scheduled over ``train.total_steps``) and the sharded
    state layout of ``config`` on ``mesh``; allocates nothing."""
    model = clip.from_config(config.model)
    example = clip.example_inputs(config.data)
    boxed = jax.eval_shape(lambda: state_lib.init_params(model, jax.random.PRNGKey(0), example))
    tx, lr_fn = optim.make_optimizer(
        config.optim, nn.meta.unbox(boxed), int(config.train.total_steps)
    )
    ema = float(config.train.get("ema_decay", 0.0)) > 0
    abstract, shardings = state_lib.shardings(model, tx, example, mesh, ema=ema)
    return Setup(model, tx, lr_fn, example, abstract, shardings)


def restore_or_init(run: Setup, config, ckpt: checkpointing.Checkpointer, batches):
    """``(state, start step)``: the latest checkpoint of ``ckpt`` (which also restores the data
    iterator ``batches``), else a fresh state, from ``config.model.init_from`` if set."""
    start = ckpt.latest_step()
    if start is not None:
        target = checkpointing.abstract_with_shardings(run.abstract, run.shardings)
        state = ckpt.restore(start, target, batches)
        _log.info("resumed from step %d", start)
        return state, start
    loaded = None
    if config.model.init_from:
        loaded = load_init_params(config.model.init_from, run.abstract.params)
    return run.init_state(config.seed, loaded), 0
