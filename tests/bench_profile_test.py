"""`bench profile`: kernel-time accounting on hand-made trace events, and the whole command on
micro-sized towers (a configs folder whose tiny_roi.py is the micro config)."""

import json
import os

import pytest

from region_medclip.bench import __main__ as bench
from region_medclip.bench import profile as bench_profile


def test_kernel_kinds():
    assert bench_profile.kernel_kind("ynn_fusion.12") == "matmul"
    assert bench_profile.kernel_kind("dot.3") == "matmul"
    assert bench_profile.kernel_kind("sm90_xmma_gemm_f32f32") == "matmul"
    assert bench_profile.kernel_kind("transpose_copy_fusion.2") == "layout"
    assert bench_profile.kernel_kind("copy.7") == "layout"
    assert bench_profile.kernel_kind("negate_exponential_fusion") == "other"


def test_summary_counts_top_level_kernels_per_step():
    def event(name, ts, dur, tid=1):
        return dict(ph="X", name=name, ts=ts, dur=dur, pid=0, tid=tid)

    events = [
        event("ThunkExecutor::Execute", 0, 1000),  # the executor, not a kernel
        event("ynn_fusion.1", 0, 300),
        event("ynn_fusion.1", 10, 100),  # nested in the one above: not counted again
        event("copy_bitcast_fusion", 400, 100),
        event("add_fusion", 600, 200, tid=2),
        event("ynn_fusion.1", 1000, 300),
        dict(ph="i", name="marker", ts=5),  # an instant event
    ]
    summary = bench_profile.summarise(events, steps=2, op_names={"ynn_fusion.1": "fc1/dot"})
    # Per step: matmul (300 + 300) / 2, layout 100 / 2, other 200 / 2 microseconds.
    assert summary["by_kind_ms"] == {"matmul": 0.3, "other": 0.1, "layout": 0.05}
    assert summary["kernel_ms"] == pytest.approx(0.45)
    assert summary["top"][0] == dict(kernel="ynn_fusion.1", kind="matmul", ms=0.3, op="fc1/dot")


def test_hlo_op_names():
    text = (
        "  %ynn_fusion.3 = f32[4,8]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%c, "
        'metadata={op_name="jit(step)/mlp/fc1/dot_general" source_file="x.py"}\n'
        "  ROOT %copy.1 = f32[8,4]{1,0} copy(%t), "
        'metadata={op_name="jit(step)/transpose"}\n'
    )
    assert bench_profile.hlo_op_names(text) == {
        "ynn_fusion.3": "jit(step)/mlp/fc1/dot_general",
        "copy.1": "jit(step)/transpose",
    }


@pytest.mark.slow
def test_profile_command_on_micro_towers(tmp_path):
    # The micro towers stand in for the tiny config: the same code path in seconds.
    configs_dir = tmp_path / "configs"
    configs_dir.mkdir()
    (configs_dir / "tiny_roi.py").write_text(
        "import micro_config\n\n\ndef get_config(arg=None):\n    return micro_config.get_config()\n"
    )
    out = tmp_path / "profile.json"
    bench.main(
        [
            "profile",
            f"--configs_dir={configs_dir}",
            "--profile_steps=2",
            f"--profile_dir={tmp_path / 'trace'}",
            f"--out={out}",
        ]
    )
    result = json.loads(out.read_text())
    assert os.path.exists(result["trace"]) and result["step_ms"] > 0
    assert result["by_kind_ms"]["matmul"] > 0
    assert sum(result["by_kind_share"].values()) == pytest.approx(1.0, abs=0.01)
    assert sum(result["by_kind_ms"].values()) == pytest.approx(result["kernel_ms"], rel=0.01)
    # The heaviest kernels are traced back to the model ops they come from.
    assert any("image_tower" in row["op"] or "text_tower" in row["op"] for row in result["top"])
