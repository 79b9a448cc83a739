"""`python -m region_medclip.bench`: the command line, the configs it reads by path, and the
`losses` benchmark end to end in a process of its own (which must simulate its 8 devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import without_compilation_cache
from region_medclip.bench import __main__ as bench
from region_medclip.bench import common

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("subcommand", ["losses", "data", "train", "compare", "profile"])
def test_parser_accepts_each_subcommand(subcommand):
    args = bench.parser().parse_args([subcommand, "--out=x.json"])
    assert args.subcommand == subcommand and args.out == "x.json"
    assert Path(args.configs_dir) == REPO / "configs"


def test_parser_flags():
    args = bench.parser().parse_args(
        [
            "losses",
            "--global_batches=8,16",
            "--train_configs=tiny_roi,vitb16_roi:runlocal",
            "--compare_cases=tiny_roi",
            "--profile_config=vitb16_roi:runlocal",
            "--configs_dir=/elsewhere",
        ]
    )
    assert args.global_batches == [8, 16] and args.dim == 64 and args.max_host_gib == 6.0
    assert args.train_configs == ["tiny_roi", "vitb16_roi:runlocal"]
    assert args.compare_cases == ["tiny_roi"] and args.compare_batch == 0
    assert args.profile_config == "vitb16_roi:runlocal" and args.profile_steps == 3
    assert args.configs_dir == "/elsewhere"
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["nonsense"])


def test_default_configs_dir_holds_the_benchmarked_configs():
    assert common.CONFIGS_DIR == REPO / "configs"
    for file_name, arg in common.CASES.values():
        config = common.load_config(common.CONFIGS_DIR, file_name, arg)
        assert config.data.batch_size > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["data"],
        ["train"],
        ["train", "--train_configs=vitb16_roi:runlocal"],
        ["compare", "--compare_cases=tiny_roi"],
        ["profile"],
    ],
)
def test_missing_config_file_names_its_path_and_the_flag(tmp_path, argv):
    with pytest.raises(SystemExit) as error:
        bench.main([*argv, f"--configs_dir={tmp_path}"])
    message = str(error.value)
    file_name = "vitb16_roi.py" if "vitb16" in " ".join(argv) else "tiny_roi.py"
    assert str(tmp_path / file_name) in message and "--configs_dir" in message


def test_unknown_case_names_the_flag():
    with pytest.raises(SystemExit, match="--train_configs: unknown \\['vitl'\\]"):
        bench.main(["train", "--train_configs=tiny_roi,vitl"])
    with pytest.raises(SystemExit, match="--profile_config: unknown \\['nope'\\]"):
        bench.main(["profile", "--profile_config=nope"])


def test_markdown():
    rows = [dict(a=1, b=0.1234, c=None), dict(a=2, b=12345.67, c="x")]
    assert common.markdown(rows, ["a", "b", "c"]).splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1 | 0.123 | not run |",
        "| 2 | 12,345.7 | x |",
    ]


def test_bench_sources_read_configs_by_path_only():
    for path in (REPO / "region_medclip" / "bench").glob("*.py"):
        text = path.read_text()
        assert "from configs" not in text and "import configs" not in text, path


@pytest.mark.slow
def test_losses_command_simulates_its_devices(tmp_path):
    env = without_compilation_cache(os.environ)
    env.pop("XLA_FLAGS", None)  # the command itself must ask for its 8 devices
    out = tmp_path / "losses.json"
    argv = ["--dim=8", "--global_batches=64", "--local_batch=8", "--repeats=1", f"--out={out}"]
    done = subprocess.run(
        [sys.executable, "-m", "region_medclip.bench", "losses", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["devices"].startswith("8 x")
    assert [row["devices"] for row in results["by_devices"]] == [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8]
    for row in results["by_global_batch"] + results["by_devices"]:
        assert row["step_ms"] > 0 and row["peak_mib_per_device"] > 0, row
    assert "By global batch (D = 8):" in done.stdout
