"""Training: mesh → sharded state → jitted train step → loop with checkpoints and metrics.

The model runs under ``jax.jit`` with explicit shardings (GSPMD partitions it from the param and
batch layouts); the losses run inside ``jax.shard_map`` over the batch axes, where each device
holds its local shard and the losses' own collectives assemble the global-batch loss.
"""

import functools
import json
import logging
import math
import signal
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from region_medclip import checkpointing, config_lib, losses, metrics_writer, optim
from region_medclip import sharding as sharding_lib
from region_medclip import state as state_lib
from region_medclip.data import pipeline
from region_medclip.data import tokenizers as tokenizers_lib
from region_medclip.models import clip
from region_medclip.models.teacher import Teacher, concept_embeddings, concept_vocabulary

__all__ = ["Teacher", "concept_vocabulary"]  # re-exported: the trainer's public names

_log = logging.getLogger("region_medclip.train")

# Batch keys the loss reads besides the embeddings.
_LOSS_BATCH_KEYS = ("roi_mask", "cap_ids", "neg_mask", "labels")


# ---------------------------------------------------------------------------------------------
# The step.


def _apply(model, params, method, *args):
    return model.apply({"params": params}, *args, method=method)


def forward(model, params, batch, loss_config) -> dict[str, jax.Array]:
    """Model outputs ``total_loss`` needs: ``zimg, ztxt [n, D]``, ``zroi [n, R, D]``, ``zcap
    [n, R, D]`` (β or γ > 0), ``zneg [n, R, K, D]`` (γ > 0), ``logit_scale``, ``logit_bias``, from
    ``images [n, S, S, 3]``, ``texts [n, L]``, ``boxes [n, R, 4]``, ``roi_mask [n, R]``,
    ``captions [n, R, Lc]`` and ``negatives [n, R, K, Lc]``. Captions and negatives go through
    the text tower in one call."""
    out = model.apply(
        {"params": params}, batch["images"], batch["texts"], batch["boxes"], batch["roi_mask"]
    )
    out.pop("patch_tokens")
    if loss_config.beta > 0 or loss_config.gamma > 0:
        if loss_config.gamma > 0:
            tokens = jnp.concatenate([batch["captions"][:, :, None], batch["negatives"]], axis=2)
            z = _apply(model, params, clip.RegionCLIP.encode_text, tokens)  # [n, R, 1 + K, D]
            out["zcap"], out["zneg"] = z[:, :, 0], z[:, :, 1:]
        else:
            out["zcap"] = _apply(model, params, clip.RegionCLIP.encode_text, batch["captions"])
    return out


def sharded_total_loss(mesh: Mesh, loss_config, **kwargs):
    """``losses.total_loss`` over the global batch, run per device inside ``jax.shard_map``."""
    axes = sharding_lib.BATCH_AXES

    def spec(x):
        return P() if jnp.ndim(x) == 0 else P(axes)

    def local(out, batch, student, teacher):
        return losses.total_loss(
            out=out,
            batch=batch,
            loss_config=loss_config,
            student_logits=student,
            teacher_logits=teacher,
            axis_name=axes,
        )

    args = (kwargs["out"], kwargs["batch"], kwargs["student_logits"], kwargs["teacher_logits"])
    fn = jax.shard_map(local, mesh=mesh, in_specs=jax.tree.map(spec, args), out_specs=(P(), P()))
    return fn(*args)


def make_train_step(
    *,
    model: clip.RegionCLIP,
    tx: optax.GradientTransformation,
    lr_fn: Callable,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    state_sharding,
    teacher: "Teacher | None" = None,
) -> Callable:
    """The jitted ``train_step(state, batch, teacher_params) → (state, metrics)``.

    The state is donated. A step whose loss or gradient is not finite leaves params and optimizer
    state unchanged and counts itself in ``state.skipped`` / ``state.bad_streak``.
    """
    loss_config = config.loss
    accum = int(config.train.grad_accum)
    distill = teacher is not None and loss_config.lambda_ > 0
    clamp = loss_config.global_kind != "sigmoid"  # softmax-style scale clamped to [0, log 100]
    batch_sharding = sharding_lib.batch_sharding(mesh)

    def loss_fn(params, batch, teacher_params):
        out = forward(model, params, batch, loss_config)
        loss_batch = {k: batch[k] for k in _LOSS_BATCH_KEYS if k in batch}
        # Uncertain (−1) findings count as absent in the label-similarity loss (U-zeros).
        loss_batch["labels"] = jnp.maximum(batch["labels"], 0.0)
        student_logits = teacher_logits = None
        if distill:
            temperature = config.teacher.temperature
            concepts = concept_embeddings(model, params, teacher.concept_tokens)
            student_logits = jnp.einsum("nrd,cd->nrc", out["zroi"], concepts) / temperature
            teacher_logits = teacher.logits(
                teacher_params, batch["images"], batch["boxes"], batch["roi_mask"], temperature
            )
        loss, metrics = sharded_total_loss(
            mesh,
            loss_config,
            out=out,
            batch=loss_batch,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
        )
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_batches(batch):
        # Strided split: micro-batch j takes rows j, j + k, ...; each keeps the layout over devices.
        def split(x):
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            return x

        return jax.tree.map(split, batch)

    def gradients(params, batch, teacher_params):
        if accum == 1:
            (loss, metrics), grads = grad_fn(params, batch, teacher_params)
            return loss, metrics, grads

        def body(carry, micro):
            micro = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), micro
            )
            (loss, metrics), grads = grad_fn(params, micro, teacher_params)
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        zeros = jax.eval_shape(
            grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches(batch)), teacher_params
        )
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0][0], zeros[0][1], zeros[1])
        )
        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, micro_batches(batch))
        return jax.tree.map(lambda x: x / accum, (loss, metrics, grads))

    def train_step(state: state_lib.TrainState, batch, teacher_params):
        loss, metrics, grads = gradients(state.params, batch, teacher_params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if clamp:
            params = {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, math.log(100))}
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        bad = (~ok).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rng=jax.random.fold_in(state.rng, state.step),
            skipped=state.skipped + bad,
            bad_streak=(state.bad_streak + bad) * bad,
        )
        # A fingerprint of the batch's report tokens: equal data order ⇔ equal sequences of these.
        texts = batch["texts"].astype(jnp.uint32)
        weights = jnp.arange(1, texts.size + 1, dtype=jnp.uint32).reshape(texts.shape)
        metrics = {
            **metrics,
            "grad_norm": grad_norm,
            "lr": lr_fn(state.step),
            "skipped_steps": new_state.skipped,
            "bad_streak": new_state.bad_streak,
            "nonfinite": bad,
            "data/fingerprint": jnp.sum(texts * weights),
        }
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding, sharding_lib.replicated(mesh)),
        out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


# ---------------------------------------------------------------------------------------------
# Teacher and initialisation from other runs.


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

    def name(key) -> str:
        return "/".join(str(getattr(k, "key", k)) for k in key)

    def wanted(key) -> bool:
        if not partial:
            return True
        n = name(key)
        inside = lambda prefixes: any(n == p or n.startswith(p + "/") for p in prefixes)  # noqa: E731
        return inside(partial["provides"]) and not inside(partial.get("keeps_init", []))

    taken = {}
    for key, value in flat.items():
        if not wanted(key):
            continue
        if key not in source:
            raise ValueError(f"config.model.init_from={path}: no param {name(key)}")
        if tuple(source[key].shape) != tuple(value.shape):
            raise ValueError(
                f"config.model.init_from={path}: {name(key)} has shape "
                f"{tuple(source[key].shape)}, the model wants {tuple(value.shape)}"
            )
        taken[key] = jnp.asarray(source[key], value.dtype)
    if not partial:
        _log.info("initialised params from %s (step %d)", path, step)
        return jax.tree_util.tree_map_with_path(lambda k, v: taken[k], params)
    unused = sorted(name(k) for k in source if k not in taken)
    if unused:
        raise ValueError(
            f"config.model.init_from={path}: params the model has no place for: {unused[:5]}"
        )
    out: dict = {}
    for key, value in taken.items():
        node = out
        for part in [str(getattr(k, "key", k)) for k in key][:-1]:
            node = node.setdefault(part, {})
        node[str(getattr(key[-1], "key", key[-1]))] = value
    _log.info(
        "initialised %s from %s (%s); everything else keeps its random init",
        ", ".join(partial["provides"]),
        path,
        partial.get("format", "partial checkpoint"),
    )
    return out


def overlay_params(params, loaded):
    """``params`` with the leaves of ``loaded`` (a nested dict over a subset of its keys)."""
    if not isinstance(loaded, dict):
        return loaded
    return {k: overlay_params(v, loaded[k]) if k in loaded else v for k, v in params.items()}


# ---------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
    """SIGTERM sets a flag the loop checks after each step (the step in flight finishes); with
    several processes, JAX's preemption sync point makes them all stop at the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() > 1:
            # JAX's preemption service owns SIGTERM in a multi-process job (a Python handler
            # would replace its notifier and the processes could stop at different steps).
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        _log.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def check(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # All hosts agree on the step to stop at (JAX's preemption service sees SIGTERM).
            return bool(multihost_utils.reached_preemption_sync_point(step)) or self.requested
        return self.requested


def _host(x: jax.Array) -> float:
    """A replicated scalar as a host float (also when other processes hold copies too)."""
    return float(np.asarray(x.addressable_data(0)))


def _example(config) -> dict[str, jax.ShapeDtypeStruct]:
    d = config.data
    size, rois = d.image_size, d.max_rois
    return dict(
        images=jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        texts=jax.ShapeDtypeStruct((1, d.text_len), jnp.int32),
        boxes=jax.ShapeDtypeStruct((1, rois, 4), jnp.float32),
        roi_mask=jax.ShapeDtypeStruct((1, rois), jnp.bool_),
    )


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
            return state_lib.create(self.model, self.tx, rng, self.example, init_params_fn=init_fn)

        return jax.jit(create, out_shardings=self.shardings)(jax.random.PRNGKey(seed), params)

    def train_step(self, config, mesh: Mesh, teacher: "Teacher | None" = None) -> Callable:
        """:func:`make_train_step` for this setup."""
        return make_train_step(
            model=self.model,
            tx=self.tx,
            lr_fn=self.lr_fn,
            config=config,
            mesh=mesh,
            state_sharding=self.shardings,
            teacher=teacher,
        )


def setup(config: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
    """Builds the model, the optimizer (scheduled over ``train.total_steps``) and the sharded
    state layout of ``config`` on ``mesh``; allocates nothing."""
    model = clip.from_config(config.model)
    example = _example(config)
    boxed = jax.eval_shape(lambda: state_lib.init_params(model, jax.random.PRNGKey(0), example))
    tx, lr_fn = optim.make_optimizer(
        config.optim, nn.meta.unbox(boxed), int(config.train.total_steps)
    )
    abstract, shardings = state_lib.shardings(model, tx, example, mesh)
    return Setup(model, tx, lr_fn, example, abstract, shardings)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    batch_hook: Callable[[int, dict], dict] | None = None,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Args:
      config: a validated config (``config_lib.validate`` is called again here).
      workdir: checkpoints, ``config.json``, ``metrics.jsonl`` and ``tb/`` go here.
      batch_hook: ``(step, numpy batch) → batch`` applied on the host before a batch is sharded
        (tests use it to inject bad batches).

    Returns:
      the last logged metrics (host floats) plus ``step`` and ``preempted``.
    """
    config_lib.validate(config)
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    config_json = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        (workdir_path / "config.json").write_text(json.dumps(config_json, indent=2))
    from region_medclip.evaluators import run as evals_lib

    evals = {name: evals_lib.eval_config(config, name) for name in config.evals}

    mesh = sharding_lib.make_mesh(config.mesh)
    num_devices, num_processes = mesh.devices.size, jax.process_count()
    batch_size, accum = int(config.data.batch_size), int(config.train.grad_accum)
    if batch_size % (num_devices * accum):
        raise ValueError(
            f"config.data.batch_size={batch_size} must be divisible by the {num_devices} devices "
            f"× config.train.grad_accum={accum}"
        )
    total_steps = int(config.train.total_steps)

    run = setup(config, mesh)

    teacher = None
    if config.teacher.init_from and config.loss.lambda_ > 0:
        concepts = concept_vocabulary(config.data.train)
        teacher = Teacher(
            config.teacher.init_from, config.data, concepts, mesh, config.teacher.regions
        )
    teacher_params = teacher.params if teacher else {}

    tokenizer = tokenizers_lib.from_config(config.data)
    dataset = pipeline.make_dataset(
        config.data,
        split="train",
        train=True,
        seed=config.seed,
        batch_size=batch_size // num_processes,
        process_index=jax.process_index(),
        process_count=num_processes,
        tokenizer=tokenizer,
    )
    batches = pipeline.BatchIterator(dataset)
    batch_sharding = sharding_lib.batch_sharding(mesh)

    ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep)
    start = ckpt.latest_step()
    if start is not None:
        target = checkpointing.abstract_with_shardings(run.abstract, run.shardings)
        state = ckpt.restore(start, target, batches)
        _log.info("resumed from step %d", start)
    else:
        loaded = None
        if config.model.init_from:
            loaded = load_init_params(config.model.init_from, run.abstract.params)
        state = run.init_state(config.seed, loaded)
        start = 0

    train_step = run.train_step(config, mesh, teacher)
    writer = metrics_writer.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    progress = metrics_writer.Progress(total_steps, start, batch_size)
    log_every = max(int(config.train.log_every), 1)
    max_bad = int(config.train.max_bad_steps)
    last: dict[str, Any] = {}
    pending = None  # (step, metrics on device): read one step late to keep dispatch ahead
    last_eval: dict = {}
    preempted = False

    def drain(pending):
        step, metrics = pending
        metrics = {k: _host(v) for k, v in metrics.items()}
        if metrics["nonfinite"]:
            _log.warning(
                "step %d: non-finite loss or gradient, update skipped (%d skipped in total)",
                step,
                int(metrics["skipped_steps"]),
            )
        if metrics["bad_streak"] >= max_bad:
            raise FloatingPointError(
                f"{int(metrics['bad_streak'])} non-finite steps in a row up to step {step} "
                f"(config.train.max_bad_steps={max_bad}); lower config.optim.lr or check the data"
            )
        if step % log_every == 0 or step == total_steps:
            metrics.update(
                progress.rates(step), **{f"data/{k}": v for k, v in batches.totals.items()}
            )
            writer.write(step, metrics)
            _log.info(progress.line(step, metrics))
        return metrics

    try:
        with _Preemption() as preemption:
            for step in range(start + 1, total_steps + 1):
                batch = next(batches)
                if batch_hook is not None:
                    batch = batch_hook(step, batch)
                batch = {
                    k: jax.make_array_from_process_local_data(batch_sharding, v)
                    for k, v in batch.items()
                }
                state, metrics = train_step(state, batch, teacher_params)
                if pending is not None:
                    last = drain(pending)
                pending = (step, metrics)
                if step % config.train.ckpt_every == 0 or step == total_steps:
                    ckpt.save(step, state, batches, config_json)
                due = [
                    name
                    for name, cfg in evals.items()
                    if cfg["every"] and (step % cfg["every"] == 0 or step == total_steps)
                ]
                if due:
                    last_eval = _run_evals(
                        config, run.model, state.params, due, workdir, step, writer
                    )
                if preemption.check(step):
                    last, pending = drain(pending), None
                    if step not in ckpt.all_steps():
                        ckpt.save(step, state, batches, config_json, force=True)
                    preempted = True
                    break
            if pending is not None:
                last = drain(pending)
    finally:
        ckpt.close()  # waits for saves in flight, also when a step raised
        writer.close()
    return {**last, "step": int(_host(state.step)), "preempted": preempted, "eval": last_eval}


def _run_evals(config, model, params, names, workdir, step, writer) -> dict:
    """Evaluates the current params (gathered to every host; process 0 evaluates and writes)."""
    from region_medclip.evaluators import run as evals_lib

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    else:
        params = jax.device_get(params)
    if jax.process_index() != 0:
        return {}
    plot_dir = str(epath.Path(workdir) / "plots" / str(step))
    results = evals_lib.evaluate(config, model, params, names, plot_dir=plot_dir)
    _log.info("\n%s", evals_lib.write(workdir, step, results, writer.tensorboard))
    return results
