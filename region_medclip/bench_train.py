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
from region_medclip.data import pipeline


def matmul_peak(device: jax.Device, dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a chain of ``size``² matmuls on ``device`` (the peak MFU is measured
    against)."""
    x = jax.device_put(jnp.ones((size, size), dtype) / size, device)
    chain = 8

    @jax.jit
    def run(a):
        for _ in range(chain):
            a = a @ x
        return a

    run(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 * chain / min(times)


def compiled_flops(compiled) -> float:
    """XLA's FLOP count of a compiled program (0 when the backend reports none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def measure_step(config, *, steps: int, device: jax.Device) -> dict:
    """Compiles and times ``steps`` train steps of ``config`` on ``device``."""
    mesh = sharding_lib.make_mesh(config.mesh, [device])
    run = train.setup(config, mesh)
    state = run.init_state(0)
    step = run.train_step(config, mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    batch = jax.device_put(
        pipeline.random_batch(config.data, config.data.batch_size), batch_sharding
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch, {}).compile()
    compile_s = time.perf_counter() - start
    flops = compiled_flops(compiled)
    state, metrics = compiled(state, batch, {})  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, {})
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return dict(
        compile_s=round(compile_s, 1),
        step_s=round(step_s, 4),
        examples_per_s=round(config.data.batch_size / step_s, 2),
        step_gflop=round(flops / 1e9, 2),
        achieved_gflops=round(flops / step_s / 1e9, 2),
    )


def bench_train(args, markdown) -> tuple[dict, str]:
    """Rows for the tiny and ViT-B/16 (``runlocal``) configs at their batch sizes."""
    from configs import tiny_roi, vitb16_roi

    device = jax.devices()[0]
    configs = {
        "tiny_roi": tiny_roi.get_config(),
        "vitb16_roi:runlocal": vitb16_roi.get_config("runlocal"),
    }
    rows = []
    peaks = {}
    for name, config in configs.items():
        if args.train_configs and name not in args.train_configs:
            continue
        dtype = jnp.dtype(config.model.dtype)
        if dtype not in peaks:
            peaks[dtype] = matmul_peak(device, dtype)
        row = dict(config=name, batch=config.data.batch_size, dtype=str(dtype))
        row.update(measure_step(config, steps=args.train_steps, device=device))
        row["peak_gflops"] = round(peaks[dtype] / 1e9, 1)
        row["mfu_%"] = round(100 * row["achieved_gflops"] * 1e9 / peaks[dtype], 1)
        rows.append(row)
        print(row, flush=True)
    columns = ["config", "batch", "dtype", "step_s", "examples_per_s", "step_gflop"]
    columns += ["achieved_gflops", "peak_gflops", "mfu_%", "compile_s"]
    machine = dict(device=str(device), platform=device.platform, cpus=os.cpu_count())
    return dict(machine=machine, rows=rows), markdown(rows, columns)
