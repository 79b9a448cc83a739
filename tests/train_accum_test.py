"""Gradient accumulation that keeps the global batch's negatives (GradCache) on 8 devices: the
accumulated step's loss and gradients equal the full batch's."""

import jax
import micro_config
import numpy as np
import pytest

from region_medclip import sharding as sharding_lib
from region_medclip.train import step as step_lib


def _gradients(c, batch):
    """(loss, metrics, grads) of one step of config ``c`` on ``batch`` at the initial params."""
    mesh, run, state = micro_config.step_setup(c)
    sharding = sharding_lib.batch_sharding(mesh)
    batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    fn = sharding_lib.with_logical_rules(jax.jit(step_lib.step_gradients(run.model, c, mesh)), mesh)
    return jax.device_get(fn(state.params, batch, {}))


def _config(kind: str, accum: int, negatives: str = "global"):
    c = micro_config.get_config(f"kind={kind}")
    c.data.batch_size = 32  # 4 rows a device, so 4 micro-batches keep one row a device each
    c.data.report_negatives = 2 if kind == "softmax" else 0
    c.loss.update(beta=1.0, gamma=1.0)
    c.train.update(grad_accum=accum, accum_negatives=negatives)
    return c


def _assert_close(a, b):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for key in ("global/loss", "roi/loss", "neg/loss"):
        np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-5, err_msg=key)
    # Some gradients are zero but for rounding (an attention key's bias moves every logit of a
    # query alike), so the absolute tolerance is read against the largest gradient.
    atol = 1e-6 * max(np.abs(y).max() for y in jax.tree.leaves(grads_b))
    paths = jax.tree_util.tree_leaves_with_path(grads_a)
    for (path, x), y in zip(paths, jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, err_msg=str(path))


def test_accumulated_step_equals_the_full_batch():
    """The softmax loss with the region terms and hard-negative reports, 2 micro-batches."""
    batch = micro_config.random_batch(_config("softmax", 1), seed=3)
    _assert_close(
        _gradients(_config("softmax", 2), batch), _gradients(_config("softmax", 1), batch)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,accum",
    [("softmax", 4), ("sigmoid", 2), ("sigmoid", 4), ("medclip", 4), ("dhn_nce", 4)],
)
def test_accumulated_step_equals_the_full_batch_for_every_loss(kind, accum):
    """Every global loss with the region terms (and, for softmax, hard-negative reports)."""
    batch = micro_config.random_batch(_config(kind, 1), seed=3)
    full = _gradients(_config(kind, 1), batch)
    _assert_close(_gradients(_config(kind, accum), batch), full)


@pytest.mark.slow
def test_accumulation_with_own_negatives_differs():
    """``accum_negatives=micro`` (each micro-batch its own negatives) is another loss: the
    check above can tell the two apart."""
    batch = micro_config.random_batch(_config("softmax", 1), seed=3)
    full = _gradients(_config("softmax", 1), batch)
    micro = _gradients(_config("softmax", 2, "micro"), batch)
    assert abs(float(micro[0]) - float(full[0])) > 1e-3


@pytest.mark.slow
def test_accumulated_train_step_runs_with_ema():
    """The whole jitted step with accumulation, the moving average and its guard."""
    c = _config("softmax", 2)
    c.train.ema_decay = 0.9
    state, hist = micro_config.run_steps(c, [micro_config.random_batch(c, s) for s in range(2)])
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert jax.tree.structure(state.ema) == jax.tree.structure(state.params)
