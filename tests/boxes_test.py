"""The box head (models/boxes.py): decoding, FCOS's assignment by hand, detachment, its own
gradient clipping, and the data's ``box_finding``."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from region_medclip import config as config_lib
from region_medclip.config import ConfigError, validate
from region_medclip.models import boxes as boxes_lib
from region_medclip.models import clip
from region_medclip.train import optim


def test_zero_output_proposes_each_cell_with_even_odds():
    boxes, objectness = boxes_lib.decode(jnp.zeros((1, 2, 3, 5)))
    expected = [[x / 3, y / 2, (x + 1) / 3, (y + 1) / 2] for y in range(2) for x in range(3)]
    np.testing.assert_allclose(boxes[0], expected, atol=1e-6)
    np.testing.assert_array_equal(objectness, np.zeros((1, 6)))


def test_decode_moves_and_scales_from_the_cell():
    """dx = 0.5 moves the centre half a cell; dw = log 2 doubles the width."""
    raw = jnp.zeros((1, 2, 2, 5)).at[0, 0, 0].set(jnp.array([0.5, 0.0, np.log(2.0), 0.0, 3.0]))
    boxes, objectness = boxes_lib.decode(raw)
    # Cell (0, 0): centre (0.25, 0.25) → (0.5, 0.25); width 0.5 → 1.0; height 0.5.
    np.testing.assert_allclose(boxes[0, 0], [0.0, 0.0, 1.0, 0.5], atol=1e-6)
    assert float(objectness[0, 0]) == 3.0


def test_assign_by_hand():
    """4 × 4 cells (centres at 1/8, 3/8, 5/8, 7/8). A large finding box holds 4 centres, a
    nodule inside it holds none but takes the cell its centre falls in (smaller wins), a clear
    region is no finding, and a padded box nothing."""
    large = [0.0, 0.0, 0.5, 0.5]  # centres of cells (0,0), (0,1), (1,0), (1,1)
    nodule = [0.3, 0.3, 0.34, 0.34]  # inside cell (1, 1), holding no centre
    clear = [0.5, 0.5, 1.0, 1.0]
    boxes = jnp.array([[large, nodule, clear, [0, 0, 1, 1]]], jnp.float32)
    finding = jnp.array([[True, True, False, False]])
    targets, positive = boxes_lib.assign(boxes, finding, 4, 4)
    expected = np.zeros((16,), bool)
    expected[[0, 1, 4, 5]] = True
    np.testing.assert_array_equal(positive[0], expected)
    np.testing.assert_allclose(targets[0, [0, 1, 4]], [large] * 3)
    np.testing.assert_allclose(targets[0, 5], nodule)
    np.testing.assert_array_equal(targets[0, ~expected], 0.0)


def test_assign_without_findings_assigns_nothing():
    targets, positive = boxes_lib.assign(jnp.ones((2, 3, 4)) * 0.5, jnp.zeros((2, 3), bool), 3, 3)
    assert not positive.any() and not targets.any()


@pytest.mark.parametrize("detach", [True, False])
def test_detach_stops_the_gradient_at_the_head(detach):
    head = boxes_lib.BoxHead(depth=1, detach=detach)
    tokens = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
    params = head.init(jax.random.key(1), tokens)
    # The zero-initialised output layer would stop any gradient: give it weights.
    params = jax.tree.map(lambda p: p + 0.1, params)
    grad = jax.grad(lambda t: jnp.sum(head.apply(params, t) ** 2))(tokens)
    assert (float(jnp.abs(grad).max()) == 0.0) == detach


def _tiny_model(box_head):
    return clip.RegionCLIP(
        image=dict(variant="mu/16", depth=1),
        text=dict(kind="clip", variant="mu", vocab_size=64, context_len=8, depth=1),
        region=dict(roi_size=2),
        box_head=box_head,
        embed_dim=16,
    )


def _inputs():
    return dict(
        images=jnp.zeros((1, 32, 32, 3)),
        texts=jnp.zeros((1, 8), jnp.int32),
        boxes=jnp.zeros((1, 2, 4)),
        roi_mask=jnp.ones((1, 2), bool),
    )


def test_model_outputs_proposals_only_with_a_box_head():
    """Shapes only (``jax.eval_shape``: nothing compiles or runs)."""
    inputs = _inputs()
    for box_head in (dict(enabled=True, depth=1), None):
        model = _tiny_model(box_head)
        params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), **inputs))["params"]
        out = jax.eval_shape(lambda p, m=model: m.apply({"params": p}, **inputs), params)
        assert ("box_tower" in params) == (box_head is not None)
        if box_head is None:
            assert "proposals" not in out
            with pytest.raises(ValueError, match="no box head"):
                jax.eval_shape(
                    lambda p, m=model: m.apply(
                        {"params": p}, jnp.zeros((1, 2, 2, 8)), method=m.propose_boxes
                    ),
                    params,
                )
        else:
            assert out["proposals"].shape == (1, 4, 4) and out["objectness"].shape == (1, 4)


def _optim_config():
    config = config_lib.base_config().optim
    config.weight_decay = 0.0
    config.warmup_steps = 0
    return config


def test_the_box_head_is_clipped_on_its_own_norm():
    """A huge box-head gradient leaves the towers' clipped update what it is without the head."""
    params = {"image_tower": {"w": jnp.ones((2, 2))}, "logit_scale": jnp.float32(1.0)}
    grads = {"image_tower": {"w": jnp.full((2, 2), 3.0)}, "logit_scale": jnp.float32(2.0)}
    with_head = {**params, "box_tower": {"w": jnp.ones((3,))}}
    with_grads = {**grads, "box_tower": {"w": jnp.full((3,), 1e3)}}
    tx, _ = optim.make_optimizer(_optim_config(), params, 10)
    tx_head, _ = optim.make_optimizer(_optim_config(), with_head, 10)
    alone, _ = tx.update(grads, tx.init(params), params)
    together, _ = tx_head.update(with_grads, tx_head.init(with_head), with_head)
    np.testing.assert_allclose(together["image_tower"]["w"], alone["image_tower"]["w"], rtol=1e-6)
    np.testing.assert_allclose(together["logit_scale"], alone["logit_scale"], rtol=1e-6)
    assert float(jnp.abs(alone["image_tower"]["w"]).max()) > 0
    clipped = optax.clip_by_global_norm(1.0).update(with_grads["box_tower"], None)[0]
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_box_weight_needs_a_box_head():
    config = config_lib.base_config()
    config.loss.box_weight = 1.0
    with pytest.raises(ConfigError, match="config.loss.box_weight"):
        validate(config)
    config.model.box_head.enabled = True
    validate(config)


def test_init_from_a_checkpoint_without_a_box_head_keeps_the_heads_init(tmp_path):
    """A converted CLIP or an older run has no box head: the towers come from it, the model's
    box head keeps its own init; a checkpoint with one gives it too."""
    from region_medclip import checkpointing
    from region_medclip.train import init as init_lib

    model = _tiny_model(dict(enabled=True, depth=1))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **_inputs()))["params"]
    rng = np.random.default_rng(0)
    with_head = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(x.dtype), flax.linen.meta.unbox(shapes)
    )
    without = {k: v for k, v in with_head.items() if k != "box_tower"}
    without = jax.tree.map(lambda x: x + 1.0, without)
    checkpointing.save_params(str(tmp_path / "old"), without, {"model": {}})
    loaded = init_lib.load_init_params(str(tmp_path / "old"), with_head)
    assert "box_tower" not in loaded
    merged = init_lib.overlay_params(with_head, loaded)
    for a, b in zip(
        jax.tree.leaves(merged["image_tower"]), jax.tree.leaves(without["image_tower"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        merged["box_tower"]["out"]["bias"], with_head["box_tower"]["out"]["bias"]
    )
    full = jax.tree.map(lambda x: x + 2.0, with_head)
    checkpointing.save_params(str(tmp_path / "new"), full, {"model": {}})
    loaded = init_lib.load_init_params(str(tmp_path / "new"), with_head)
    np.testing.assert_array_equal(
        loaded["box_tower"]["out"]["bias"], full["box_tower"]["out"]["bias"]
    )
