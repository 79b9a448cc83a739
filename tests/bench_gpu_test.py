"""`python -m region_medclip.bench gpu` on the CPU with micro towers: every section measured
or saying why not, in a process where grain, TFDS, array_record and open_clip cannot be
imported (as on the GPU image); its batch search, budget and open_clip step in-process."""

import collections
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_peer, without_compilation_cache
from region_medclip.bench import __main__ as bench
from region_medclip.bench import gpu
from region_medclip.bench import train as train_bench

REPO = Path(__file__).resolve().parents[1]
# A configs folder whose vitb16_roi.py is the micro config: the same code path in seconds.
VITB16_MICRO = """import micro_config


def get_config(arg=None):
    return micro_config.get_config()
"""
# Runs the command with these packages unimportable, as they are on the GPU image.
BLOCKED_RUN = """import importlib.abc, runpy, sys
BLOCKED = ("grain", "tensorflow_datasets", "array_record", "open_clip")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r}", name=name.split(".")[0])
sys.meta_path.insert(0, Blocker())
sys.argv = ["bench"] + sys.argv[1:]
runpy.run_module("region_medclip.bench", run_name="__main__")
"""
SMALL = ["--gpu_batch=8", "--gpu_matmul_size=256", "--gpu_loss_batch=256", "--gpu_loss_dim=16"]
SMALL += ["--train_steps=2", "--repeats=1"]


@pytest.mark.slow
def test_gpu_command_runs_without_the_data_packages(tmp_path):
    (tmp_path / "vitb16_roi.py").write_text(VITB16_MICRO)
    env = without_compilation_cache(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    out = tmp_path / "gpu.json"
    argv = ["gpu", f"--configs_dir={tmp_path}", *SMALL, f"--out={out}"]
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["bf16_peak_tflops"] > 0 and results["machine"]["platform"] == "cpu"
    region, global_only, cudnn = results["steps"]
    assert (region["step"], global_only["step"], cudnn["attention"]) == (
        "region-aware",
        "global-only",
        "cudnn",
    )
    for row in (region, global_only):
        assert row["batch"] == 8 and row["examples_per_s"] > 0 and row["mfu_%"] > 0, row
        # Params and Adam's two moments are arguments of the step; the peak holds them all.
        assert row["opt_state_mib"] == pytest.approx(2 * row["params_mib"], abs=0.2)
        assert row["peak_mib"] >= row["params_mib"] + row["opt_state_mib"], row
    # The region terms cost work on top of the global loss.
    assert region["step_gflop"] > global_only["step_gflop"]
    # The CPU has no cuDNN: the flag reached jax.nn.dot_product_attention, which says so.
    assert "cuDNN" in cudnn["error"]
    assert results["open_clip"] == {"error": "not run: open_clip is not installed"}
    names = [row["loss"] for row in results["losses"]]
    assert names == ["softmax (gather)", "sigmoid ring", "sigmoid gather"]
    for row in results["losses"]:
        assert row["global_batch"] == 256 and row["step_ms"] > 0, row
    assert "| region-aware | xla | 8 |" in done.stdout


def test_parser_takes_the_gpu_flags():
    args = bench.parser().parse_args(["gpu", "--gpu_batch=64", "--gpu_budget_s=10"])
    assert args.subcommand == "gpu" and args.gpu_batch == 64 and args.gpu_budget_s == 10
    assert args.gpu_loss_batch == 32768 and args.gpu_matmul_size == 8192


State = collections.namedtuple("State", "params opt_state")


def _fake_compile_step(fits: int, calls: list):
    """A ``compile_step`` stand-in: a real compiled toy step, or an out-of-memory error above
    ``fits`` examples, as XLA reports it."""

    def compile_step(config, device):
        batch = config.data.batch_size
        calls.append(batch)
        if batch > fits:
            raise RuntimeError(f"RESOURCE_EXHAUSTED: Out of memory allocating {batch} examples")
        state = State(params={"w": jnp.ones((4, 4))}, opt_state=())
        inputs = {"x": jnp.ones((batch, 4))}
        step = jax.jit(lambda s, b, t: (s, {"loss": jnp.sum(b["x"] @ s.params["w"])}))
        return step.lower(state, inputs, {}).compile(), state, inputs

    return compile_step


def test_fitting_step_halves_the_batch_until_it_fits(monkeypatch):
    calls = []
    monkeypatch.setattr(train_bench, "compile_step", _fake_compile_step(fits=3, calls=calls))
    config = types.SimpleNamespace(data=types.SimpleNamespace(batch_size=0))
    row = gpu.fitting_step(config, 16, jax.devices()[0], steps=1)
    assert calls == [16, 8, 4, 2] and row["batch"] == 2 and row["examples_per_s"] > 0
    assert row["params_mib"] == pytest.approx(64 / 2**20, abs=0.1)
    with pytest.raises(RuntimeError, match="no batch of at least 8 fits.*RESOURCE_EXHAUSTED"):
        gpu.fitting_step(config, 16, jax.devices()[0], steps=1, min_batch=8)


def test_fitting_step_raises_other_errors_at_once(monkeypatch):
    def broken(config, device):
        raise ValueError("config.model.image.depht: unknown key")

    monkeypatch.setattr(train_bench, "compile_step", broken)
    config = types.SimpleNamespace(data=types.SimpleNamespace(batch_size=0))
    with pytest.raises(ValueError, match="depht"):
        gpu.fitting_step(config, 16, jax.devices()[0], steps=1)


def test_budget_skips_the_sections_that_would_start_late():
    ran = []
    sections = [(n, lambda n=n: ran.append(n) or n) for n in ("a", "b")]
    assert gpu._budgeted(sections, budget_s=-1.0)["a"]["error"].startswith("not run")
    results = gpu._budgeted(sections, budget_s=60.0)
    assert ran == ["a", "b"] and results["a"] == "a" and results["seconds"] >= 0


@pytest.mark.parity
def test_open_clip_step_runs_the_same_towers_under_autocast(tmp_path):
    require_peer("torch")
    require_peer("open_clip")
    (tmp_path / "vitb16_roi.py").write_text(VITB16_MICRO)
    args = bench.parser().parse_args(["gpu", f"--configs_dir={tmp_path}", *SMALL])
    config = gpu.step_config(args, region=False)
    assert config.model.dtype == "bfloat16" and config.loss.beta == 0.0
    row = gpu.open_clip_step(config, 4, steps=1)
    assert row["batch"] == 4 and np.isfinite(row["examples_per_s"]) and row["examples_per_s"] > 0
