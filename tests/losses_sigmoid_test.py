"""SigLIP loss, ring and gather: sharded == dense, NumPy reference, parity with open_clip, a hand
case, no NaN; and the ring's memory bound.

The ring holds at most [n, n] blocks per device, whatever the number of devices D. Checked on the
compiled program of value_and_grad (forward and backward) for D = 2, 4, 8: no buffer in the
per-device HLO is larger than n × n elements, and XLA's temporary memory does not grow with D.
The gather implementation, which forms [n, N] logits, is the negative control.
"""

import functools
import re

import jax
import jax.numpy as jnp
import losses_cases as lc
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from conftest import require_peer
from region_medclip import losses

CASES = lc.CASE_GROUPS["sigmoid"]
MEMORY_LOCAL_BATCH = 128
MEMORY_DIM = 16
SHAPE = re.compile(r"\b(?:f32|f16|bf16|pred|s32|u32)\[([\d,]+)\]")


@pytest.fixture(scope="module")
def mesh():
    return lc.make_mesh()


@pytest.mark.parametrize("local_batch", lc.LOCAL_BATCHES)
@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_dense(mesh, case, local_batch):
    lc.check_sharded_equals_dense(mesh, case, local_batch)


@pytest.mark.parametrize("case", lc.with_reference("sigmoid"))
def test_dense_equals_numpy_reference(case):
    lc.check_dense_equals_reference(case)


@pytest.mark.parametrize("case", CASES)
def test_no_nan_with_identical_embeddings(case):
    lc.check_no_nan_with_identical_embeddings(case)


@pytest.mark.parametrize("scale", lc.EXTREME_SCALES)
@pytest.mark.parametrize("case", CASES)
def test_no_nan_at_extreme_logit_scale(case, scale):
    lc.check_no_nan_at_extreme_logit_scale(case, scale)


def test_sigmoid_hand_value():
    z = np.eye(2, lc.DIM, dtype=np.float32)
    # logits = [[t + b, b], [b, t + b]] with t = 2, b = −1: every label·logit is 1, so the loss is
    # 4 log(1 + e^{−1}) / 2.
    loss, _ = lc.jit(losses.sigmoid_contrastive_loss)(
        zimg=z, ztxt=z, logit_scale=2.0, logit_bias=-1.0
    )
    np.testing.assert_allclose(float(loss), 2 * np.log1p(np.exp(-1.0)), rtol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_sigmoid_matches_open_clip_siglip_loss(batch):
    open_clip_loss = require_peer("open_clip.loss")
    zimg, ztxt = lc.parity_inputs(100 + batch, batch)
    logit_scale, logit_bias = np.float32(10.0), np.float32(-10.0)
    theirs = lc.torch_value_and_grads(
        open_clip_loss.SigLipLoss(), zimg, ztxt, logit_scale, logit_bias
    )

    def loss_fn(zimg, ztxt, logit_scale, logit_bias):
        return losses.sigmoid_contrastive_loss(
            zimg=zimg, ztxt=ztxt, logit_scale=logit_scale, logit_bias=logit_bias
        )[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))
    ours = value_and_grad(zimg, ztxt, logit_scale, logit_bias)
    lc.assert_parity(ours, theirs)


# --------------------------------------------------------------------------------------------------
# Memory of the ring.


@functools.cache
def _compiled_step(impl, num_devices):
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))

    def local(zimg, ztxt, logit_scale, logit_bias):
        return losses.sigmoid_contrastive_loss(
            zimg=zimg,
            ztxt=ztxt,
            logit_scale=logit_scale,
            logit_bias=logit_bias,
            axis_name="data",
            impl=impl,
        )[0]

    specs = (P("data"), P("data"), P(), P())
    loss_fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
    embeddings = jax.ShapeDtypeStruct((MEMORY_LOCAL_BATCH * num_devices, MEMORY_DIM), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))
    return step.lower(embeddings, embeddings, scalar, scalar).compile()


def _largest_buffer(compiled):
    """Elements of the largest array shape anywhere in the compiled per-device program."""
    sizes = [
        np.prod([int(d) for d in dims.split(",")]) for dims in SHAPE.findall(compiled.as_text())
    ]
    return max(sizes)


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_ring_never_holds_more_than_an_n_by_n_block(num_devices):
    compiled = _compiled_step("ring", num_devices)
    assert _largest_buffer(compiled) == MEMORY_LOCAL_BATCH * MEMORY_LOCAL_BATCH
    # The negative control: the gather implementation's logits are [n, N].
    gathered = _compiled_step("gather", num_devices)
    assert _largest_buffer(gathered) == MEMORY_LOCAL_BATCH * MEMORY_LOCAL_BATCH * num_devices


def test_ring_temporary_memory_is_flat_in_the_number_of_devices():
    block_bytes = MEMORY_LOCAL_BATCH * MEMORY_LOCAL_BATCH * 4
    ring = {d: _compiled_step("ring", d).memory_analysis().temp_size_in_bytes for d in (2, 4, 8)}
    gather = {
        d: _compiled_step("gather", d).memory_analysis().temp_size_in_bytes for d in (2, 4, 8)
    }
    # Logits and their gradient: two blocks, plus [n, DIM]-sized chunks in flight.
    assert max(ring.values()) <= 2.5 * block_bytes, ring
    assert max(ring.values()) - min(ring.values()) <= 0.1 * block_bytes, ring
    # While the gather implementation grows with D (and so would a ring that kept every block).
    assert gather[8] > 3 * gather[2] and gather[8] > 4 * ring[8], (gather, ring)


def test_varying_axes_reads_this_jax_and_the_older_field(monkeypatch):
    """Inside shard_map a sharded input varies over the mesh axis and a replicated one does not;
    the accessor also reads JAX 0.6–0.9's ``vma`` field, and names the version when neither
    field exists."""
    from region_medclip.losses import collectives

    mesh = lc.make_mesh()
    seen = {}

    def body(sharded, replicated):
        seen["sharded"] = collectives._varying_axes(sharded)
        seen["replicated"] = collectives._varying_axes(replicated)
        return sharded

    jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))(
        jnp.ones((8, 2)), jnp.ones((2,))
    )
    assert seen == {"sharded": frozenset({"data"}), "replicated": frozenset()}

    class OlderAval:  # jax 0.6-0.9: the axes in `vma`, no `mat`
        vma = frozenset({"data"})

    monkeypatch.setattr(jax, "typeof", lambda x: OlderAval())
    assert collectives._varying_axes(jnp.ones(2)) == frozenset({"data"})
    monkeypatch.setattr(jax, "typeof", lambda x: object())
    with pytest.raises(RuntimeError, match=f"jax {jax.__version__}: cannot read"):
        collectives._varying_axes(jnp.ones(2))
