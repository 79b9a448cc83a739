"""The train step: accumulation, bf16, the non-finite guard, clamping, one trace across steps."""

import jax
import jax.numpy as jnp
import micro_config
import numpy as np
import optax
import pytest

from region_medclip import sharding as sharding_lib
from region_medclip import train
from region_medclip.config import ConfigError, validate
from region_medclip.train import step as step_lib


@pytest.mark.slow
def test_grad_accum_averages_micro_batch_gradients():
    """grad_accum=2 with each micro-batch's own negatives: loss and gradient are the means over
    rows (0, 2, ...) and (1, 3, ...)."""
    c = micro_config.get_config()
    c.data.batch_size = 16
    c.train.update(grad_accum=2, accum_negatives="micro")
    batch = micro_config.random_batch(c)
    _, hist = micro_config.run_steps(c, [batch])
    # Reference: each micro-batch through the same loss on its own, averaged by hand.
    c.train.grad_accum, c.data.batch_size = 1, 8
    mesh, run, state0 = micro_config.step_setup(c)
    model = run.model

    def loss(params, micro):
        out = train.forward(model, params, micro, c.loss)
        lb = {k: micro[k] for k in ("roi_mask", "cap_ids", "neg_mask", "labels")}
        lb.update(step_lib.box_targets(micro, out["proposals"].shape[1]))
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
    c.train.ema_decay = 0.99
    good, bad = micro_config.random_batch(c, 0), micro_config.random_batch(c, 1)
    bad["images"][3] = np.nan
    mesh, run, state = micro_config.step_setup(c)
    step = run.train_step(c, mesh)
    state, _ = step(state, good, {})
    before = jax.device_get((state.params, state.opt_state, state.ema))
    state, metrics = step(state, bad, {})
    after = jax.device_get((state.params, state.opt_state, state.ema))
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


def test_the_step_is_traced_once_across_steps():
    """Steps after the first reuse the compiled step: a second trace raises."""
    c = micro_config.get_config()
    mesh, run, state = micro_config.step_setup(c)
    step = run.train_step(c, mesh, max_traces=1)
    sharding = sharding_lib.batch_sharding(mesh)
    for seed in range(3):
        batch = {
            k: jax.device_put(v, sharding) for k, v in micro_config.random_batch(c, seed).items()
        }
        state, metrics = step(state, batch, {})
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
    # A batch of another shape is a new trace, which the bound catches.
    c.data.batch_size = 16
    other = {k: jax.device_put(v, sharding) for k, v in micro_config.random_batch(c).items()}
    with pytest.raises(AssertionError, match="trace"):
        step(state, other, {})


def test_ema_follows_the_params_with_warmup():
    """``train.ema_decay``: the average starts at the init and moves by min(d, (1+t)/(10+t))."""
    c = micro_config.get_config()
    c.train.ema_decay = 0.99
    mesh, run, state = micro_config.step_setup(c)
    step = run.train_step(c, mesh)
    p0 = jax.device_get(state.params)
    np.testing.assert_array_equal(jax.device_get(state.ema["logit_scale"]), p0["logit_scale"])
    state, _ = step(state, micro_config.random_batch(c, 0), {})
    p1, e1 = jax.device_get((state.params, state.ema))
    state, _ = step(state, micro_config.random_batch(c, 1), {})
    p2, e2 = jax.device_get((state.params, state.ema))
    d0, d1 = min(0.99, 1 / 10), min(0.99, 2 / 11)
    for a, b, c1, e, f in zip(*map(jax.tree.leaves, (p0, p1, p2, e1, e2)), strict=True):
        np.testing.assert_allclose(e, d0 * a + (1 - d0) * b, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(f, d1 * e + (1 - d1) * c1, rtol=1e-6, atol=1e-7)


def test_report_negatives_join_the_softmax_step():
    """With ``data.report_negatives`` the step encodes them and the global loss reports how often
    the paired report beats them; a masked one (a report with no finding to swap) is not a
    negative; the other global losses refuse them by name."""
    c = micro_config.get_config()
    c.data.report_negatives = 2
    mesh, run, state = micro_config.step_setup(c)
    grads = sharding_lib.with_logical_rules(
        jax.jit(train.step.step_gradients(run.model, c, mesh)), mesh
    )
    batch = micro_config.random_batch(c, 0)
    batch["report_neg_mask"][:] = True
    loss_all, metrics, _ = grads(state.params, batch, {})
    assert 0 <= float(metrics["global/hard_negative_accuracy"]) <= 1
    assert np.isfinite(float(loss_all))
    batch["report_neg_mask"][:, 1] = False
    loss_masked = float(grads(state.params, batch, {})[0])
    batch["report_negatives"][:, 1] = 7  # what a masked negative holds is never read
    np.testing.assert_allclose(float(grads(state.params, batch, {})[0]), loss_masked, rtol=1e-6)
    assert loss_masked < float(loss_all)
    c.loss.global_kind = "sigmoid"
    with pytest.raises(ConfigError, match="config.data.report_negatives=2"):
        validate(c)
