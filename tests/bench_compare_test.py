"""`bench compare` on micro-sized towers (a configs folder whose tiny_roi.py is the micro config):
both sides measured, same parameter count (parity group: needs torch and open_clip)."""

import json

import pytest

from conftest import require_peer
from region_medclip.bench import __main__ as bench

TINY_MICRO = """import micro_config


def get_config(arg=None):
    c = micro_config.get_config()
    c.data.batch_size = 4
    return c
"""


@pytest.mark.slow
@pytest.mark.parity
def test_compare_measures_both_sides_with_equal_parameter_counts(tmp_path):
    require_peer("torch")
    require_peer("open_clip")
    # The micro towers stand in for the tiny config: the same code path in seconds.
    configs_dir = tmp_path / "configs"
    configs_dir.mkdir()
    (configs_dir / "tiny_roi.py").write_text(TINY_MICRO)
    out = tmp_path / "compare.json"
    bench.main(
        [
            "compare",
            f"--configs_dir={configs_dir}",
            "--compare_cases=tiny_roi",
            "--train_steps=2",
            f"--out={out}",
        ]
    )
    results = json.loads(out.read_text())
    (row,) = results["rows"]
    for key in ("region_medclip_examples_per_s", "open_clip_examples_per_s", "ratio", "mfu"):
        assert row[key] > 0, key
    assert row["ratio"] == pytest.approx(
        row["region_medclip_examples_per_s"] / row["open_clip_examples_per_s"], rel=0.02
    )
    # Same architecture on both sides: every tower parameter has its counterpart.
    assert row["params_region_medclip"] == row["params_open_clip"]
    assert results["machine"]["cpus"] >= 1 and results["machine"]["peak_gflops"] > 0
