"""What the benchmarks share: the configs they run, read by path; the markdown tables they print;
the machine they ran on; and the matmul peak MFU is measured against."""

import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

import region_medclip
from region_medclip import config as config_lib

# The repository's experiment configs. They are not part of the installed package: an installed
# copy points `--configs_dir` at a checkout's configs/ folder.
CONFIGS_DIR = Path(region_medclip.__file__).resolve().parents[1] / "configs"

# The configs `train` and `profile` run: name -> (file in --configs_dir, its `:arg`).
CASES = {
    "tiny_roi": ("tiny_roi.py", None),
    "vitb16_roi:runlocal": ("vitb16_roi.py", "runlocal"),
}


def load_config(
    configs_dir: str | os.PathLike, file_name: str, arg: str | None = None
) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``configs_dir/file_name``.

    Raises:
      SystemExit: the file is missing; the message names its path and ``--configs_dir``.
    """
    path = Path(configs_dir) / file_name
    if not path.is_file():
        raise SystemExit(
            f"config file {str(path)!r} not found: --configs_dir={configs_dir} must be a folder "
            f"holding {file_name} (the repository's configs/ folder)"
        )
    return config_lib.load_file(str(path), arg)


def select(flag: str, names: Iterable[str] | None, known: Mapping) -> list[str]:
    """``names`` (all of ``known`` when None), checked against ``known``.

    Raises:
      SystemExit: naming ``flag`` and the unknown names.
    """
    names = list(known) if names is None else list(names)
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"{flag}: unknown {sorted(unknown)}; known {list(known)}")
    return names


def load_cases(args, names: Iterable[str] | None, flag: str, cases=CASES) -> dict:
    """name -> config of each named case (all of ``cases`` when ``names`` is None), every file
    read before any is measured, so that a wrong ``--configs_dir`` fails at once."""
    names = select(flag, names, cases)
    return {name: load_config(args.configs_dir, *cases[name]) for name in names}


def markdown(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) with ``columns``; None reads 'not run'."""

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


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def host() -> dict:
    """The machine in brief: OS and CPU count."""
    return dict(platform=platform.platform(), cpus=os.cpu_count())


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
