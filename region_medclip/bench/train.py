"""``python -m region_medclip.bench train``: train-step throughput and model FLOPs utilisation.

For each config the full jitted train step (forward, backward, optimizer) runs on random batches
with the config's shapes on one device. Model FLOPs are XLA's count for the compiled step; MFU is
FLOPs / step time over the peak matmul throughput measured in the same run on the same device
(float32, or the config's compute dtype).
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp

from region_medclip import sharding as sharding_lib
from region_medclip import train
from region_medclip.bench import common
from region_medclip.data import schema


def compiled_flops(compiled) -> float:
    """XLA's FLOP count of a compiled program (0 when the backend reports none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def compile_step(config, device: jax.Device):
    """The train step of ``config`` on a one-device mesh, compiled, with a fresh state and one
    random batch (``config.data.batch_size`` examples) already on ``device``:
    ``(compiled, state, batch)``; ``compiled(state, batch, {})`` returns ``(state, metrics)``."""
    mesh = sharding_lib.make_mesh(config.mesh, [device])
    run_setup = train.setup(config, mesh)
    state = run_setup.init_state(0)
    step = run_setup.train_step(config, mesh)
    batch = jax.device_put(
        schema.random_batch(config.data, config.data.batch_size),
        sharding_lib.batch_sharding(mesh),
    )
    return step.lower(state, batch, {}).compile(), state, batch


def time_steps(compiled, state, batch, steps: int):
    """Wall seconds of each of ``steps`` steps (metrics awaited) and the final state."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, {})
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times, state


def measure_step(config, *, steps: int, device: jax.Device) -> dict:
    """Compiles and times ``steps`` train steps of ``config`` on ``device``: compile and median
    step seconds, examples/s, GFLOP a step and achieved GFLOP/s."""
    start = time.perf_counter()
    compiled, state, batch = compile_step(config, device)
    compile_s = time.perf_counter() - start
    flops = compiled_flops(compiled)
    _, state = time_steps(compiled, state, batch, 1)  # warm-up
    times, _ = time_steps(compiled, state, batch, steps)
    step_s = statistics.median(times)
    return dict(
        compile_s=round(compile_s, 1),
        step_s=round(step_s, 4),
        examples_per_s=round(config.data.batch_size / step_s, 2),
        step_gflop=round(flops / 1e9, 2),
        achieved_gflops=round(flops / step_s / 1e9, 2),
    )


def run(args) -> tuple[dict, str]:
    """Rows for the tiny and ViT-B/16 (``runlocal``) configs (``--train_configs``) at their batch
    sizes: (results for the JSON, the markdown report)."""
    configs = common.load_cases(args, args.train_configs, "--train_configs")
    device = jax.devices()[0]
    rows, peaks = [], {}
    for name, config in configs.items():
        dtype = jnp.dtype(config.model.dtype)
        if dtype not in peaks:
            peaks[dtype] = common.matmul_peak(device, dtype)
        row = dict(config=name, batch=config.data.batch_size, dtype=str(dtype))
        row.update(measure_step(config, steps=args.train_steps, device=device))
        row["peak_gflops"] = round(peaks[dtype] / 1e9, 1)
        row["mfu_%"] = round(100 * row["achieved_gflops"] * 1e9 / peaks[dtype], 1)
        rows.append(row)
        print(row, flush=True)
    columns = ["config", "batch", "dtype", "step_s", "examples_per_s", "step_gflop"]
    columns += ["achieved_gflops", "peak_gflops", "mfu_%", "compile_s"]
    machine = dict(device=str(device), platform=device.platform, cpus=os.cpu_count())
    return dict(machine=machine, rows=rows), common.markdown(rows, columns)
