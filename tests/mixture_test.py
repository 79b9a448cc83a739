"""Mixtures of training sources: parsing, weights, MedCLIP's unpaired rows, per-source counts,
exact resume, and the loop's errors."""

import micro_config
import numpy as np
import pytest

from region_medclip import train
from region_medclip.data import mixture, pipeline

THIRDS = "synth_cxr#0/3,synth_cxr#1/3@images,synth_cxr#2/3@texts"


def test_parse_reads_names_parts_kinds_and_weights():
    sources = mixture.parse("mimic_cxr:0.7, roco:0.3")
    assert [(s.name, s.weight, s.kind) for s in sources] == [
        ("mimic_cxr", 0.7, "paired"),
        ("roco", 0.3, "paired"),
    ]
    a, b, c = mixture.parse(THIRDS)
    assert (a.part, a.parts, a.kind, a.label) == (0, 3, "paired", "synth_cxr#0/3")
    assert (b.kind, b.label) == ("images", "synth_cxr#1/3@images")
    assert (c.part, c.kind, c.weight) == (2, "texts", 1.0)
    assert not mixture.is_mixture("synth_cxr") and mixture.is_mixture("synth_cxr@images")
    assert mixture.unpaired(THIRDS) and not mixture.unpaired("a:1,b:2")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("mimic_cxr:0", "weight '0'; it must be positive"),
        ("mimic_cxr:-1,roco", "must be positive"),
        ("mimic_cxr:abc", "must be positive"),
        ("mimic_cxr@reports", "kind 'reports'"),
        ("mimic_cxr#3/3", "part 3 of 3"),
        ("mimic_cxr,mimic_cxr:2", "repeated"),
        ("mimic cxr", "cannot read"),
        (" , ", "names no dataset"),
    ],
)
def test_bad_entries_are_named(spec, message):
    with pytest.raises(ValueError, match="config.data.train") as err:
        mixture.parse(spec)
    assert message in str(err.value)


def _iterator(data_dir, spec, batch_size=12, seed=0):
    c = micro_config.get_config(f"data_dir={data_dir}")
    c.data.train = spec
    ds = pipeline.make_dataset(c.data, split="train", train=True, seed=seed, batch_size=batch_size)
    return pipeline.BatchIterator(ds)


def test_unpaired_thirds_carry_what_each_row_has(synth_data_dir):
    it = _iterator(synth_data_dir, THIRDS)
    batches = [next(it) for _ in range(4)]
    for b in batches:
        images_only = b["has_image"] & ~b["has_text"]
        texts_only = ~b["has_image"] & b["has_text"]
        assert (b["has_image"] | b["has_text"]).all()
        assert not b["texts"][images_only].any() and not b["images"][texts_only].any()
        assert not b["roi_mask"][images_only | texts_only].any()
        assert b["roi_mask"][b["has_image"] & b["has_text"]].any()
    # Equal weights: a third of the 48 rows from each source, counted under its label.
    assert it.totals["source/synth_cxr#0/3"] == 16
    assert it.totals["source/synth_cxr#1/3@images"] == 16
    assert it.totals["source/synth_cxr#2/3@texts"] == 16
    assert sum(int(b["has_image"].sum()) for b in batches) == 32


def test_weights_set_the_shares_and_resume_is_exact(synth_data_dir):
    spec = "synth_cxr#0/2:3,synth_cxr#1/2:1"
    it = _iterator(synth_data_dir, spec, batch_size=8)
    head = [next(it) for _ in range(3)]
    state = it.get_state()
    tail = [next(it) for _ in range(2)]
    assert it.totals["source/synth_cxr#0/2"] == 30 and it.totals["source/synth_cxr#1/2"] == 10
    assert "has_image" in head[0]  # every row of a mixture says what it holds
    resumed = _iterator(synth_data_dir, spec, batch_size=8)
    resumed.set_state(state)
    assert resumed.totals["source/synth_cxr#0/2"] == 18
    for expected in tail:
        got = next(resumed)
        np.testing.assert_array_equal(got["images"], expected["images"])
        np.testing.assert_array_equal(got["texts"], expected["texts"])


def test_a_source_that_is_not_there_is_named(synth_data_dir):
    with pytest.raises(ValueError, match="source 'nosuch'"):
        _iterator(synth_data_dir, "synth_cxr,nosuch")
    with pytest.raises(ValueError, match="source 'mimic_cxr@texts'.*is not prepared"):
        _iterator(synth_data_dir, "synth_cxr,mimic_cxr@texts")


@pytest.mark.slow
def test_unpaired_rows_train_the_medclip_loss_only(synth_data_dir, tmp_path):
    c = micro_config.config(synth_data_dir, **{"train.total_steps": 2})
    c.data.train = THIRDS
    with pytest.raises(ValueError, match="need config.loss.global_kind=medclip"):
        train.train_and_evaluate(c, str(tmp_path / "softmax"))
    c.loss.global_kind = "medclip"
    result = train.train_and_evaluate(c, str(tmp_path / "medclip"))
    assert np.isfinite(result["loss"]) and result["step"] == 2
    assert result["data/source/synth_cxr#1/3@images"] > 0
    assert 0 < result["global/images"] < 8 and 0 < result["global/texts"] < 8
