"""The mesh, the one rules table, that the train step's activations follow it, and that the step
gives the same losses and gradients on every layout (FSDP, 8 devices, 1 device)."""

import re

import jax
import micro_config
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from micro_config import assert_same_run

from region_medclip import sharding as sharding_lib
from region_medclip.models import vit


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


def test_one_table_maps_params_activations_and_loss_specs():
    fsdp = sharding_lib.make_mesh({"fsdp": 2})
    replicated = sharding_lib.make_mesh({"fsdp": 1})
    # The batch is split over both axes; the losses' shard_map specs come from the same name.
    assert sharding_lib.logical_spec(("batch",), fsdp) == P(("data", "fsdp"))
    assert sharding_lib.batch_sharding(fsdp).spec == P(sharding_lib.BATCH_AXES)
    # An activation keeps `embed` whole (fsdp is taken by the batch); a parameter splits it.
    assert sharding_lib.logical_spec(("batch", "length", "embed"), fsdp) == P(
        ("data", "fsdp"), None, None
    )
    assert sharding_lib.logical_spec(("embed", "mlp"), fsdp) == P("fsdp", None)
    assert sharding_lib.logical_spec(("embed", "mlp"), replicated) == P(None, None)


def _lowered_step(c):
    mesh, run, state = micro_config.step_setup(c)
    step = run.train_step(c, mesh)
    batch = micro_config.random_batch(c)
    sharding = sharding_lib.batch_sharding(mesh)
    batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return step, state, batch


def _constraints(hlo: str) -> list[str]:
    """The mesh-axis lists of the lowered step's sharding constraints (Shardy's
    ``sdy.sharding_constraint %x <@mesh, [{"data", "fsdp"}, {}, {}]>``)."""
    return re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[[^\]]*\])>", hlo)


def test_activations_are_constrained_to_the_batch_axes_on_an_fsdp_mesh():
    """With ``mesh.fsdp=2`` the parameters are split over ``fsdp``; the step runs on its mesh,
    the rules table keeps every block's activations split over the batch (8 ways), and the
    compiled step never holds a whole-batch block activation on one device."""
    c = micro_config.get_config()
    c.mesh.fsdp = 2
    step, state, batch = _lowered_step(c)
    lowered = step.lower(state, batch, {})
    constraints = _constraints(lowered.as_text())
    assert constraints, "no activation constraint reached the lowered step"
    # [batch, length, embed] split over both batch axes (8 ways), whole on the other two.
    assert set(constraints) == {'[{"data", "fsdp"}, {}, {}]'}, constraints
    # The same jitted function outside the rules: the annotations are no-ops.
    raw = step._fn.lower(state, batch, {})  # noqa: SLF001
    assert not _constraints(raw.as_text())
    compiled = lowered.compile().as_text()
    width = vit.decode_variant(c.model.image["variant"])["width"]
    tokens = (c.data.image_size // vit.decode_variant(c.model.image["variant"])["patch"]) ** 2
    local = c.data.batch_size // 8
    # The image blocks' activations [batch, tokens (+ class token), width].
    shapes = re.findall(r"f32\[(\d+),(\d+),(\d+)\]", compiled)
    batch_dims = {
        int(b) for b, n, w in shapes if int(w) == width and int(n) in (tokens, tokens + 1)
    }
    assert local in batch_dims and c.data.batch_size not in batch_dims, sorted(batch_dims)


def test_fsdp_mesh_splits_parameters_along_embed():
    c = micro_config.get_config()
    c.mesh.fsdp = 2
    _, run, state = micro_config.step_setup(c)
    specs = [s.spec for s in jax.tree.leaves(run.shardings.params)]
    assert any("fsdp" in tuple(spec) for spec in specs)
    assert all("data" not in tuple(spec) for spec in specs)
    leaf = jax.tree.leaves(state.params)[0]
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(jax.device_get(leaf)))


@pytest.mark.parametrize("kind", ["softmax", pytest.param("sigmoid", marks=pytest.mark.slow)])
def test_fsdp_step_equals_replicated(kind):
    """Same losses and gradients whether params are replicated (data=8) or FSDP-sharded (4 × 2);
    the losses run over the tuple of both batch axes."""
    c = micro_config.get_config(f"kind={kind}")
    batches = [micro_config.random_batch(c, s) for s in range(2)]
    _, hist_a = micro_config.run_steps(c, batches)
    c.mesh.fsdp = 2
    _, hist_b = micro_config.run_steps(c, batches)
    assert_same_run(hist_a, hist_b)
    assert all(np.isfinite(h["loss"]) for h in hist_a)


def test_one_device_equals_eight():
    c = micro_config.get_config()
    batches = [micro_config.random_batch(c, s) for s in range(2)]
    _, eight = micro_config.run_steps(c, batches)
    _, one = micro_config.run_steps(c, batches, devices=jax.devices()[:1])
    assert_same_run(eight, one)
