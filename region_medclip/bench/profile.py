"""``python -m region_medclip.bench profile``: where the train step's time goes.

Traces ``--profile_steps`` real train steps of a config (the jitted step of
``region_medclip.train`` on random batches already on the device, so no data wait is in it) with
``jax.profiler``, keeps the trace (``--profile_dir``; open it in Perfetto or TensorBoard) and sums
the device kernels' time:

- by kind — ``matmul`` (dots and convolutions: XLA:CPU's YNNPACK/XNNPACK/oneDNN fusions, GPU
  GEMMs), ``layout`` (copies and transposes XLA inserted to change layouts), ``other``
  (elementwise, reductions, softmax, LayerNorm, ...);
- per kernel, with the model op it comes from (the HLO ``op_name`` metadata), the top ones.

Kernel times are core time: XLA:CPU runs independent kernels, and the parts of a large one, on
several threads at once, so they add up to more than the wall time. ``cores_busy`` is that sum
over the step's wall time: about the number of cores kept busy on average. Far below the
machine's cores means the step waits on the host (dispatch, Python) or on a chain of small
kernels; above them, the runtime had more threads than cores, and kernel times include waits for
a core (the shares stay comparable).
"""

import collections
import glob
import gzip
import json
import os
import re
import shutil
import statistics

import jax

from region_medclip.bench import common
from region_medclip.bench import train as train_bench

# Substrings of kernel names that mark matrix multiplies and convolutions.
_MATMUL = ("dot", "ynn", "xnn", "onednn", "conv", "gemm", "cublas", "cutlass", "matmul", "xmma")
_LAYOUT = ("copy", "transpose")
# Trace events that are not kernels: the executor, the thread pool, Python frames, the runtime.
_NOT_KERNELS = re.compile(
    r"^(\$|Thunk|Slinky|PjitFunction|CommonPjRt|ParseArguments|Handle inputs|Allocate|end: )"
)


def kernel_kind(name: str) -> str:
    """``matmul`` | ``layout`` | ``other`` for a kernel (fusion) name."""
    lowered = name.lower()
    if any(s in lowered for s in _MATMUL):
        return "matmul"
    if any(s in lowered for s in _LAYOUT):
        return "layout"
    return "other"


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name → its ``op_name`` metadata (the model op it comes from)."""
    names = {}
    for line in hlo_text.splitlines():
        match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
        if match:
            names[match.group(1)] = match.group(2)
    return names


def summarise(events: list[dict], steps: int, op_names: dict[str, str], top: int = 15) -> dict:
    """Kernel time per step (ms) by kind and for the ``top`` kernels, from trace events."""
    per_kernel: collections.Counter = collections.Counter()
    kernels = [
        e for e in events if e.get("ph") == "X" and not _NOT_KERNELS.match(e.get("name", ""))
    ]
    # A kernel's own work items may appear as events nested inside it on the same thread:
    # count top-level kernel events only.
    kernels.sort(key=lambda e: (e.get("pid"), e.get("tid"), e.get("ts", 0.0)))
    thread, end = None, float("-inf")
    for event in kernels:
        start, stop = event.get("ts", 0.0), event.get("ts", 0.0) + event.get("dur", 0.0)
        if (event.get("pid"), event.get("tid")) != thread:
            thread, end = (event.get("pid"), event.get("tid")), float("-inf")
        if start < end:
            continue
        end = stop
        per_kernel[event["name"]] += event.get("dur", 0.0)
    by_kind: collections.Counter = collections.Counter()
    for name, micros in per_kernel.items():
        by_kind[kernel_kind(name)] += micros
    total = sum(by_kind.values())
    return dict(
        kernel_ms=round(total / steps / 1e3, 2),
        by_kind_ms={k: round(v / steps / 1e3, 2) for k, v in by_kind.most_common()},
        by_kind_share={k: round(v / max(total, 1e-9), 3) for k, v in by_kind.most_common()},
        top=[
            dict(
                kernel=name,
                kind=kernel_kind(name),
                ms=round(micros / steps / 1e3, 2),
                op=op_names.get(name, ""),
            )
            for name, micros in per_kernel.most_common(top)
        ],
    )


def read_trace(trace_dir: str) -> tuple[str, list[dict]]:
    """The perfetto trace ``jax.profiler`` wrote under ``trace_dir``: its path and its events."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"{trace_dir}: the profiler wrote no perfetto trace")
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    return files[0], trace["traceEvents"] if isinstance(trace, dict) else trace


def profile_step(config, *, steps: int, trace_dir: str, device: jax.Device) -> dict:
    """Compiles the train step of ``config`` on ``device``, times ``steps`` steps, traces
    ``steps`` more into ``trace_dir`` and returns the wall time and the kernel summary."""
    compiled, state, batch = train_bench.compile_step(config, device)
    op_names = hlo_op_names(compiled.as_text())
    _, state = train_bench.time_steps(compiled, state, batch, 2)  # warm-up
    times, state = train_bench.time_steps(compiled, state, batch, steps)
    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        train_bench.time_steps(compiled, state, batch, steps)
    trace_file, events = read_trace(trace_dir)
    summary = summarise(events, steps, op_names)
    step_ms = statistics.median(times) * 1e3
    return dict(
        step_ms=round(step_ms, 2),
        cores_busy=round(summary["kernel_ms"] / step_ms, 2),
        trace=trace_file,
        **summary,
    )


def run(args) -> tuple[dict, str]:
    """The profile of one config (``--profile_config``): (the profile for the JSON, a markdown
    report with a table by kind and one of the top kernels)."""
    name = args.profile_config
    (config,) = common.load_cases(args, [name], "--profile_config").values()
    if args.profile_batch:
        config.data.batch_size = args.profile_batch
    device = jax.devices()[0]
    result = profile_step(
        config, steps=args.profile_steps, trace_dir=args.profile_dir, device=device
    )
    result.update(config=name, batch=config.data.batch_size, device=str(device))
    shares = result["by_kind_share"]
    kinds = [dict(kind=k, ms=v, share=shares[k]) for k, v in result["by_kind_ms"].items()]
    header = (
        f"{name} batch {result['batch']} on {device}: step {result['step_ms']} ms, kernels "
        f"{result['kernel_ms']} core-ms (cores busy {result['cores_busy']}); trace: "
        f"{result['trace']}\n"
    )
    report = header + common.markdown(kinds, ["kind", "ms", "share"]) + "\n"
    report += common.markdown(result["top"], ["kernel", "kind", "ms", "op"])
    return result, report
