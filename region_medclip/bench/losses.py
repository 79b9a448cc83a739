"""``python -m region_medclip.bench losses``: time and peak memory of the global losses.

Measures one forward + backward pass of the global losses, sharded over 8 simulated CPU
devices, as the global batch grows (at D = 8) and as the number of devices D grows (at a fixed
local batch): softmax (all-gather), sigmoid ring (ppermute) and sigmoid gather. Peak memory per
device is read from the compiled per-device program (arguments + outputs + temporaries), so it
is measured even where the run would not fit in this machine's memory; such sizes are compiled
but not timed.
"""

import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from region_medclip import losses
from region_medclip.bench import common

MIB = 2**20


def _softmax(zimg, ztxt, logit_scale, logit_bias, axis_name):
    """The softmax loss on local shards zimg, ztxt [n, d] (it all-gathers the other side)."""
    del logit_bias  # softmax has none
    return losses.softmax_contrastive_loss(
        zimg=zimg, ztxt=ztxt, logit_scale=logit_scale, axis_name=axis_name
    )[0]


def _sigmoid(zimg, ztxt, logit_scale, logit_bias, axis_name, impl):
    """The sigmoid loss on local shards zimg, ztxt [n, d], ``impl`` "ring" or "gather"."""
    return losses.sigmoid_contrastive_loss(
        zimg=zimg,
        ztxt=ztxt,
        logit_scale=logit_scale,
        logit_bias=logit_bias,
        axis_name=axis_name,
        impl=impl,
    )[0]


# Each takes (zimg [n, d], ztxt [n, d], logit_scale, logit_bias, axis_name): the local shards.
GLOBAL_LOSS_FNS = {
    "softmax (gather)": _softmax,
    "sigmoid ring": functools.partial(_sigmoid, impl="ring"),
    "sigmoid gather": functools.partial(_sigmoid, impl="gather"),
}


def _compile_loss_step(loss_fn, num_devices, global_batch, dim):
    """jit(value_and_grad) of the sharded loss over the first `num_devices` devices, compiled
    for embeddings [global_batch, dim] float32."""
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
    sharded = jax.shard_map(
        functools.partial(loss_fn, axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P(), P()),
        out_specs=P(),
    )
    step = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))
    embeddings = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return step.lower(embeddings, embeddings, scalar, scalar).compile(), mesh


def _inputs(mesh, global_batch, dim, seed=0):
    """Unit-norm random embeddings [global_batch, dim], sharded over `mesh`, and the scalars."""
    rng = np.random.default_rng(seed)
    sharding = NamedSharding(mesh, P("data"))
    embeddings = []
    for _ in range(2):
        z = rng.normal(size=(global_batch, dim)).astype(np.float32)
        embeddings.append(jax.device_put(z / np.linalg.norm(z, axis=-1, keepdims=True), sharding))
    return (*embeddings, jnp.float32(10.0), jnp.float32(-10.0))


def _median_ms(compiled, args, repeats):
    """Median wall ms of ``compiled(*args)`` over ``repeats`` runs, after one warm-up run."""
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(name, *, num_devices, global_batch, dim, time_it, repeats):
    """One row: peak and temporary MiB per device of loss `name`, and its median step ms where
    ``time_it(total bytes over all devices)`` allows a run (None otherwise)."""
    compiled, mesh = _compile_loss_step(GLOBAL_LOSS_FNS[name], num_devices, global_batch, dim)
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    row = dict(
        loss=name,
        devices=num_devices,
        global_batch=global_batch,
        local_batch=global_batch // num_devices,
        peak_mib_per_device=peak / MIB,
        temp_mib_per_device=memory.temp_size_in_bytes / MIB,
        step_ms=None,
    )
    if time_it(peak * num_devices):
        row["step_ms"] = _median_ms(compiled, _inputs(mesh, global_batch, dim), repeats)
    return row


def _pivot(rows, key):
    """One line per `key` value, one (ms, MiB) column pair per loss."""
    table = {}
    for row in rows:
        line = table.setdefault(row[key], {key: row[key]})
        line[f"{row['loss']} ms"] = row["step_ms"]
        line[f"{row['loss']} MiB"] = row["peak_mib_per_device"]
    columns = [key] + [f"{name} {unit}" for name in GLOBAL_LOSS_FNS for unit in ("ms", "MiB")]
    return common.markdown(list(table.values()), columns)


def _sweeps(args):
    """The batch sweep (D = 8) and the device sweep (fixed local batch): lists of rows, each
    printed as JSON as it is measured; a point in both sweeps is measured once."""
    measured = {}

    def point(name, num_devices, global_batch):
        key = (name, num_devices, global_batch)
        if key not in measured:  # D = 8 at local batch n is also a point of the batch sweep
            timed = global_batch <= args.max_timed_batch
            measured[key] = measure(
                name,
                num_devices=num_devices,
                global_batch=global_batch,
                dim=args.dim,
                repeats=args.repeats,
                time_it=lambda total_bytes: timed and total_bytes <= args.max_host_gib * 2**30,
            )
            print(json.dumps(measured[key]), flush=True)
        return measured[key]

    by_batch = [point(name, 8, batch) for batch in args.global_batches for name in GLOBAL_LOSS_FNS]
    by_devices = [
        point(name, d, d * args.local_batch) for d in (1, 2, 4, 8) for name in GLOBAL_LOSS_FNS
    ]
    return by_batch, by_devices


def _machine(num_devices):
    """The machine and JAX the sweeps ran on."""
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=f"{num_devices} x {jax.devices()[0].device_kind}",
    )


def run(args) -> tuple[dict, str]:
    """Time and peak memory per device of the global losses, forward + backward: (results for
    the JSON, the markdown report)."""
    num_devices = jax.device_count()
    if num_devices < 8:
        raise SystemExit(
            f"bench losses needs 8 devices, JAX sees {num_devices}: run it as "
            "`python -m region_medclip.bench losses` (which simulates 8 CPU devices) or set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts"
        )
    by_batch, by_devices = _sweeps(args)
    header = (
        f"Losses, forward + backward, embedding dim {args.dim}, float32, on {num_devices} "
        f"simulated {jax.default_backend()} devices sharing {os.cpu_count()} cores "
        f"(jax {jax.__version__}). Time: median of {args.repeats} steps of the whole D-device "
        "program; memory: XLA's peak per device (arguments + outputs + temporaries). 'not run': "
        f"compiled only (global batch > {args.max_timed_batch:,} or > {args.max_host_gib} GiB "
        "in all)."
    )
    report = "\n\n".join(
        [
            header,
            "By global batch (D = 8):",
            _pivot(by_batch, "global_batch"),
            f"By number of devices D (local batch {args.local_batch}):",
            _pivot(by_devices, "devices"),
        ]
    )
    results = dict(
        machine=_machine(num_devices), dim=args.dim, by_global_batch=by_batch, by_devices=by_devices
    )
    return results, report
