"""The loss ablation: variants, the table, and a two-step run of every variant."""

import json

import numpy as np
import pytest

from region_medclip.train import ablation


def test_summarise_means_and_stds_by_hand():
    runs = [
        {"zero_shot": {"macro_auroc": 0.8}, "grounding": {"pointing_game": 0.0}},
        {"zero_shot": {"macro_auroc": 0.6}, "grounding": {"pointing_game": 1.0}},
    ]
    summary, table = ablation.summarise({"a": runs, "b": runs[:1]})
    # Sample std (ddof=1): sqrt(((0.8-0.7)² + (0.6-0.7)²) / 1) = 0.1414.
    assert summary["a"]["zero_shot/macro_auroc"] == pytest.approx((0.7, 0.1 * np.sqrt(2)))
    # A zero is a value, not a missing one.
    assert summary["a"]["grounding/pointing_game"] == pytest.approx((0.5, np.sqrt(0.5)))
    assert np.isnan(summary["b"]["zero_shot/macro_auroc"][1])  # one seed: no spread
    assert np.isnan(summary["a"]["retrieval/i2t/R@5"][0])
    assert "| a | 2 | 0.700 ± 0.141 |" in table and "| b | 1 | 0.800 |" in table


def test_the_variants_set_the_terms_they_name():
    """Region terms on in the region-aware rows only, the word–patch term (weight 1) in the local
    rows only, whatever the base config says."""
    import micro_config

    base = micro_config.get_config()
    base.loss.local_weight = 0.5  # a base that has it on: the variants decide, not the base
    assert list(ablation.VARIANTS) == [
        "global_only",
        "medclip",
        "sigmoid",
        "global_local",
        "region_aware",
        "both",
    ]
    for variant in ablation.VARIANTS:
        loss = ablation.variant_config(base, variant, seed=1).loss
        region, local = variant in ("region_aware", "both"), variant in ("global_local", "both")
        assert (loss.beta > 0, loss.gamma > 0, loss.local_weight > 0) == (region, region, local)
        assert loss.local_weight in (0.0, 1.0)
        assert loss.global_kind == {"medclip": "medclip", "sigmoid": "sigmoid"}.get(
            variant, "softmax"
        )


def test_a_finished_run_gains_the_detection_it_was_not_evaluated_with(tmp_path, monkeypatch):
    """Runs evaluate `detection` only from `evaluate` (every=0); the ablation fills its columns
    in at the last step of each finished run, once, and never retrains."""
    import micro_config

    base = micro_config.get_config("steps=2,evals")
    base.evals.detection.every = 0
    rundir = tmp_path / "region_aware" / "seed0"
    (rundir / "eval").mkdir(parents=True)
    (rundir / "eval" / "2.json").write_text(json.dumps({"step": 2, "zero_shot": {"x": 1.0}}))
    asked = []

    def evaluate_last(config, path, names=None):
        asked.append(names)
        return {"step": 2, "zero_shot": {"x": 1.0}, "detection": {"map@0.4": 0.5}}

    def train(*args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation, "_evaluate_last", evaluate_last)
    monkeypatch.setattr(ablation, "train_and_evaluate", train)
    summary, table = ablation.run(base, str(tmp_path), [0], ["region_aware"])
    assert asked == [["detection"]]
    assert summary["region_aware"]["detection/map@0.4"][0] == 0.5
    assert "detection/map@0.4" in table.splitlines()[0]


@pytest.mark.slow
def test_every_variant_trains_evaluates_and_is_not_trained_twice(tmp_path, synth_data_dir):
    import micro_config

    from region_medclip import config as common

    data_dir = synth_data_dir
    base = micro_config.get_config(f"data_dir={data_dir},steps=2,evals")
    workdir = tmp_path / "ablation"
    summary, table = ablation.run(base, str(workdir), [0], list(ablation.VARIANTS))
    assert set(summary) == set(ablation.VARIANTS)
    assert len(table.splitlines()) == 2 + len(ablation.VARIANTS)
    for variant in ablation.VARIANTS:
        stored = json.loads((workdir / variant / "seed0" / "config.json").read_text())
        region, local = variant in ("region_aware", "both"), variant in ("global_local", "both")
        assert (stored["loss"]["beta"] > 0) == region and (stored["loss"]["gamma"] > 0) == region
        assert (stored["loss"]["local_weight"] > 0) == local
        assert 0 <= summary[variant]["regions/within_image_top1"][0] <= 1
    sigmoid = json.loads((workdir / "sigmoid" / "seed0" / "config.json").read_text())
    assert sigmoid["loss"]["global_kind"] == "sigmoid"
    assert sigmoid["model"]["logit_scale_init"] == pytest.approx(common.SIGMOID_LOGIT_SCALE_INIT)
    # Finished runs are read back, not trained again.
    final = workdir / "medclip" / "seed0" / "eval" / "2.json"
    before = final.stat().st_mtime_ns
    again, _ = ablation.run(base, str(workdir), [0], ["medclip"])
    assert final.stat().st_mtime_ns == before and again["medclip"] == summary["medclip"]
    with pytest.raises(ValueError, match="unknown"):
        ablation.run(base, str(workdir), [0], ["nope"])


def test_evaluate_last_merges_into_the_runs_evaluation(tmp_path, monkeypatch):
    """What is evaluated joins the step's file beside what was there, a null (a non-finite
    metric) included."""
    rundir = tmp_path / "run"
    (rundir / "eval").mkdir(parents=True)
    earlier = {"step": 2, "zero_shot": {"macro_auroc": 0.7, "nodule": None}}
    (rundir / "eval" / "2.json").write_text(json.dumps(earlier))
    monkeypatch.setattr(ablation.checkpointing, "restore_params", lambda *a, **k: ({}, None, 2))
    monkeypatch.setattr(ablation.clip, "from_config", lambda model: None)
    monkeypatch.setattr(
        ablation.evals_lib, "evaluate", lambda *a, **k: {"detection": {"map@0.4": 0.5}}
    )
    import micro_config

    out = ablation._evaluate_last(micro_config.get_config("steps=2"), str(rundir), ["detection"])
    assert out == {
        "step": 2,
        "zero_shot": {"macro_auroc": 0.7, "nodule": None},
        "detection": {"map@0.4": 0.5},
    }
