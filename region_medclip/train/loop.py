"""The training loop: data, restore-or-init, steps, metrics, checkpoints, evaluations, SIGTERM.

``train_and_evaluate(config, workdir)`` trains in ``workdir``, resuming from its latest
checkpoint if there is one; the evaluators of ``config.evals`` run when they are due.
"""

import dataclasses
import json
import logging
import signal
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from region_medclip import checkpointing, metrics_writer
from region_medclip import config as config_lib
from region_medclip import sharding as sharding_lib
from region_medclip.data import mixture, pipeline
from region_medclip.data import tokenizers as tokenizers_lib
from region_medclip.evaluators import run as evals_lib
from region_medclip.train.distillation import Teacher, concept_vocabulary
from region_medclip.train.init import restore_or_init, setup

_log = logging.getLogger("region_medclip.train")


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


class _StepLog:
    """Reads a step's metrics to the host one step late (dispatch stays ahead), checks them for
    non-finite streaks and writes them every ``train.log_every`` steps."""

    def __init__(self, config, workdir: str, start: int, batches):
        self.total_steps = int(config.train.total_steps)
        self.log_every = max(int(config.train.log_every), 1)
        self.max_bad = int(config.train.max_bad_steps)
        self.writer = metrics_writer.MetricsWriter(
            workdir, enabled=jax.process_index() == 0, start_step=start
        )
        self.progress = metrics_writer.Progress(self.total_steps, start, config.data.batch_size)
        self.batches = batches

    def drain(self, step: int, metrics: dict) -> dict[str, float]:
        metrics = {k: _host(v) for k, v in metrics.items()}
        if metrics["nonfinite"]:
            _log.warning(
                "step %d: non-finite loss or gradient, update skipped (%d skipped in total)",
                step,
                int(metrics["skipped_steps"]),
            )
        if metrics["bad_streak"] >= self.max_bad:
            raise FloatingPointError(
                f"{int(metrics['bad_streak'])} non-finite steps in a row up to step {step} "
                f"(config.train.max_bad_steps={self.max_bad}); lower config.optim.lr or check "
                "the data"
            )
        if step % self.log_every == 0 or step == self.total_steps:
            totals = {f"data/{k}": v for k, v in self.batches.totals.items()}
            metrics.update(self.progress.rates(step), **totals)
            self.writer.write(step, metrics)
            _log.info(self.progress.line(step, metrics))
        return metrics


def _write_config(config, workdir: str) -> dict:
    """Validates ``config``, writes it to ``workdir/config.json``; returns it as JSON."""
    config_lib.validate(config)
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    config_json = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        (workdir_path / "config.json").write_text(json.dumps(config_json, indent=2))
    return config_json


def _check_batch(config, mesh) -> int:
    """The global batch size, which every device × ``grad_accum`` must divide."""
    num_devices = mesh.devices.size
    batch_size, accum = int(config.data.batch_size), int(config.train.grad_accum)
    if batch_size % (num_devices * accum):
        raise ValueError(
            f"config.data.batch_size={batch_size} must be divisible by the {num_devices} devices "
            f"× config.train.grad_accum={accum}"
        )
    return batch_size


def _check_sources(config) -> None:
    """A mixture in ``config.data.train`` reads (:func:`mixture.parse` names a bad entry), and
    images or reports alone go with the one loss that learns from them."""
    if mixture.unpaired(config.data.train) and config.loss.global_kind != "medclip":
        raise ValueError(
            f"config.data.train={config.data.train!r}: images or reports alone (@images, "
            f"@texts) need config.loss.global_kind=medclip, not {config.loss.global_kind!r}"
        )
    micro = config.train.grad_accum > 1 and config.train.accum_negatives == "micro"
    if mixture.unpaired(config.data.train) and micro:
        # A micro-batch's own loss needs a row of each side, which a mixture does not promise.
        raise ValueError(
            "config.train.accum_negatives=micro with images or reports alone in "
            "config.data.train: use accum_negatives=global"
        )


def _teacher(config, mesh) -> Teacher | None:
    if not (config.teacher.init_from and config.loss.lambda_ > 0):
        return None
    concepts = concept_vocabulary(mixture.parse(config.data.train)[0].name, config.data.data_dir)
    return Teacher(config.teacher.init_from, config.data, concepts, mesh, config.teacher.regions)


def _train_batches(config, batch_size: int) -> pipeline.BatchIterator:
    """This process's shard of the training stream (a checkpointable iterator)."""
    dataset = pipeline.make_dataset(
        config.data,
        split="train",
        train=True,
        seed=config.seed,
        batch_size=batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tokenizer=tokenizers_lib.from_config(config.data),
    )
    return pipeline.BatchIterator(dataset)


def _due(evals: dict, step: int, total_steps: int) -> list[str]:
    return [
        name
        for name, cfg in evals.items()
        if cfg["every"] and (step % cfg["every"] == 0 or step == total_steps)
    ]


def _gather(params):
    """Params gathered to every host (host arrays)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def _run_evals(config, model, state, names, workdir, step, writer) -> dict:
    """Evaluates the current params, and their moving average as ``ema/<evaluator>`` when the
    state keeps one (gathered to every host; process 0 evaluates and writes)."""
    sets = {"": _gather(state.params)}
    if state.ema is not None:
        sets["ema/"] = _gather(state.ema)
    if jax.process_index() != 0:
        return {}
    results = {}
    for prefix, params in sets.items():
        plot_dir = str(epath.Path(workdir) / "plots" / str(step) / prefix)
        out = evals_lib.evaluate(config, model, params, names, plot_dir=plot_dir)
        results.update({prefix + name: metrics for name, metrics in out.items()})
    _log.info("\n%s", evals_lib.write(workdir, step, results, writer.tensorboard))
    return results


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    batch_hook: Callable[[int, dict], dict] | None = None,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Args:
      config: a validated config (``region_medclip.config.validate`` is called again here).
      workdir: checkpoints, ``config.json``, ``metrics.jsonl`` and ``tb/`` go here.
      batch_hook: ``(step, numpy batch) → batch`` applied on the host before a batch is sharded
        (tests use it to inject bad batches).

    Returns:
      the last logged metrics (host floats) plus ``step``, ``preempted`` and ``eval`` (the
      last evaluation's results).
    """
    config_json = _write_config(config, workdir)
    evals = {name: evals_lib.eval_config(config, name) for name in config.evals}
    mesh = sharding_lib.make_mesh(config.mesh)
    batch_size = _check_batch(config, mesh)
    _check_sources(config)
    run = setup(config, mesh)
    teacher = _teacher(config, mesh)
    batches = _train_batches(config, batch_size)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep)
    state, start = restore_or_init(run, config, ckpt, batches)
    loop = _Loop(
        config=config,
        workdir=workdir,
        model=run.model,
        batches=batches,
        ckpt=ckpt,
        config_json=config_json,
        evals=evals,
        train_step=run.train_step(config, mesh, teacher),
        teacher_params=teacher.params if teacher else {},
        log=_StepLog(config, workdir, start, batches),
        batch_sharding=sharding_lib.batch_sharding(mesh),
    )
    try:
        return loop.run(state, start, batch_hook)
    finally:
        ckpt.close()  # waits for saves in flight, also when a step raised
        loop.log.writer.close()


@dataclasses.dataclass
class _Loop:
    """What every step of a run shares."""

    config: ml_collections.ConfigDict
    workdir: str
    model: Any
    batches: pipeline.BatchIterator
    ckpt: checkpointing.Checkpointer
    config_json: dict
    evals: dict[str, dict]
    train_step: Callable
    teacher_params: Any
    log: _StepLog
    batch_sharding: Any

    def _device_batch(self, step: int, batch_hook) -> dict[str, jax.Array]:
        batch = next(self.batches)
        if batch_hook is not None:
            batch = batch_hook(step, batch)
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()
        }

    def run(self, state, start: int, batch_hook) -> dict[str, Any]:
        """Steps ``start + 1 … train.total_steps`` (or until SIGTERM); returns the last logged
        metrics with ``step``, ``preempted`` and ``eval``."""
        total_steps, save_every = self.log.total_steps, self.config.train.ckpt_every
        last, last_eval, pending, preempted = {}, {}, None, False
        with _Preemption() as preemption:
            for step in range(start + 1, total_steps + 1):
                batch = self._device_batch(step, batch_hook)
                state, metrics = self.train_step(state, batch, self.teacher_params)
                if pending is not None:
                    last = self.log.drain(*pending)
                pending = (step, metrics)
                if step % save_every == 0 or step == total_steps:
                    self.ckpt.save(step, state, self.batches, self.config_json)
                due = _due(self.evals, step, total_steps)
                if due:
                    last_eval = _run_evals(
                        self.config,
                        self.model,
                        state,
                        due,
                        self.workdir,
                        step,
                        self.log.writer,
                    )
                if preemption.check(step):
                    last, pending = self.log.drain(*pending), None
                    if step not in self.ckpt.all_steps():
                        self.ckpt.save(step, state, self.batches, self.config_json, force=True)
                    preempted = True
                    break
            if pending is not None:
                last = self.log.drain(*pending)
        return {**last, "step": int(_host(state.step)), "preempted": preempted, "eval": last_eval}
