"""Training: optimizer, sharded step, non-finite guard, checkpoints, exact resume, distillation."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import micro_config
import numpy as np
import optax
import pytest

import conftest
from region_medclip import checkpointing, metrics_writer, train
from region_medclip import sharding as sharding_lib
from region_medclip.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "tests", "micro_config.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """synth_cxr at 32 px, 160 films, built once for the module."""
    from region_medclip.data.synth import builder as synth_cxr

    path = str(tmp_path_factory.mktemp("tfds"))
    synth_cxr.ensure_built(path, size=32, num=160, seed=0)
    return path


def config(data_dir, **overrides):
    c = micro_config.get_config(f"data_dir={data_dir}")
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def run_main(workdir, data_dir, *flags, devices=8, timeout=300, **popen):
    """``python -m region_medclip.main`` on the micro config in a new process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [
        sys.executable,
        "-m",
        "region_medclip.main",
        f"--config={CONFIG_FILE}:data_dir={data_dir}",
        f"--workdir={workdir}",
        *flags,
    ]
    if popen:  # runs beside the tests and may be killed: no shared cache
        return subprocess.Popen(cmd, env=conftest.without_compilation_cache(env), cwd=ROOT, **popen)
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses_by_step(workdir):
    return {r["step"]: r for r in metrics_writer.read_metrics(workdir)}


def final_params(workdir):
    params, _, step = checkpointing.restore_params(workdir)
    return params, step


# ---------------------------------------------------------------------------------------------
# Optimizer.


def _params():
    return {
        "image_tower": {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))}},
        "text_tower": {"embed": {"embedding": jnp.ones((5, 4))}, "ln": {"scale": jnp.ones(4)}},
        "region_tower": {"proj": {"kernel": jnp.ones((4, 4))}},
        "logit_scale": jnp.float32(2.0),
        "logit_bias": jnp.float32(-10.0),
    }


def test_schedule_warmup_then_cosine():
    c = micro_config.get_config()
    c.optim.lr, c.optim.warmup_steps = 1.0, 10
    lr = optim.schedule(c.optim, 110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(lr(60), 0.5, atol=1e-6)  # half-way through the cosine
    np.testing.assert_allclose(lr(110), 0.0, atol=1e-6)
    c.optim.schedule = "linear"
    np.testing.assert_allclose(optim.schedule(c.optim, 110)(60), 0.5, atol=1e-6)
    c.optim.schedule = "constant"
    np.testing.assert_allclose(optim.schedule(c.optim, 110)(100), 1.0, atol=1e-6)
    c.optim.schedule = "step"
    with pytest.raises(ValueError, match="config.optim.schedule"):
        optim.schedule(c.optim, 10)


def test_weight_decay_only_on_matrices():
    mask = optim.decay_mask(_params())
    assert mask["image_tower"]["dense"]["kernel"] and not mask["image_tower"]["dense"]["bias"]
    assert mask["text_tower"]["embed"]["embedding"] and not mask["text_tower"]["ln"]["scale"]
    assert not mask["logit_scale"] and not mask["logit_bias"]


def test_decay_mask_is_applied():
    """With zero gradients only weight decay moves params: matrices shrink, the rest stays."""
    c = micro_config.get_config()
    c.optim.update(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, grad_clip=0.0)
    params = _params()
    tx, _ = optim.make_optimizer(c.optim, params, 10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = jax.tree.map(jnp.add, params, updates)
    np.testing.assert_allclose(new["image_tower"]["dense"]["kernel"], 0.95)
    np.testing.assert_allclose(new["image_tower"]["dense"]["bias"], 1.0)
    np.testing.assert_allclose(new["logit_scale"], 2.0)


def test_freeze_and_tower_lr():
    c = micro_config.get_config()
    c.optim.update(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=0.0)
    c.optim.freeze = dict(image=True, text=False, region=False)
    c.optim.tower_lr = dict(image=1.0, text=0.5, region=1.0, head=1.0)
    params = _params()
    tx, _ = optim.make_optimizer(c.optim, params, 10)
    opt_state = tx.init(params)
    # A frozen tower has no optimizer moments.
    shapes = {leaf.shape for leaf in jax.tree.leaves(opt_state)}
    assert (3, 4) not in shapes and (5, 4) in shapes
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    np.testing.assert_array_equal(updates["image_tower"]["dense"]["kernel"], 0.0)
    # Adam's first step is -lr · sign(g): the multiplier scales it.
    np.testing.assert_allclose(updates["text_tower"]["ln"]["scale"], -0.05, rtol=1e-5)
    np.testing.assert_allclose(updates["region_tower"]["proj"]["kernel"], -0.1, rtol=1e-5)


def test_frozen_grads_do_not_count_in_clipping():
    c = micro_config.get_config()
    c.optim.update(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    c.optim.freeze = dict(image=True, text=False, region=False)
    params = {"image_tower": {"w": jnp.ones((2, 2))}, "text_tower": {"w": jnp.ones((2, 2))}}
    tx, _ = optim.make_optimizer(c.optim, params, 10)
    grads = {"image_tower": {"w": jnp.full((2, 2), 1e6)}, "text_tower": {"w": jnp.ones((2, 2))}}
    # clip's own state is empty; inspect the clipped gradient by running the first two stages.
    clipped, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(clipped["text_tower"]["w"], -1.0, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sharding and the step.


def test_make_mesh_errors_name_the_key():
    c = micro_config.get_config()
    c.mesh.fsdp = 3
    with pytest.raises(ValueError, match="config.mesh.fsdp"):
        sharding_lib.make_mesh(c.mesh)
    c.mesh.fsdp, c.mesh.data = 2, 3
    with pytest.raises(ValueError, match="config.mesh.data"):
        sharding_lib.make_mesh(c.mesh)
    c.mesh.data = -1
    assert dict(sharding_lib.make_mesh(c.mesh).shape) == {"data": 4, "fsdp": 2}


def _assert_same_run(hist_a, hist_b):
    # Losses of step 2 depend on step 1's update; grad norms on every gradient. Params are not
    # compared leaf by leaf: Adam divides near-zero gradients (rare tokens' embeddings) by their
    # own magnitude, so float noise there becomes update noise of up to ~lr.
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in hist_a], [h[key] for h in hist_b], rtol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_fsdp_step_equals_replicated(kind):
    """Same losses and gradients whether params are replicated (data=8) or FSDP-sharded (4 × 2);
    the losses run over the tuple of both batch axes."""
    c = micro_config.get_config(f"kind={kind}")
    batches = [micro_config.random_batch(c, s) for s in range(2)]
    _, hist_a = micro_config.run_steps(c, batches)
    c.mesh.fsdp = 2
    _, hist_b = micro_config.run_steps(c, batches)
    _assert_same_run(hist_a, hist_b)
    assert all(np.isfinite(h["loss"]) for h in hist_a)


def test_one_device_equals_eight():
    c = micro_config.get_config()
    batches = [micro_config.random_batch(c, s) for s in range(2)]
    _, eight = micro_config.run_steps(c, batches)
    _, one = micro_config.run_steps(c, batches, devices=jax.devices()[:1])
    _assert_same_run(eight, one)


def test_grad_accum_averages_micro_batch_gradients():
    """grad_accum=2: loss and gradient are the means over rows (0, 2, ...) and (1, 3, ...)."""
    c = micro_config.get_config()
    c.data.batch_size = 16
    c.train.grad_accum = 2
    batch = micro_config.random_batch(c)
    _, hist = micro_config.run_steps(c, [batch])
    # Reference: each micro-batch through the same loss on its own, averaged by hand.
    c.train.grad_accum, c.data.batch_size = 1, 8
    mesh, run, state0 = micro_config.step_setup(c)
    model = run.model

    def loss(params, micro):
        out = train.forward(model, params, micro, c.loss)
        lb = {k: micro[k] for k in ("roi_mask", "cap_ids", "neg_mask", "labels")}
        return train.sharded_total_loss(
            mesh, c.loss, out=out, batch=lb, student_logits=None, teacher_logits=None
        )[0]

    grad_fn = jax.jit(jax.value_and_grad(loss))
    results = [
        grad_fn(state0.params, jax.tree.map(lambda x, j=j: x[j::2], batch)) for j in range(2)
    ]
    mean_loss = (results[0][0] + results[1][0]) / 2
    mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, results[0][1], results[1][1])
    np.testing.assert_allclose(hist[0]["loss"], mean_loss, rtol=1e-5)
    np.testing.assert_allclose(hist[0]["grad_norm"], optax.tree.norm(mean_grads), rtol=1e-5)


def test_bf16_compute_remat_and_bf16_moments():
    c = micro_config.get_config()
    c.model.update(dtype="bfloat16", remat=True)
    c.optim.mu_dtype = "bfloat16"
    state, hist = micro_config.run_steps(c, [micro_config.random_batch(c, s) for s in range(2)])
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in hist)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    mu_dtypes = {
        leaf.dtype
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if "mu" in jax.tree_util.keystr(path)
    }
    assert mu_dtypes == {jnp.dtype("bfloat16")}


def test_nonfinite_batch_skips_update():
    c = micro_config.get_config()
    good, bad = micro_config.random_batch(c, 0), micro_config.random_batch(c, 1)
    bad["images"][3] = np.nan
    mesh, run, state = micro_config.step_setup(c)
    step = run.train_step(c, mesh)
    state, _ = step(state, good, {})
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = step(state, bad, {})
    after = jax.device_get((state.params, state.opt_state))
    assert metrics["nonfinite"] == 1 and int(state.skipped) == 1 and int(state.bad_streak) == 1
    assert int(state.step) == 2
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, good, {})
    assert np.isfinite(metrics["loss"]) and int(state.bad_streak) == 0 and int(state.skipped) == 1


def test_logit_scale_clamped_for_softmax_not_sigmoid():
    for kind, clamped in (("softmax", True), ("sigmoid", False)):
        c = micro_config.get_config(f"kind={kind}")
        c.model.logit_scale_init = 6.0  # above log(100)
        state, _ = micro_config.run_steps(c, [micro_config.random_batch(c)])
        value = float(state.params["logit_scale"])
        assert (value <= np.log(100) + 1e-6) == clamped, (kind, value)


# ---------------------------------------------------------------------------------------------
# The loop: metrics, guard, checkpoints, resume.


def test_relative_workdir_saves_and_resumes(data_dir, tmp_path, monkeypatch):
    # As README's commands pass it (--workdir=runs/tiny); orbax itself needs an absolute path.
    monkeypatch.chdir(tmp_path)
    train.train_and_evaluate(config(data_dir, **{"train.total_steps": 1}), "runs/rel")
    assert checkpointing.Checkpointer("runs/rel", keep=3).latest_step() == 1
    assert (tmp_path / "runs/rel/checkpoints").is_dir()
    result = train.train_and_evaluate(config(data_dir, **{"train.total_steps": 2}), "runs/rel")
    assert result["step"] == 2
    params, _, step = checkpointing.restore_params("runs/rel")  # region_medclip.load's reader
    assert step == 2 and params


def test_train_two_steps_checkpoint_resume_two_more(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config(data_dir, **{"train.total_steps": 2}), workdir)
    assert result["step"] == 2 and np.isfinite(result["loss"])
    assert checkpointing.Checkpointer(workdir, keep=3).latest_step() == 2
    c = config(data_dir, **{"train.total_steps": 4, "train.keep": 1})
    result = train.train_and_evaluate(c, workdir)
    assert result["step"] == 4
    assert checkpointing.Checkpointer(workdir, keep=1).all_steps() == [4]  # keep = 1
    rows = losses_by_step(workdir)
    assert sorted(rows) == [1, 2, 3, 4]
    for key in (
        "loss",
        "global/loss",
        "roi/loss",
        "neg/loss",
        "grad_norm",
        "lr",
        "temperature",
        "skipped_steps",
        "perf/steps_per_s",
        "perf/examples_per_s",
        "perf/eta_s",
    ):
        assert key in rows[4], key
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["batch_size"] == 8
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "run/tb"))


def test_nonfinite_steps_are_counted_then_abort(data_dir, tmp_path):
    def poison(steps):
        def hook(step, batch):
            if step in steps:
                batch = dict(batch, images=np.full_like(batch["images"], np.nan))
            return batch

        return hook

    c = config(data_dir, **{"train.total_steps": 4})
    result = train.train_and_evaluate(c, str(tmp_path / "a"), batch_hook=poison({2}))
    rows = losses_by_step(str(tmp_path / "a"))
    assert rows[2]["nonfinite"] == 1 and rows[2]["loss"] is None
    assert result["skipped_steps"] == 1 and np.isfinite(rows[4]["loss"])
    c = config(data_dir, **{"train.total_steps": 8, "train.max_bad_steps": 3})
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        train.train_and_evaluate(c, str(tmp_path / "b"), batch_hook=poison({2, 3, 4, 5, 6}))


def test_resume_in_new_process_is_exact(data_dir, tmp_path):
    """6 steps straight == 3 steps + a new process resuming + 3 steps: params, losses, data."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_main(straight, data_dir, "--config.train.total_steps=6")
    train.train_and_evaluate(config(data_dir, **{"train.total_steps": 3}), split)
    run_main(split, data_dir, "--config.train.total_steps=6")
    a, b = losses_by_step(straight), losses_by_step(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["data/fingerprint"] == b[step]["data/fingerprint"], step
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6, abs=0), step
    (pa, sa), (pb, sb) = final_params(straight), final_params(split)
    assert sa == sb == 6
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out")


def _metrics_steps(workdir):
    try:
        return set(losses_by_step(workdir))
    except (FileNotFoundError, json.JSONDecodeError):
        return set()


def test_sigkill_resumes_from_last_complete_checkpoint(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    # A constant schedule: the rerun stops earlier than the killed run would have, and a cosine's
    # learning rate depends on the total.
    constant = "--config.optim.schedule=constant"
    proc = run_main(
        workdir,
        data_dir,
        "--config.train.total_steps=1000",
        constant,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(lambda: 7 in _metrics_steps(workdir), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = checkpointing.Checkpointer(workdir, keep=10).latest_step()
    assert last is not None and last >= 2 and last % 2 == 0
    run_main(workdir, data_dir, f"--config.train.total_steps={last + 2}", constant)
    assert checkpointing.Checkpointer(workdir, keep=10).latest_step() == last + 2
    # The rerun repeated the steps after the checkpoint with the same data.
    straight = str(tmp_path / "straight")
    c = config(data_dir, **{"train.total_steps": last + 2, "optim.schedule": "constant"})
    train.train_and_evaluate(c, straight)
    a, b = losses_by_step(straight), losses_by_step(workdir)
    for step in (last + 1, last + 2):
        assert a[step]["data/fingerprint"] == b[step]["data/fingerprint"]
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6)


def test_sigterm_saves_and_exits_zero(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    proc = run_main(
        workdir,
        data_dir,
        "--config.train.total_steps=1000",
        "--config.train.ckpt_every=1000",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for(lambda: 3 in _metrics_steps(workdir), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    last = checkpointing.Checkpointer(workdir, keep=10).latest_step()
    assert last is not None and last >= 3
    assert max(_metrics_steps(workdir)) == last  # the step it stopped at is logged and saved


def test_checkpoint_from_8_devices_restores_on_4_and_1(data_dir, tmp_path):
    c = micro_config.get_config()
    c.mesh.fsdp = 2
    state, _ = micro_config.run_steps(c, [micro_config.random_batch(c)])
    expected = jax.device_get(state)
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(1, state, None, {"note": "test"})
    ckpt.wait()
    for devices, fsdp in ((4, 4), (4, 1), (1, 1)):
        c.mesh.fsdp = fsdp
        run = train.setup(c, sharding_lib.make_mesh(c.mesh, jax.devices()[:devices]))
        target = checkpointing.abstract_with_shardings(run.abstract, run.shardings)
        restored = ckpt.restore(1, target)
        leaf = restored.params["image_tower"]["proj"]["kernel"]
        assert len(leaf.sharding.device_set) == devices
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
    assert ckpt.restore_config(1) == {"note": "test"}
    ckpt.close()


# ---------------------------------------------------------------------------------------------
# Distillation and init_from.


def test_teacher_is_frozen_and_outside_optimizer(data_dir, tmp_path):
    teacher_dir = str(tmp_path / "teacher")
    train.train_and_evaluate(config(data_dir, **{"train.total_steps": 2}), teacher_dir)
    c = config(data_dir, **{"loss.lambda_": 0.5, "teacher.init_from": teacher_dir})
    teacher = train.Teacher(
        teacher_dir, c.data, train.concept_vocabulary("synth_cxr"), sharding_lib.make_mesh(c.mesh)
    )
    before = jax.device_get(teacher.params)
    state, hist = micro_config.run_steps(
        c, [micro_config.random_batch(c, s) for s in range(3)], teacher=teacher
    )
    after = jax.device_get(teacher.params)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(h["distill/loss"] > 0 for h in hist)
    # Optimizer state holds moments of the student's params only.
    student = {x.shape for x in jax.tree.leaves(state.params)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert len(moments) == 2 * len([x for x in jax.tree.leaves(state.params) if x.ndim])
    assert {x.shape for x in moments} <= student
    # Through the loop too: λ > 0 with a teacher adds the term.
    c.train.total_steps = 2
    result = train.train_and_evaluate(c, str(tmp_path / "student"))
    assert result["distill/loss"] > 0


def test_init_from_checkpoint(data_dir, tmp_path):
    source = str(tmp_path / "source")
    train.train_and_evaluate(config(data_dir, **{"train.total_steps": 2}), source)
    params, _, _ = checkpointing.restore_params(source)
    c = config(data_dir, **{"model.init_from": source, "optim.lr": 0.0})
    c.train.total_steps = 1
    train.train_and_evaluate(c, str(tmp_path / "b"))
    loaded, _, _ = checkpointing.restore_params(str(tmp_path / "b"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)
    bad = config(data_dir, **{"model.init_from": source, "model.embed_dim": 16})
    with pytest.raises(ValueError, match="config.model.init_from"):
        train.train_and_evaluate(bad, str(tmp_path / "c"))


def test_every_global_kind_trains_from_the_command_line(data_dir, tmp_path):
    """sigmoid through `main` in a new process (flags parsed, config validated, run to the end);
    medclip and dhn_nce through the same loop in-process (softmax runs in the tests above)."""
    run_main(
        str(tmp_path / "sigmoid"),
        data_dir,
        "--config.loss.global_kind=sigmoid",
        "--config.model.logit_scale_init=2.302585",
        "--config.train.total_steps=2",
        devices=2,
    )
    for kind in ("medclip", "dhn_nce"):
        train.train_and_evaluate(
            config(data_dir, **{"loss.global_kind": kind, "train.total_steps": 2}),
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
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
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
