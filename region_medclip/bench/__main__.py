"""``python -m region_medclip.bench losses|data|train|compare|openclip|profile|gpu|accum``:
parses the flags, runs one benchmark and prints its markdown report (see the package's
docstring, or ``--help``)."""

import os
import sys

# `gpu` measures the accelerator JAX finds; every other benchmark runs on 8 simulated CPU devices,
# which must be requested before JAX starts its CPU backend.
_SUBCOMMAND = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
if __name__ == "__main__" and _SUBCOMMAND != "gpu":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402

import region_medclip.bench  # noqa: E402
from region_medclip.bench import common  # noqa: E402

# Each names the module of region_medclip.bench whose `run(args) -> (results, report)` it calls,
# imported only when chosen: `compare` and `openclip` need torch, `train` and `profile` the
# trainer.
SUBCOMMANDS = ("accum", "compare", "data", "gpu", "losses", "openclip", "profile", "train")


def _comma_list(cast=str):
    """A flag type: "a,b" -> [cast("a"), cast("b")]."""
    return lambda s: [cast(v) for v in s.split(",")]


def _add_losses_flags(parser):
    """Flags of losses: the embedding size, the two sweeps and what is timed."""
    group = parser.add_argument_group("losses")
    group.add_argument("--dim", type=int, default=64, help="embedding dimension")
    group.add_argument(
        "--global_batches",
        type=_comma_list(int),
        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
    )
    group.add_argument("--local_batch", type=int, default=2048, help="for the D sweep")
    group.add_argument("--repeats", type=int, default=3)
    group.add_argument(
        "--max_timed_batch", type=int, default=16384, help="larger batches: memory only"
    )
    group.add_argument(
        "--max_host_gib", type=float, default=6.0, help="skip timing above this total memory"
    )


def _add_step_flags(parser):
    """Flags of data, train, compare and profile."""
    cases = ", ".join(common.CASES)
    group = parser.add_argument_group("data")
    group.add_argument("--data_batches", type=int, default=20, help="timed batches of 32")
    group = parser.add_argument_group("train")
    group.add_argument("--train_steps", type=int, default=5, help="timed steps per config")
    group.add_argument(
        "--train_configs", type=_comma_list(), default=None, help=f"subset of: {cases}"
    )
    group = parser.add_argument_group("compare")
    group.add_argument(
        "--compare_cases", type=_comma_list(), default=None, help=f"subset of: {cases}"
    )
    group.add_argument("--compare_batch", type=int, default=0, help="0: the config's")
    group = parser.add_argument_group("accum")
    group.add_argument("--accum_batch", type=int, default=256, help="global batch B")
    group.add_argument("--accum_k", type=int, default=8, help="micro-batches of B")
    group = parser.add_argument_group("openclip")
    group.add_argument(
        "--openclip_seconds", type=float, default=540.0, help="wall-clock training budget"
    )
    group.add_argument("--openclip_seed", type=int, default=0, help="init and data order")
    group = parser.add_argument_group("profile")
    group.add_argument("--profile_config", default="tiny_roi", help=" or ".join(common.CASES))
    group.add_argument("--profile_batch", type=int, default=0, help="0: the config's")
    group.add_argument("--profile_steps", type=int, default=3, help="traced steps")
    group.add_argument(
        "--profile_dir", default="/tmp/region_medclip_profile", help="where the trace is kept"
    )


def _add_gpu_flags(parser):
    """Flags of gpu (it also reads --train_steps and --repeats)."""
    group = parser.add_argument_group("gpu")
    group.add_argument("--gpu_batch", type=int, default=256, help="train-step batch to try first")
    group.add_argument("--gpu_matmul_size", type=int, default=8192, help="of the peak's matmuls")
    group.add_argument("--gpu_loss_batch", type=int, default=32768, help="global batch of losses")
    group.add_argument("--gpu_loss_dim", type=int, default=512, help="embedding dim of losses")
    group.add_argument(
        "--gpu_budget_s", type=float, default=300.0, help="no section starts after this"
    )


def parser() -> argparse.ArgumentParser:
    """The command line: a subcommand and the flags of every benchmark."""
    result = argparse.ArgumentParser(
        prog="python -m region_medclip.bench",
        description=region_medclip.bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument("subcommand", choices=SUBCOMMANDS)
    result.add_argument("--out", help="write the results (and the machine) as JSON here")
    result.add_argument(
        "--configs_dir",
        default=str(common.CONFIGS_DIR),
        help="the folder of tiny_roi.py and vitb16_roi.py (default: the repository's configs/)",
    )
    _add_losses_flags(result)
    _add_step_flags(result)
    _add_gpu_flags(result)
    return result


def main(argv=None):
    """Runs the benchmark ``argv`` names, prints its report and writes ``--out``."""
    args = parser().parse_args(argv)
    module = importlib.import_module(f"region_medclip.bench.{args.subcommand}")
    results, report = module.run(args)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
