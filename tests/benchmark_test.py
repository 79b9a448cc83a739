"""``python -m region_medclip.benchmark``: the suites name valid evaluator entries, the published
numbers keep to their rules, a suite runs on a trained model (datasets that are not prepared get
their prepare command), and the tables keep published rows apart from ours."""

import json
import math
import subprocess
import sys

import ml_collections
import pytest

from region_medclip.benchmark import published, suites, tables
from region_medclip.evaluators import registry


@pytest.mark.parametrize("suite", sorted(suites.SUITES))
def test_every_protocol_is_a_valid_evaluator_entry(suite):
    for protocol in suites.SUITES[suite]():
        evals = {
            name: dict(entry, dataset=protocol.dataset) for name, entry in protocol.evals.items()
        }
        config = ml_collections.ConfigDict(dict(train=dict(eval_every=1), evals=evals))
        for name in evals:
            registry.eval_config(config, name)  # an unknown kind or key raises here
        for _, eval_name, _, published_metric in protocol.columns:
            assert eval_name in protocol.evals
            if published_metric:
                assert protocol.name in published.PROTOCOLS


def test_published_numbers_keep_their_rules():
    assert published.PUBLISHED
    for row in published.PUBLISHED:
        assert row.protocol in published.PROTOCOLS
        assert row.source and row.table and row.url.startswith("http")
        assert "as reported" in row.note
        if not row.metric.startswith("cnr"):  # CNR is unitless; the rest are fractions
            assert 0.0 <= row.value <= 1.0, row
    with pytest.raises(ValueError, match="unknown protocol"):
        published.rows("imagenet")
    # Every protocol of the real suite that has published rows shares a metric with them.
    for protocol in suites.cxr_suite():
        if protocol.name in published.PROTOCOLS and published.rows(protocol.name):
            ours = {key for *_, key in protocol.columns if key}
            assert ours & {row.metric for row in published.rows(protocol.name)}, protocol.name


def _result():
    protocol = suites.cxr_suite()[0]
    reference = published.rows(protocol.name)
    return dict(
        suite="cxr",
        protocols=[
            dict(
                name=protocol.name,
                title=protocol.title,
                dataset=protocol.dataset,
                status="evaluated",
                columns=["accuracy", "macro F1"],
                rows=[dict(model="runs/tiny", metrics={"accuracy": 0.5, "macro F1": math.nan})],
                published=[
                    tables._published_row(protocol, r) for r in tables._by_method(reference)
                ],
            )
        ],
    )


def test_markdown_keeps_published_rows_apart():
    text = tables.markdown(_result())
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[1] == "| runs/tiny | 0.500 | — | this run |"
    reported = lines[2:]
    assert reported and all(line.startswith("| *as reported:* ") for line in reported)
    first = published.rows("chexpert_5x200")[0]
    assert any(f"{first.value:.3f}" in line and first.table in line for line in reported)


@pytest.fixture(scope="module")
def trained_workdir(synth_data_dir, tmp_path_factory) -> str:
    """Two micro steps on the 32-px synth_cxr."""
    import micro_config

    from region_medclip import train

    config = micro_config.get_config(f"data_dir={synth_data_dir},steps=2")
    workdir = tmp_path_factory.mktemp("benchmark") / "run"
    train.train_and_evaluate(config, str(workdir))
    return str(workdir)


def test_the_synth_suite_runs_and_the_real_one_names_prepare(
    trained_workdir, synth_data_dir, monkeypatch, tmp_path
):
    monkeypatch.setitem(suites.SUITES, "synth", lambda: suites.synth_suite(24, 12))
    result = tables.run_suite([trained_workdir], "synth")
    for protocol in result["protocols"]:
        assert protocol["status"] == "evaluated" and len(protocol["rows"]) == 1
        values = protocol["rows"][0]["metrics"]
        assert {key.removesuffix("/std") for key in values} == set(protocol["columns"])
        assert all(math.isfinite(v) for v in values.values()), protocol["name"]
    # An empty data directory: every real protocol is a prepare command, none is run.
    result = tables.run_suite([trained_workdir], "cxr", data_dir=str(tmp_path))
    for protocol in result["protocols"]:
        assert protocol["rows"] == []
        assert protocol["status"].startswith(
            f"not prepared: python -m region_medclip.prepare --dataset={protocol['dataset']} "
        )
    assert any(p["published"] for p in result["protocols"])
    with pytest.raises(ValueError, match="--suite: 'nope'"):
        tables.run_suite([trained_workdir], "nope")


@pytest.mark.slow
def test_the_command_line_writes_both_tables(trained_workdir, tmp_path):
    out = tmp_path / "tables"
    command = [sys.executable, "-m", "region_medclip.benchmark", f"--workdir={trained_workdir}"]
    command += ["--suite=cxr", f"--data_dir={tmp_path / 'empty'}", f"--out={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "*as reported:*" in done.stdout and "not prepared" in done.stdout
    saved = json.loads((out / "benchmark_cxr.json").read_text())
    assert saved["suite"] == "cxr" and (out / "benchmark_cxr.md").read_text() in done.stdout
