"""Benchmarks, not tests: `python -m region_medclip.bench losses|data|train|compare|profile
[--out=JSON]`.

`losses` measures the time of one forward + backward pass and XLA's peak memory per device of the
global losses on 8 simulated CPU devices, as the global batch grows (at D = 8) and as the number of
devices D grows (at a fixed local batch): softmax (all-gather), sigmoid ring (ppermute) and
sigmoid gather. Peak memory per device is read from the compiled per-device program
(arguments + outputs + temporaries), so it is measured even where the run would not fit in this
machine's memory; such sizes are compiled but not timed.

`data` measures the train pipeline's examples/s; `train` the train step's examples/s and MFU
(bench_train.py); `compare` the same CLIP train step in open_clip and here, examples/s of each,
their ratio and our MFU (bench_compare.py); `profile` where one config's train step spends its
time, kernel by kernel, from a jax.profiler trace (bench_profile.py).
"""

import os

if __name__ == "__main__":
    # Simulated devices must be requested before JAX starts its CPU backend.
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from region_medclip import losses  # noqa: E402

MIB = 2**20


def _softmax(zimg, ztxt, logit_scale, logit_bias, axis_name):
    del logit_bias  # softmax has none
    return losses.softmax_contrastive_loss(
        zimg=zimg, ztxt=ztxt, logit_scale=logit_scale, axis_name=axis_name
    )[0]


def _sigmoid(zimg, ztxt, logit_scale, logit_bias, axis_name, impl):
    return losses.sigmoid_contrastive_loss(
        zimg=zimg,
        ztxt=ztxt,
        logit_scale=logit_scale,
        logit_bias=logit_bias,
        axis_name=axis_name,
        impl=impl,
    )[0]


GLOBAL_LOSS_FNS = {
    "softmax (gather)": _softmax,
    "sigmoid ring": functools.partial(_sigmoid, impl="ring"),
    "sigmoid gather": functools.partial(_sigmoid, impl="gather"),
}


def _compile_loss_step(loss_fn, num_devices, global_batch, dim):
    """jit(value_and_grad) of the sharded loss over the first `num_devices` devices, compiled."""
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
    rng = np.random.default_rng(seed)
    sharding = NamedSharding(mesh, P("data"))
    embeddings = []
    for _ in range(2):
        z = rng.normal(size=(global_batch, dim)).astype(np.float32)
        embeddings.append(jax.device_put(z / np.linalg.norm(z, axis=-1, keepdims=True), sharding))
    return (*embeddings, jnp.float32(10.0), jnp.float32(-10.0))


def _measure(name, *, num_devices, global_batch, dim, time_it, repeats):
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
        args = _inputs(mesh, global_batch, dim)
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        row["step_ms"] = 1e3 * statistics.median(times)
    return row


def _markdown(rows, columns):
    def cell(value):
        if value is None:
            return "not run"
        if isinstance(value, float):
            # Ratios and fractions (ratio, mfu) need their digits; rates and times one decimal.
            return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _pivot(rows, key):
    """One line per `key` value, one (ms, MiB) column pair per loss."""
    table = {}
    for row in rows:
        line = table.setdefault(row[key], {key: row[key]})
        line[f"{row['loss']} ms"] = row["step_ms"]
        line[f"{row['loss']} MiB"] = row["peak_mib_per_device"]
    columns = [key] + [f"{name} {unit}" for name in GLOBAL_LOSS_FNS for unit in ("ms", "MiB")]
    return _markdown(list(table.values()), columns)


def bench_losses(args):
    """Time and peak memory per device of the global losses, forward + backward."""
    num_devices = jax.device_count()
    if num_devices < 8:
        raise SystemExit(
            f"bench losses needs 8 devices, JAX sees {num_devices}: run it as "
            "`python -m region_medclip.bench losses` (which simulates 8 CPU devices) or set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts"
        )

    measured = {}

    def measure(name, num_devices, global_batch):
        key = (name, num_devices, global_batch)
        if key not in measured:  # D = 8 at local batch n is also a point of the batch sweep
            timed = global_batch <= args.max_timed_batch
            measured[key] = _measure(
                name,
                num_devices=num_devices,
                global_batch=global_batch,
                dim=args.dim,
                repeats=args.repeats,
                time_it=lambda total_bytes: timed and total_bytes <= args.max_host_gib * 2**30,
            )
            print(json.dumps(measured[key]), flush=True)
        return measured[key]

    by_batch = [
        measure(name, 8, batch) for batch in args.global_batches for name in GLOBAL_LOSS_FNS
    ]
    by_devices = [
        measure(name, d, d * args.local_batch) for d in (1, 2, 4, 8) for name in GLOBAL_LOSS_FNS
    ]
    machine = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=f"{num_devices} x {jax.devices()[0].device_kind}",
    )
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
    results = dict(machine=machine, dim=args.dim, by_global_batch=by_batch, by_devices=by_devices)
    return results, report


def bench_data(args):
    """Examples/s of the train pipeline (decode, resize, augment, tokenize, batch) on synth_cxr
    films at 128 and 224 px, in-process and with worker processes."""
    from configs import tiny_roi
    from region_medclip.data import pipeline, synth

    rows, batch_size = [], 32
    for size in (128, 224):
        records = [synth.render_record(i, size=size) for i in range(128)]
        for workers in (0, 2):
            config = tiny_roi.get_config()
            config.data.image_size, config.data.workers = size, workers
            ds = pipeline.make_dataset(
                config.data,
                split="train",
                train=True,
                seed=0,
                batch_size=batch_size,
                records=records,
            )
            it = pipeline.BatchIterator(ds)
            for _ in range(3):  # warm-up: worker start-up and tokenizer training
                next(it)
            start = time.perf_counter()
            for _ in range(args.data_batches):
                next(it)
            rate = args.data_batches * batch_size / (time.perf_counter() - start)
            rows.append(dict(size=size, workers=workers, examples_per_s=round(rate, 1)))
    machine = dict(platform=platform.platform(), cpus=os.cpu_count())
    report = _markdown(rows, ["size", "workers", "examples_per_s"])
    return dict(machine=machine, rows=rows), report


def bench_train(args):
    """Train-step examples/s and MFU of the tiny and ViT-B/16 configs (bench_train.py)."""
    from region_medclip import bench_train as bench_train_lib

    return bench_train_lib.bench_train(args, _markdown)


def bench_compare(args):
    """examples/s of the same CLIP step in region-medclip and open_clip, their ratio and our MFU
    (bench_compare.py), for the tiny and ViT-B/16 configs."""
    import jax

    from configs import tiny_roi, vitb16_roi
    from region_medclip import bench_compare as compare_lib
    from region_medclip import bench_train as bench_train_lib

    # open_clip's architecture on both sides: the tiny recipe's towers at its sizes, with the CLIP
    # text tower, the linear patch embedding and the class-token pooling of open_clip's CLIP.
    tiny = tiny_roi.get_config("text=clip")
    tiny.model.image.pool = "cls"
    tiny.model.image.stem = "patch"
    cases = {"tiny_roi": tiny, "vitb16_roi:runlocal": vitb16_roi.get_config("runlocal")}
    names = args.compare_cases or list(cases)
    unknown = set(names) - set(cases)
    if unknown:
        raise SystemExit(f"--compare_cases: unknown {sorted(unknown)}; known {list(cases)}")
    peak = bench_train_lib.matmul_peak(jax.devices()[0])
    rows = []
    for name in names:
        config = cases[name]
        if args.compare_batch:
            config.data.batch_size = args.compare_batch
        rows.append(compare_lib.compare_case(name, config, steps=args.train_steps, peak=peak))
        print(rows[-1], flush=True)
    columns = ["case", "batch", "region_medclip_examples_per_s", "open_clip_examples_per_s"]
    columns += ["ratio", "mfu", "region_aware_examples_per_s", "params_region_medclip"]
    columns += ["params_open_clip"]
    machine = dict(
        platform=platform.platform(),
        processor=_cpu_model(),
        cpus=os.cpu_count(),
        peak_gflops=round(peak / 1e9, 1),
    )
    report = f"{machine}\n" + _markdown(rows, columns)
    return dict(machine=machine, rows=rows), report


def bench_profile(args):
    """Kernel time of one config's train step by kind and per kernel (bench_profile.py)."""
    from region_medclip import bench_profile as bench_profile_lib

    return bench_profile_lib.bench_profile(args, _markdown)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


SUBCOMMANDS = {
    "losses": bench_losses,
    "data": bench_data,
    "train": bench_train,
    "compare": bench_compare,
    "profile": bench_profile,
}


def _parser():
    parser = argparse.ArgumentParser(prog="python -m region_medclip.bench", description=__doc__)
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS))
    parser.add_argument("--out", help="write the results (and the machine) as JSON here")
    losses_args = parser.add_argument_group("losses")
    losses_args.add_argument("--dim", type=int, default=64, help="embedding dimension")
    losses_args.add_argument(
        "--global_batches",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
    )
    losses_args.add_argument("--local_batch", type=int, default=2048, help="for the D sweep")
    losses_args.add_argument("--repeats", type=int, default=3)
    losses_args.add_argument(
        "--max_timed_batch", type=int, default=16384, help="larger batches: memory only"
    )
    losses_args.add_argument(
        "--max_host_gib", type=float, default=6.0, help="skip timing above this total memory"
    )
    data_args = parser.add_argument_group("data")
    data_args.add_argument("--data_batches", type=int, default=20, help="timed batches of 32")
    train_args = parser.add_argument_group("train")
    train_args.add_argument("--train_steps", type=int, default=5, help="timed steps per config")
    train_args.add_argument(
        "--train_configs",
        type=lambda s: s.split(","),
        default=None,
        help="subset of: tiny_roi, vitb16_roi:runlocal",
    )
    compare_args = parser.add_argument_group("compare")
    compare_args.add_argument(
        "--compare_cases",
        type=lambda s: s.split(","),
        default=None,
        help="subset of: tiny_roi, vitb16_roi:runlocal",
    )
    compare_args.add_argument("--compare_batch", type=int, default=0, help="0: the config's")
    profile_args = parser.add_argument_group("profile")
    profile_args.add_argument(
        "--profile_config", default="tiny_roi", help="tiny_roi or vitb16_roi:runlocal"
    )
    profile_args.add_argument("--profile_batch", type=int, default=0, help="0: the config's")
    profile_args.add_argument("--profile_steps", type=int, default=3, help="traced steps")
    profile_args.add_argument(
        "--profile_dir", default="/tmp/region_medclip_profile", help="where the trace is kept"
    )
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    results, report = SUBCOMMANDS[args.subcommand](args)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
