"""The smallest useful training config, for tests: 32 px films, μ-sized towers, 8 per batch.

python -m region_medclip.main --config=tests/micro_config.py:data_dir=/tmp/d --workdir=...
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from region_medclip import checkpointing, metrics_writer, train
from region_medclip import config as config_lib
from region_medclip import sharding as sharding_lib
from region_medclip.data import schema


def get_config(arg: str | None = None):
    """``arg``: ``data_dir=`` (where synth_cxr is built), ``steps=``, ``kind=`` global loss,
    ``evals`` (add every evaluator)."""
    args = config_lib.parse_arg(arg, data_dir="", steps=4, kind="softmax", evals=False)
    c = config_lib.base_config()
    c.model.image = dict(variant="mu/8", pool="cls")
    c.model.text = dict(kind="clip", variant="mu", vocab_size=1024, context_len=32)
    c.model.region = dict(roi_size=2, sampling_ratio=1, pool="mean", proj="shared")
    c.model.embed_dim = 32
    # The box head as the tiny default trains it (detection's proposals).
    c.model.box_head = dict(enabled=True, depth=1, detach=True)
    c.loss.box_weight = 1.0
    c.loss.global_kind = args.kind
    if args.kind == "sigmoid":
        c.model.logit_scale_init = config_lib.SIGMOID_LOGIT_SCALE_INIT
    c.loss.lambda_ = 0.0

    c.data.image_size = 32
    c.data.text_len = 32
    c.data.caption_len = 16
    c.data.tokenizer = "synth_bpe"
    c.data.data_dir = args.data_dir
    c.data.synth = dict(num=160, seed=0)
    c.data.batch_size = 8
    c.data.max_rois = 3
    c.data.num_negatives = 2

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.total_steps = args.steps
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.train.keep = 10
    if args.evals:  # every evaluator on 12 test films
        kinds = ("zero_shot", "retrieval", "regions", "grounding", "modality_gap", "multiclass")
        for kind in (*kinds, "phrase_grounding", "detection"):
            c.evals[kind] = dict(kind=kind, every=2, max_examples=12, batch_size=8, bootstrap=20)
        # The probes train on 24 films of the train split (a second embedding pass).
        probes = dict(every=2, max_examples=12, batch_size=8, train_examples=24)
        c.evals.linear_probe = dict(kind="linear_probe", fractions=(0.5, 1.0), seeds=(0, 1))
        c.evals.fewshot = dict(kind="fewshot", shots=(1, 2))
        for name in ("linear_probe", "fewshot"):
            c.evals[name].update(probes)
    return c


def random_batch(c, seed=0) -> dict[str, np.ndarray]:
    """A random global batch with the shapes of config ``c`` (ROIs partly masked)."""
    return schema.random_batch(c.data, c.data.batch_size, seed)


def step_setup(c, devices=None):
    """(mesh, train.Setup, fresh state) for config ``c``."""
    mesh = sharding_lib.make_mesh(c.mesh, devices)
    run = train.setup(c, mesh)
    return mesh, run, run.init_state(c.seed)


def run_steps(c, batches, devices=None, teacher=None):
    """Runs ``train_step`` on each (process-local) batch; returns (state, host metrics)."""
    mesh, run, state = step_setup(c, devices)
    step = run.train_step(c, mesh, teacher)
    teacher_params = teacher.params if teacher else {}
    history = []
    batch_sharding = sharding_lib.batch_sharding(mesh)
    for batch in batches:
        batch = {
            k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()
        }
        state, metrics = step(state, batch, teacher_params)
        history.append({k: float(v.addressable_data(0)) for k, v in metrics.items()})
    return state, history


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "tests", "micro_config.py")


def config(data_dir, **overrides):
    c = get_config(f"data_dir={data_dir}")
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a new process with ``devices`` CPU devices and this process's LLVM
    optimisation level (tests/conftest.py sets 0): a step compiled there then computes what the
    same step compiled here does, bit for bit, as exact-resume tests need."""
    level = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if flag.startswith("--xla_backend_optimization_level")
    ]
    return " ".join([*level, f"--xla_force_host_platform_device_count={devices}"])


def run_main(workdir, data_dir, *flags, devices=8, timeout=300, **popen):
    """``python -m region_medclip.main`` on the micro config in a new process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags(devices)
    cmd = [
        sys.executable,
        "-m",
        "region_medclip.main",
        f"--config={CONFIG_FILE}:data_dir={data_dir}",
        f"--workdir={workdir}",
        *flags,
    ]
    if popen:  # runs beside the tests and may be killed: no shared cache
        import conftest  # not at the top: importing it sets this process's device count

        return subprocess.Popen(cmd, env=conftest.without_compilation_cache(env), cwd=ROOT, **popen)
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses_by_step(workdir):
    return {r["step"]: r for r in metrics_writer.read_metrics(workdir)}


def final_params(workdir):
    params, _, step = checkpointing.restore_params(workdir)
    return params, step


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out")


def metrics_steps(workdir):
    try:
        return set(losses_by_step(workdir))
    except (FileNotFoundError, json.JSONDecodeError):
        return set()


def assert_same_run(hist_a, hist_b):
    # Losses of step 2 depend on step 1's update; grad norms on every gradient. Params are not
    # compared leaf by leaf: Adam divides near-zero gradients (rare tokens' embeddings) by their
    # own magnitude, so float noise there becomes update noise of up to ~lr.
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in hist_a], [h[key] for h in hist_b], rtol=1e-5)
