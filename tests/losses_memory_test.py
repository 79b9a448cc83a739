"""The ring sigmoid loss holds at most [n, n] blocks per device, whatever the number of devices D.

Checked on the compiled program of value_and_grad (forward and backward) for D = 2, 4, 8: no
buffer in the per-device HLO is larger than n × n elements, and XLA's temporary memory does not
grow with D. The gather implementation, which forms [n, N] logits, is the negative control.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from region_medclip import losses

LOCAL_BATCH = 128
DIM = 16
SHAPE = re.compile(r"\b(?:f32|f16|bf16|pred|s32|u32)\[([\d,]+)\]")


@functools.cache
def _compiled(impl, num_devices):
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
    embeddings = jax.ShapeDtypeStruct((LOCAL_BATCH * num_devices, DIM), jnp.float32)
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
    compiled = _compiled("ring", num_devices)
    assert _largest_buffer(compiled) == LOCAL_BATCH * LOCAL_BATCH
    # The negative control: the gather implementation's logits are [n, N].
    gathered = _compiled("gather", num_devices)
    assert _largest_buffer(gathered) == LOCAL_BATCH * LOCAL_BATCH * num_devices


def test_ring_temporary_memory_is_flat_in_the_number_of_devices():
    block_bytes = LOCAL_BATCH * LOCAL_BATCH * 4
    ring = {d: _compiled("ring", d).memory_analysis().temp_size_in_bytes for d in (2, 4, 8)}
    gather = {d: _compiled("gather", d).memory_analysis().temp_size_in_bytes for d in (2, 4, 8)}
    # Logits and their gradient: two blocks, plus [n, DIM]-sized chunks in flight.
    assert max(ring.values()) <= 2.5 * block_bytes, ring
    assert max(ring.values()) - min(ring.values()) <= 0.1 * block_bytes, ring
    # While the gather implementation grows with D (and so would a ring that kept every block).
    assert gather[8] > 3 * gather[2] and gather[8] > 4 * ring[8], (gather, ring)
