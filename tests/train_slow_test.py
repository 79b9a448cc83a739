"""End-to-end runs in new processes: exact resume, SIGKILL, SIGTERM, the command line for every
global loss, and two processes of four devices (gloo) against one of eight."""

import json
import os
import signal
import subprocess
import sys

import jax
import micro_config
import numpy as np
import pytest
from micro_config import (
    ROOT,
    config,
    final_params,
    losses_by_step,
    metrics_steps,
    run_main,
    wait_for,
)

import conftest
from region_medclip import checkpointing, train

pytestmark = pytest.mark.slow


def test_resume_in_new_process_is_exact(synth_data_dir, tmp_path):
    """6 steps straight == 3 steps + a new process resuming + 3 steps: params, losses, data."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_main(straight, synth_data_dir, "--config.train.total_steps=6")
    train.train_and_evaluate(config(synth_data_dir, **{"train.total_steps": 3}), split)
    run_main(split, synth_data_dir, "--config.train.total_steps=6")
    a, b = losses_by_step(straight), losses_by_step(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["data/fingerprint"] == b[step]["data/fingerprint"], step
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6, abs=0), step
    (pa, sa), (pb, sb) = final_params(straight), final_params(split)
    assert sa == sb == 6
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_sigkill_resumes_from_last_complete_checkpoint(synth_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    # A constant schedule: the rerun stops earlier than the killed run would have, and a cosine's
    # learning rate depends on the total.
    constant = "--config.optim.schedule=constant"
    proc = run_main(
        workdir,
        synth_data_dir,
        "--config.train.total_steps=1000",
        constant,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: 7 in metrics_steps(workdir), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = checkpointing.Checkpointer(workdir, keep=10).latest_step()
    assert last is not None and last >= 2 and last % 2 == 0
    run_main(workdir, synth_data_dir, f"--config.train.total_steps={last + 2}", constant)
    assert checkpointing.Checkpointer(workdir, keep=10).latest_step() == last + 2
    # What the killed run logged past its checkpoint was dropped: every step is logged once.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, last + 3))
    # The rerun repeated the steps after the checkpoint with the same data.
    straight = str(tmp_path / "straight")
    c = config(synth_data_dir, **{"train.total_steps": last + 2, "optim.schedule": "constant"})
    train.train_and_evaluate(c, straight)
    a, b = losses_by_step(straight), losses_by_step(workdir)
    for step in (last + 1, last + 2):
        assert a[step]["data/fingerprint"] == b[step]["data/fingerprint"]
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6)


def test_sigterm_saves_and_exits_zero(synth_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    proc = run_main(
        workdir,
        synth_data_dir,
        "--config.train.total_steps=1000",
        "--config.train.ckpt_every=1000",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: 3 in metrics_steps(workdir), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    last = checkpointing.Checkpointer(workdir, keep=10).latest_step()
    assert last is not None and last >= 3
    assert max(metrics_steps(workdir)) == last  # the step it stopped at is logged and saved


def test_every_global_kind_trains_from_the_command_line(synth_data_dir, tmp_path):
    """sigmoid through `main` in a new process (flags parsed, config validated, run to the end);
    medclip and dhn_nce through the same loop in-process (softmax runs in the tests above)."""
    run_main(
        str(tmp_path / "sigmoid"),
        synth_data_dir,
        "--config.loss.global_kind=sigmoid",
        "--config.model.logit_scale_init=2.302585",
        "--config.train.total_steps=2",
        devices=2,
    )
    for kind in ("medclip", "dhn_nce"):
        train.train_and_evaluate(
            config(synth_data_dir, **{"loss.global_kind": kind, "train.total_steps": 2}),
            str(tmp_path / kind),
        )
    for kind in ("sigmoid", "medclip", "dhn_nce"):
        rows = losses_by_step(str(tmp_path / kind))
        assert sorted(rows) == [1, 2] and all(np.isfinite(r["loss"]) for r in rows.values()), kind


def test_two_processes_of_four_devices_equal_one_of_eight(tmp_path):
    """The train step as 2 processes × 4 CPU devices (gloo on 127.0.0.1) gives the losses of
    1 process × 8 devices on the same global batches; with fsdp = 2 both the batch and the
    params are split across the processes."""
    fsdp = 2
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "losses.json"
    # Two processes compiling the same programs at once: no shared cache.
    env = conftest.without_compilation_cache(dict(os.environ, JAX_PLATFORMS="cpu"))
    env["XLA_FLAGS"] = micro_config.xla_flags(4)
    worker = os.path.join(ROOT, "tests", "multihost_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), "2", str(port), str(out), str(fsdp)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    multi = json.loads(out.read_text())
    c = micro_config.get_config()
    c.mesh.fsdp = fsdp
    _, history = micro_config.run_steps(c, [micro_config.random_batch(c, s) for s in range(3)])
    np.testing.assert_allclose(multi, [h["loss"] for h in history], rtol=1e-5)
