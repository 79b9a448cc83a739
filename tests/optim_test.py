"""The optimizer: schedule, weight-decay mask, frozen towers and per-tower rates, clipping."""

import jax
import jax.numpy as jnp
import micro_config
import numpy as np
import pytest

from region_medclip.train import optim


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


def _tower_params():
    """A two-block image tower and a one-block text tower, named as the towers name them."""
    block = {"attn": {"kernel": jnp.ones((4, 4))}, "ln_1": {"scale": jnp.ones(4)}}
    return {
        "image_tower": {
            "patch_embed": {"kernel": jnp.ones((2, 2, 3, 4))},
            "pos_embedding": jnp.ones((5, 4)),
            "encoder": {"block0": block, "block1": block},
            "ln_post": {"scale": jnp.ones(4)},
            "proj": {"kernel": jnp.ones((4, 4))},
        },
        "text_tower": {
            "token_embedding": {"embedding": jnp.ones((9, 4))},
            "encoder": {"block0": block},
            "proj": {"kernel": jnp.ones((4, 4))},
        },
        "region_tower": {"ln": {"scale": jnp.ones(4)}},
        "logit_scale": jnp.float32(2.0),
    }


def test_layer_ids_count_embeddings_blocks_and_heads():
    ids = optim.layer_ids(_tower_params())
    image = ids["image_tower"]
    assert image["patch_embed"]["kernel"] == (0, 2) and image["pos_embedding"] == (0, 2)
    assert image["encoder"]["block0"]["attn"]["kernel"] == (1, 2)
    assert image["encoder"]["block1"]["ln_1"]["scale"] == (2, 2)
    assert image["ln_post"]["scale"] == (3, 2) and image["proj"]["kernel"] == (3, 2)
    assert ids["text_tower"]["encoder"]["block0"]["attn"]["kernel"] == (1, 1)
    assert ids["region_tower"]["ln"]["scale"] == (1, 0) and ids["logit_scale"] == (1, 0)


def test_layer_decay_scales_each_layers_step():
    """Adam's first step is -lr · sign(g): with decay 0.5 block i of L moves by lr · 0.5^(L-i)."""
    c = micro_config.get_config()
    c.optim.update(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=0.0)
    c.optim.layer_decay = 0.5
    params = _tower_params()
    tx, _ = optim.make_optimizer(c.optim, params, 10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    image = updates["image_tower"]
    np.testing.assert_allclose(image["proj"]["kernel"], -0.1, rtol=1e-5)
    np.testing.assert_allclose(image["encoder"]["block1"]["attn"]["kernel"], -0.05, rtol=1e-5)
    np.testing.assert_allclose(image["encoder"]["block0"]["attn"]["kernel"], -0.025, rtol=1e-5)
    np.testing.assert_allclose(image["pos_embedding"], -0.0125, rtol=1e-5)
    text = updates["text_tower"]
    np.testing.assert_allclose(text["token_embedding"]["embedding"], -0.025, rtol=1e-5)
    np.testing.assert_allclose(updates["logit_scale"], -0.1, rtol=1e-5)


def test_unlock_freezes_all_but_the_last_blocks():
    """optim.unlock.image=1 (LiT's partial unlocking): the embeddings and block0 stay, block1
    and what follows train; the text tower is untouched."""
    c = micro_config.get_config()
    c.optim.update(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=0.0)
    c.optim.unlock = dict(image=1, text=-1)
    params = _tower_params()
    labels = optim.param_labels(params, c.optim)
    assert labels["image_tower"]["encoder"]["block0"]["attn"]["kernel"] == optim.FROZEN
    assert labels["image_tower"]["patch_embed"]["kernel"] == optim.FROZEN
    assert labels["image_tower"]["encoder"]["block1"]["attn"]["kernel"] == "image"
    assert labels["image_tower"]["proj"]["kernel"] == "image"
    assert labels["text_tower"]["encoder"]["block0"]["attn"]["kernel"] == "text"
    tx, _ = optim.make_optimizer(c.optim, params, 10)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    np.testing.assert_array_equal(updates["image_tower"]["encoder"]["block0"]["attn"]["kernel"], 0)
    np.testing.assert_allclose(
        updates["image_tower"]["encoder"]["block1"]["ln_1"]["scale"], -0.1, rtol=1e-5
    )
    c.optim.unlock = dict(image=0, text=-1)  # only what follows the blocks
    labels = optim.param_labels(params, c.optim)
    assert labels["image_tower"]["encoder"]["block1"]["attn"]["kernel"] == optim.FROZEN
    assert labels["image_tower"]["ln_post"]["scale"] == "image"


def test_bad_unlock_and_layer_decay_are_named():
    from region_medclip.config import ConfigError, validate

    c = micro_config.get_config()
    c.optim.unlock = dict(image=1, region=2)
    with pytest.raises(ConfigError, match="config.optim.unlock.region"):
        validate(c)
    c = micro_config.get_config()
    c.optim.layer_decay = 1.5
    with pytest.raises(ConfigError, match="config.optim.layer_decay"):
        validate(c)
    c = micro_config.get_config()
    c.train.ema_decay = 1.0
    with pytest.raises(ConfigError, match="config.train.ema_decay"):
        validate(c)
    c = micro_config.get_config()
    c.train.accum_negatives = "local"
    with pytest.raises(ConfigError, match="config.train.accum_negatives"):
        validate(c)
