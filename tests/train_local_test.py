"""GLoRIA's local loss in the train step: its inputs (report words, patch cells), the logged
term, gradients into both towers, and GradCache accumulation that equals the full batch."""

import jax
import jax.numpy as jnp
import micro_config
import numpy as np
import pytest

from region_medclip import sharding as sharding_lib
from region_medclip import train
from region_medclip.models import text as text_lib
from region_medclip.train import step as step_lib


def _local_config(**loss):
    c = micro_config.get_config()
    c.loss.update(local_weight=1.0, **loss)
    return c


def _gradients(c, batch):
    """(loss, metrics, grads) of one step of config ``c`` on ``batch`` at the initial params."""
    mesh, run, state = micro_config.step_setup(c)
    sharding = sharding_lib.batch_sharding(mesh)
    batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    fn = sharding_lib.with_logical_rules(jax.jit(step_lib.step_gradients(run.model, c, mesh)), mesh)
    return jax.device_get(fn(state.params, batch, {}))


def test_word_mask_drops_padding_and_the_start_and_end_tokens():
    # CLIP-style: <start> w w <end> pad pad; BERT-style: [CLS] w [SEP]; an empty report.
    tokens = jnp.array([[49406, 5, 6, 49407, 0, 0], [101, 7, 102, 0, 0, 0], [1, 2, 0, 0, 0, 0]])
    expected = [[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    np.testing.assert_array_equal(text_lib.word_mask(tokens), np.array(expected, bool))
    # A tower whose padding id is not 0 (the tower's own pad_id decides).
    tokens = jnp.array([[1, 5, 2, 9, 9]])
    np.testing.assert_array_equal(text_lib.word_mask(tokens, pad_id=9), [[0, 1, 0, 0, 0]])


def test_forward_gives_words_and_patch_cells():
    """``zwords [n, L, D]`` and ``zpatch [n, g², D]``: the image tower's 4 × 4 patch grid by
    default, ``loss.gloria.grid`` cells a side when set; neither when the weight is 0."""
    c = _local_config()
    mesh, run, state = micro_config.step_setup(c)
    batch = micro_config.random_batch(c)
    n, length, dim = c.data.batch_size, c.data.text_len, c.model.embed_dim
    for grid, cells in ((0, 16), (2, 4)):
        c.loss.gloria.grid = grid
        out = jax.eval_shape(
            lambda p, b: train.forward(run.model, p, b, c.loss), state.params, batch
        )
        assert out["zwords"].shape == (n, length, dim)
        assert out["zpatch"].shape == (n, cells, dim)
    c.loss.local_weight = 0.0
    out = jax.eval_shape(lambda p, b: train.forward(run.model, p, b, c.loss), state.params, batch)
    assert "zwords" not in out and "zpatch" not in out


def test_train_step_logs_a_finite_local_term():
    c = _local_config()
    _, hist = micro_config.run_steps(c, [micro_config.random_batch(c, s) for s in range(2)])
    for h in hist:
        assert h["local/weight"] == 1.0 and np.isfinite(h["loss"]) and h["nonfinite"] == 0
        assert np.isfinite(h["local/loss"]) and h["local/loss"] > 0
        assert 0 <= h["local/i2t_accuracy"] <= 1 and h["local/words"] == c.data.text_len - 2
        other = h["global/loss"] + h["roi/loss"] + h["neg/loss"] + h["box/loss"]
        np.testing.assert_allclose(h["loss"], other + h["local/loss"], rtol=1e-5)


def test_local_loss_alone_trains_both_towers():
    """With every other term off, the gradient of the local loss reaches the text tower (words),
    the image tower and the region head (patch cells), and leaves the temperature alone."""
    c = _local_config(alpha=0.0, beta=0.0, gamma=0.0, box_weight=0.0)
    loss, metrics, grads = _gradients(c, micro_config.random_batch(c, 1))
    np.testing.assert_allclose(loss, metrics["local/loss"], rtol=1e-6)
    for tower in ("text_tower", "image_tower", "region_tower"):
        norm = sum(float(np.abs(g).sum()) for g in jax.tree.leaves(grads[tower]))
        assert np.isfinite(norm) and norm > 0, tower
    assert float(grads["logit_scale"]) == 0.0


@pytest.mark.slow
def test_accumulated_step_with_the_local_loss_equals_the_full_batch():
    """GradCache (``train.accum_negatives=global``) caches the words and patch cells like every
    other embedding: two micro-batches give the full batch's loss and gradients."""
    c = _local_config()
    c.data.batch_size = 16  # 2 rows a device, one a device in each micro-batch
    batch = micro_config.random_batch(c, seed=3)
    full = _gradients(c, batch)
    c.train.grad_accum = 2
    accumulated = _gradients(c, batch)
    np.testing.assert_allclose(accumulated[0], full[0], rtol=1e-5)
    for key in ("global/loss", "roi/loss", "local/loss", "local/t2i_accuracy"):
        np.testing.assert_allclose(accumulated[1][key], full[1][key], rtol=1e-5, err_msg=key)
    # Near-zero gradients are compared against the largest one (as tests/train_accum_test.py).
    atol = 1e-6 * max(np.abs(g).max() for g in jax.tree.leaves(full[2]))
    paths = jax.tree_util.tree_leaves_with_path(accumulated[2])
    for (path, x), y in zip(paths, jax.tree.leaves(full[2]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, err_msg=str(path))
