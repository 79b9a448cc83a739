"""``python -m region_medclip.bench gpu [--out=JSON]``: one accelerator's figures in one process.

What a user with a GPU runs to see what this codebase does on it, in a few minutes:

1. ``peak``: the device's bfloat16 matrix-multiply peak (a chain of ``--gpu_matmul_size``²
   products), which MFU is read against.
2. ``steps``: the ViT-B/16 train step of ``configs/vitb16_roi.py`` (CLIP text tower) with
   bfloat16 compute and float32 params, region-aware and global-only, at ``--gpu_batch`` per
   device or the largest power-of-two fraction of it that fits: examples/s, XLA's FLOPs, MFU
   and where the memory goes (params, optimizer state, batch, temporaries).
3. ``attention``: the region-aware step with ``model.attention`` ``xla`` and ``cudnn`` (cuDNN's
   fused attention).
4. ``open_clip``: open_clip's ViT-B-16 CLIP with the same towers (``bench compare``'s
   :func:`~region_medclip.bench.compare.open_clip_model`), its ``ClipLoss`` and AdamW under
   ``torch.autocast`` bfloat16 at the same batch; the global-only step's examples/s over it.
5. ``losses``: softmax, sigmoid ring and sigmoid gather, forward and backward, at global batch
   ``--gpu_loss_batch`` over every local device: time and XLA's peak memory per device.

Only JAX, flax, optax, orbax and ml_collections are needed on this path (grain, TFDS and
array_record are not imported); open_clip and torch are optional and their row says so when
they are missing. A section that would start after ``--gpu_budget_s`` is reported as not run.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from region_medclip.bench import common, compare
from region_medclip.bench import losses as losses_bench
from region_medclip.bench import train as train_bench

MIB = 2**20


def step_config(args, *, attention: str = "xla", region: bool = True):
    """``vitb16_roi.py`` (CLIP text) from ``--configs_dir`` with bfloat16 compute, float32 params,
    ``attention`` and, unless ``region``, the global loss alone (``bench compare``'s)."""
    config = common.load_config(args.configs_dir, "vitb16_roi.py")
    config.model.update(dtype="bfloat16", param_dtype="float32", attention=attention)
    config.mesh.update(data=-1, fsdp=1)  # one device
    return config if region else compare.global_only(config)


def _tree_mib(tree) -> float:
    """MiB of every array (or shape) leaf of ``tree``."""
    leaves = jax.tree.leaves(tree)
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves) / MIB


def memory_breakdown(compiled, state, batch) -> dict:
    """Where the step's memory goes, from XLA's analysis of the compiled program: params,
    optimizer state and batch (its arguments), temporaries (activations, gradients, workspace),
    outputs not aliased to arguments, code; and the peak, in MiB."""
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return dict(
        params_mib=round(_tree_mib(state.params), 1),
        opt_state_mib=round(_tree_mib(state.opt_state), 1),
        batch_mib=round(_tree_mib(batch), 1),
        temp_mib=round(memory.temp_size_in_bytes / MIB, 1),
        unaliased_out_mib=round(
            (memory.output_size_in_bytes - memory.alias_size_in_bytes) / MIB, 1
        ),
        code_mib=round(memory.generated_code_size_in_bytes / MIB, 1),
        peak_mib=round(peak / MIB, 1),
    )


def _memory_limit(device) -> int | None:
    """Bytes the device's allocator may hand out (None where the backend does not say)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def _too_big(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def fitting_step(config, batch: int, device, *, steps: int, min_batch: int = 1) -> dict:
    """The step of ``config`` timed at ``batch`` examples, or at the largest ``batch / 2^k``
    (not below ``min_batch``) whose compiled peak fits the device and that runs: its row with
    ``batch``, the measured figures and :func:`memory_breakdown`.

    Raises:
      RuntimeError: not even ``min_batch`` fits (the message gives the last error).
    """
    limit, last_error = _memory_limit(device), None
    while batch >= min_batch:
        config.data.batch_size = batch
        try:
            compiled, state, inputs = train_bench.compile_step(config, device)
            memory = memory_breakdown(compiled, state, inputs)
            if limit and memory["peak_mib"] * MIB > limit:
                raise MemoryError(f"RESOURCE_EXHAUSTED: needs {memory['peak_mib']:.0f} MiB")
            _, state = train_bench.time_steps(compiled, state, inputs, 1)  # warm-up
            times, _ = train_bench.time_steps(compiled, state, inputs, steps)
        except Exception as err:  # noqa: BLE001 - only an out-of-memory error is retried
            if not _too_big(err):
                raise
            last_error, batch = err, batch // 2
            continue
        step_s = float(np.median(times))
        flops = train_bench.compiled_flops(compiled)
        return dict(
            batch=batch,
            step_ms=round(1e3 * step_s, 2),
            examples_per_s=round(batch / step_s, 1),
            step_gflop=round(flops / 1e9, 1),
            achieved_tflops=round(flops / step_s / 1e12, 3),
            **memory,
        )
    raise RuntimeError(f"no batch of at least {min_batch} fits: {last_error}")


def measure_steps(args, device, peak: float) -> list[dict]:
    """Rows of the region-aware and global-only steps (XLA attention), then of the region-aware
    step with cuDNN's fused attention, each with its MFU against ``peak``."""
    cases = (("region-aware", True, "xla"), ("global-only", False, "xla"))
    cases += (("region-aware", True, "cudnn"),)
    rows = []
    for name, region, attention in cases:
        row = dict(step=name, attention=attention)
        config = step_config(args, attention=attention, region=region)
        batch = rows[0]["batch"] if rows and "batch" in rows[0] else args.gpu_batch
        try:
            row.update(fitting_step(config, batch, device, steps=args.train_steps))
            row["mfu_%"] = round(100 * row["achieved_tflops"] * 1e12 / peak, 1)
        except Exception as err:  # noqa: BLE001 - cuDNN's kernel may refuse a shape or device
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        rows.append(row)
        print(row, flush=True)
    return rows


def open_clip_step(config, batch: int, *, steps: int) -> dict:
    """examples/s of open_clip's train step (forward, ``ClipLoss``, backward, AdamW) with the
    towers of ``config`` at ``batch``, under ``torch.autocast`` bfloat16 on the GPU (the CPU
    where torch sees none); ``{"error": why}`` where torch or open_clip is missing."""
    try:
        import open_clip
        import torch
    except ImportError as err:
        return dict(error=f"not run: {err.name} is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = compare.open_clip_model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2)
    loss_fn = open_clip.loss.ClipLoss()
    size, vocab = config.data.image_size, model.vocab_size
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(1, vocab - 1, (batch, config.data.text_len), device=device)
    texts[:, -1] = vocab - 1  # an end-of-text token (the highest id) to pool at

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = loss_fn(*model(images, texts))
        loss.backward()
        optimizer.step()
        return loss.item()  # waits for the device

    step()  # warm-up: allocator, kernel selection
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return dict(
        batch=batch, device=device, step_ms=round(1e3 * step_s, 2), examples_per_s=batch / step_s
    )


def measure_losses(args) -> list[dict]:
    """Forward + backward of each global loss at ``--gpu_loss_batch`` over every local device
    (``bench losses``' measurement): ms and peak MiB per device."""
    rows = []
    for name in losses_bench.GLOBAL_LOSS_FNS:
        row = losses_bench.measure(
            name,
            num_devices=jax.local_device_count(),
            global_batch=args.gpu_loss_batch,
            dim=args.gpu_loss_dim,
            time_it=lambda total_bytes: True,
            repeats=args.repeats,
        )
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        print(rows[-1], flush=True)
    return rows


def _budgeted(sections, budget_s: float) -> dict:
    """Runs ``(name, fn)`` in order; one that would start after ``budget_s`` is not run."""
    start, results = time.perf_counter(), {}
    for name, fn in sections:
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            results[name] = dict(error=f"not run: the {budget_s:.0f}-s budget was spent")
            continue
        results[name] = fn()
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def _machine(device) -> dict:
    """The device, the host and the versions the figures came from."""
    import flax

    return dict(
        device=device.device_kind,
        platform=device.platform,
        local_devices=jax.local_device_count(),
        host=common.cpu_model(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        flax=flax.__version__,
        date=time.strftime("%Y-%m-%d"),
    )


def run(args) -> tuple[dict, str]:
    """Every section in one process: (results for the JSON, the markdown report)."""
    device = jax.devices()[0]
    peak = common.matmul_peak(device, jnp.bfloat16, size=args.gpu_matmul_size)
    results = dict(machine=_machine(device), bf16_peak_tflops=round(peak / 1e12, 2))
    print(results, flush=True)
    state = {}

    def steps():
        state["steps"] = measure_steps(args, device, peak)
        return state["steps"]

    def theirs():
        ours = next((r for r in state.get("steps", []) if r["step"] == "global-only"), {})
        batch = ours.get("batch", args.gpu_batch)
        row = open_clip_step(step_config(args, region=False), batch, steps=args.train_steps)
        if "examples_per_s" in row and "examples_per_s" in ours:
            row["global_only_over_open_clip"] = round(
                ours["examples_per_s"] / row["examples_per_s"], 2
            )
        return row

    sections = (("steps", steps), ("open_clip", theirs), ("losses", lambda: measure_losses(args)))
    results.update(_budgeted(sections, args.gpu_budget_s))
    return results, report(results)


def report(results: dict) -> str:
    """The markdown report of :func:`run`'s results."""
    lines = [f"{results['machine']}", f"bf16 matmul peak: {results['bf16_peak_tflops']} TFLOP/s"]
    step_cols = ["step", "attention", "batch", "step_ms", "examples_per_s", "step_gflop"]
    step_cols += ["achieved_tflops", "mfu_%", "params_mib", "opt_state_mib", "batch_mib"]
    step_cols += ["temp_mib", "peak_mib", "error"]
    for name, columns in (
        ("steps", step_cols),
        ("losses", ["loss", "devices", "global_batch", "step_ms", "peak_mib_per_device"]),
    ):
        rows = results.get(name)
        if isinstance(rows, list):
            table = [{c: row.get(c, "") for c in columns} for row in rows]
            lines.append(common.markdown(table, columns))
        else:
            lines.append(f"{name}: {rows}")
    lines.append(f"open_clip: {results.get('open_clip')}")
    lines.append(f"seconds: {results.get('seconds')}")
    return "\n\n".join(lines)
