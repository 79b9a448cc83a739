"""The training loop: workdirs, metrics, the non-finite guard, resume, distillation, init_from."""

import json
import os

import jax
import micro_config
import numpy as np
import pytest
from micro_config import config, losses_by_step

from region_medclip import checkpointing, train
from region_medclip import sharding as sharding_lib


@pytest.mark.slow
def test_relative_workdir_saves_and_resumes(synth_data_dir, tmp_path, monkeypatch):
    # As README's commands pass it (--workdir=runs/tiny); orbax itself needs an absolute path.
    monkeypatch.chdir(tmp_path)
    train.train_and_evaluate(config(synth_data_dir, **{"train.total_steps": 1}), "runs/rel")
    assert checkpointing.Checkpointer("runs/rel", keep=3).latest_step() == 1
    assert (tmp_path / "runs/rel/checkpoints").is_dir()
    result = train.train_and_evaluate(
        config(synth_data_dir, **{"train.total_steps": 2}), "runs/rel"
    )
    assert result["step"] == 2
    params, _, step = checkpointing.restore_params("runs/rel")  # region_medclip.load's reader
    assert step == 2 and params


def test_train_two_steps_checkpoint_resume_two_more(synth_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config(synth_data_dir, **{"train.total_steps": 2}), workdir)
    assert result["step"] == 2 and np.isfinite(result["loss"])
    assert checkpointing.Checkpointer(workdir, keep=3).latest_step() == 2
    # What a run killed after its checkpoint at 2 logged beyond it, the last line half-written.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 9.0}\n{"step": 4, "loss": 9.0}\n{"step": 5, "lo')
    c = config(synth_data_dir, **{"train.total_steps": 4, "train.keep": 1})
    result = train.train_and_evaluate(c, workdir)
    assert result["step"] == 4
    assert checkpointing.Checkpointer(workdir, keep=1).all_steps() == [4]  # keep = 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # each step once
    rows = losses_by_step(workdir)
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[3]["loss"] != 9.0
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


@pytest.mark.slow
def test_nonfinite_steps_are_counted_then_abort(synth_data_dir, tmp_path):
    def poison(steps):
        def hook(step, batch):
            if step in steps:
                batch = dict(batch, images=np.full_like(batch["images"], np.nan))
            return batch

        return hook

    c = config(synth_data_dir, **{"train.total_steps": 4})
    result = train.train_and_evaluate(c, str(tmp_path / "a"), batch_hook=poison({2}))
    rows = losses_by_step(str(tmp_path / "a"))
    assert rows[2]["nonfinite"] == 1 and rows[2]["loss"] is None
    assert result["skipped_steps"] == 1 and np.isfinite(rows[4]["loss"])
    c = config(synth_data_dir, **{"train.total_steps": 8, "train.max_bad_steps": 3})
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        train.train_and_evaluate(c, str(tmp_path / "b"), batch_hook=poison({2, 3, 4, 5, 6}))


@pytest.mark.slow
def test_teacher_is_frozen_and_outside_optimizer(synth_data_dir, tmp_path):
    teacher_dir = str(tmp_path / "teacher")
    train.train_and_evaluate(config(synth_data_dir, **{"train.total_steps": 2}), teacher_dir)
    c = config(synth_data_dir, **{"loss.lambda_": 0.5, "teacher.init_from": teacher_dir})
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
    # Accumulated with the whole batch's negatives, distillation included, as the full batch.
    from train_accum_test import _assert_close

    c.data.batch_size = 16
    batch = micro_config.random_batch(c, 5)
    full = _step_gradients(c, batch, teacher)
    c.train.grad_accum = 2
    _assert_close(_step_gradients(c, batch, teacher), full)


def _step_gradients(c, batch, teacher):
    mesh, run, state = micro_config.step_setup(c)
    fn = jax.jit(train.step.step_gradients(run.model, c, mesh, teacher))
    sharding = sharding_lib.batch_sharding(mesh)
    batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    return jax.device_get(
        sharding_lib.with_logical_rules(fn, mesh)(state.params, batch, teacher.params)
    )


@pytest.mark.slow
def test_ema_is_saved_evaluated_and_loaded(synth_data_dir, tmp_path):
    """train.ema_decay: the average is checkpointed, evaluated beside the params as
    ema/<evaluator>, and read by load(W, params="ema"); a run without one says so."""
    import region_medclip

    c = micro_config.get_config(f"data_dir={synth_data_dir},evals")
    c.train.update(total_steps=2, ema_decay=0.9)
    workdir = str(tmp_path / "ema")
    result = train.train_and_evaluate(c, workdir)
    assert "ema/zero_shot" in result["eval"] and "zero_shot" in result["eval"]
    stored = json.loads((tmp_path / "ema" / "eval" / "2.json").read_text())
    assert "ema/retrieval" in stored
    raw, ema = region_medclip.load(workdir), region_medclip.load(workdir, params="ema")
    pairs = zip(jax.tree.leaves(raw.params), jax.tree.leaves(ema.params), strict=True)
    assert not all(np.array_equal(a, b) for a, b in pairs)
    plain = str(tmp_path / "plain")
    train.train_and_evaluate(config(synth_data_dir, **{"train.total_steps": 1}), plain)
    with pytest.raises(ValueError, match="holds no ema"):
        region_medclip.load(plain, params="ema")


@pytest.mark.slow
def test_init_from_checkpoint(synth_data_dir, tmp_path):
    source = str(tmp_path / "source")
    train.train_and_evaluate(config(synth_data_dir, **{"train.total_steps": 2}), source)
    params, _, _ = checkpointing.restore_params(source)
    c = config(synth_data_dir, **{"model.init_from": source, "optim.lr": 0.0})
    c.train.total_steps = 1
    train.train_and_evaluate(c, str(tmp_path / "b"))
    loaded, _, _ = checkpointing.restore_params(str(tmp_path / "b"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)
    bad = config(synth_data_dir, **{"model.init_from": source, "model.embed_dim": 16})
    with pytest.raises(ValueError, match="config.model.init_from"):
        train.train_and_evaluate(bad, str(tmp_path / "c"))


def test_accumulation_that_does_not_divide_the_batch_is_named(synth_data_dir, tmp_path):
    """Before anything compiles: 8 films on 8 devices cannot split 3 ways."""
    c = config(synth_data_dir, **{"train.grad_accum": 3})
    with pytest.raises(ValueError, match=r"config.data.batch_size=8 .*config.train.grad_accum=3"):
        train.train_and_evaluate(c, str(tmp_path / "run"))
