"""Zero-shot evaluation: the classification metrics (AUROC against scikit-learn), prompt sets of
the dataset registry, and the ``zero_shot`` evaluator on oracle text encoders."""

import types

import numpy as np
import pytest
from PIL import Image

from region_medclip.data import prompts as prompts_lib
from region_medclip.data import registry as data_registry
from region_medclip.evaluators import common, plots, registry, zero_shot


def test_auroc_hand_cases():
    assert common.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert common.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # Pairs (pos, neg): (0.8 > 0.1), (0.8 > 0.5), (0.4 > 0.1), (0.4 < 0.5) → 3/4.
    assert common.auroc([0.1, 0.5, 0.4, 0.8], [0, 0, 1, 1]) == 0.75
    # A tie between a positive and a negative counts one half: (1 + 0.5) / 2.
    assert common.auroc([0.3, 0.5, 0.5], [0, 0, 1]) == 0.75
    assert np.isnan(common.auroc([0.1, 0.2], [1, 1]))
    # Uncertain labels (−1) are left out.
    assert common.auroc([0.1, 0.9, 0.0], [0, 1, -1]) == 1.0


def test_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 200))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = np.round(rng.normal(size=n) + labels * trial / 10, 1)  # rounding makes ties
        assert common.auroc(scores, labels) == pytest.approx(
            metrics.roc_auc_score(labels, scores), abs=1e-12
        )


def test_macro_auroc_skips_one_sided_classes():
    scores = np.array([[0.1, 0.9, 0.3], [0.9, 0.1, 0.4], [0.2, 0.8, 0.5]])
    labels = np.array([[0, 1, 1], [1, 0, 1], [0, 1, 1]])
    per_class = common.per_class_auroc(scores, labels)
    np.testing.assert_array_equal(per_class[:2], [1.0, 1.0])
    assert np.isnan(per_class[2])
    assert common.macro_auroc(scores, labels) == 1.0


def test_bootstrap_ci_brackets_the_estimate_and_narrows():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    scores = labels + rng.normal(size=400)
    estimate = common.auroc(scores, labels)
    low, high = common.bootstrap_ci(common.auroc, scores, labels, num_samples=300)
    assert low < estimate < high and high - low < 0.15
    low_small, high_small = common.bootstrap_ci(
        common.auroc, scores[:60], labels[:60], num_samples=300
    )
    assert high_small - low_small > high - low
    # Perfect separation: every resample is 1.
    assert common.bootstrap_ci(common.auroc, np.array([0.0, 1.0] * 5), np.array([0, 1] * 5)) == (
        1.0,
        1.0,
    )


def test_top_k_and_f1():
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    targets = np.array([1, 1, 0])
    assert common.top_k_accuracy(logits, targets, 1) == pytest.approx(1 / 3)
    assert common.top_k_accuracy(logits, targets, 2) == pytest.approx(2 / 3)
    assert common.top_k_accuracy(logits, targets, 3) == 1.0
    # predictions [1, 0, 2] vs targets [1, 1, 0]: F1 class0 = 0, class1 = 2/3, class2 = 0.
    assert common.macro_f1(np.array([1, 0, 2]), targets, 3) == pytest.approx((0 + 2 / 3 + 0) / 3)
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.8]])
    labels = np.array([[1, 0], [0, 1], [0, -1]])
    # class 0: tp 1, fp 1 → F1 2/3; class 1 (third row uncertain, left out): tp 1 → 1.
    assert common.multilabel_f1(probs, labels) == pytest.approx((2 / 3 + 1) / 2)


def test_roc_curve_matches_sklearn_and_integrates_to_auroc():
    from sklearn.metrics import roc_curve as sk_roc_curve

    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=300), 1)  # rounded: many ties
    labels = (rng.random(300) < 0.3).astype(int)
    labels[:5] = -1  # uncertain: left out, as in auroc
    fpr, tpr = plots.roc_curve(scores, labels)
    keep = labels >= 0
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels[keep], scores[keep], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(common.auroc(scores, labels), abs=1e-12)


def _oracle_encoder(names: list[str], width: int = 4):
    """``list[str] → [n, width]``: one direction per finding named in the text, direction
    ``width - 1`` for its negations (a text naming no finding points at "no finding", 0)."""
    directions = {name: d for d, name in enumerate(names)}

    def encode(texts):
        out = np.zeros((len(texts), width))
        for i, t in enumerate(texts):
            negated = t.lower().startswith(("no ", "there is no", "findings: no", "impression: no"))
            name = next((n for n in names[1:] if n in t), "no finding")
            out[i, width - 1 if negated and name != "no finding" else directions[name]] = 1.0
        return out

    return encode


def test_zero_shot_with_an_oracle_text_encoder():
    """Images that point at their finding's prompt direction get AUROC 1 and top-1 1."""
    names = ["no finding", "nodule", "mass"]
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]], np.float32)
    zimg = np.array([[1, 0, 0, 0.5], [0, 1, 0, 0.5], [0, 0, 1, 0.5], [0, 1, 0, 0.5]])
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    out = zero_shot.evaluate(
        zimg=zimg,
        labels=labels,
        class_names=names,
        encode=_oracle_encoder(names),
        logit_scale=10.0,
        bootstrap=50,
        dataset="synth_cxr",
    )
    assert out["auroc/nodule"] == 1.0 and out["auroc/mass"] == 1.0 and out["macro_auroc"] == 1.0
    assert "auroc/no finding" not in out
    assert out["top1"] == 1.0 and out["macro_f1"] == 1.0


def test_sentence_prompts_are_the_sentences_reports_state_findings_with():
    from region_medclip.data import synth, transforms
    from region_medclip.data.synth import text as synth_text

    names = list(synth.LABELS)
    prompts, negative = data_registry.get("synth_cxr").prompts("sentences", names)
    assert negative is None  # weighed against the generic negations
    assert prompts[0] == [t.format("no finding") for t in prompts_lib.POSITIVE_TEMPLATES]
    assert all(len(set(group)) == len(group) for group in prompts)
    assert not any("  " in p for group in prompts for p in group)  # empty severity left no gap
    # Every sentence a synthetic report states a finding with is one of that finding's prompts,
    # and no prompt names another finding's location set (effusions only at the bases).
    rng = np.random.default_rng(0)
    seen = {name: set() for name in names[1:]}
    for _ in range(400):
        name = names[1 + rng.integers(len(names) - 1)]
        side, zone = synth.LOCATIONS[name][rng.integers(len(synth.LOCATIONS[name]))]
        severity = synth_text.SEVERITIES[name][rng.integers(len(synth_text.SEVERITIES[name]))]
        finding = synth.Finding(name, side, zone, severity, (0.0, 0.0, 1.0, 1.0))
        first = transforms.report_sentences(synth_text.report([finding], rng))[0]
        assert first in prompts[names.index(name)], (name, first)
        seen[name].add(first)
    assert all(seen.values())
    effusion = prompts[names.index("pleural effusion")]
    assert all(("base" in p or "lower" in p) for p in effusion)
    assert "The heart is enlarged." in prompts[names.index("cardiomegaly")]


def test_report_prompts_use_the_report_language():
    from region_medclip.data.synth import text as synth_text

    names = ["no finding", "cardiomegaly", "pleural effusion"]
    positive, negative = data_registry.get("synth_cxr").prompts("report", names)
    assert positive[0] == [t.format("no finding") for t in prompts_lib.POSITIVE_TEMPLATES]
    assert "There is enlarged heart." in positive[1] and "IMPRESSION: effusion." in positive[2]
    # Absent cardiomegaly is ruled out the way the reports do it, not as "No cardiomegaly."
    assert negative[1] == list(synth_text.NEGATIONS["cardiomegaly"])
    assert not any("  " in p for group in positive for p in group)  # empty severity left no gap


def test_report_prompts_score_an_oracle_that_reads_reports():
    """An oracle encoder that reads the report sentences gets AUROC 1 with them."""
    names = ["no finding", "cardiomegaly", "pleural effusion"]
    rules = {"heart": 1, "cardiac": 1, "cardiomegaly": 1, "effusion": 2, "fluid": 2}

    def encode(texts):
        out = np.zeros((len(texts), 4))
        for i, t in enumerate(texts):
            hit = next((d for w, d in rules.items() if w in t.lower()), 0)
            normal = t.lower().startswith("no ") or "normal" in t.lower()
            out[i, 3 if normal and hit else hit] = 1.0
        return out

    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], np.float32)
    zimg = np.array([[1, 0, 0, 1], [0, 1, 0, 0.5], [0, 0, 1, 0.5], [0, 1, 1, 0.2]], float)
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    kw = dict(zimg=zimg, labels=labels, class_names=names, encode=encode, dataset="synth_cxr")
    out = zero_shot.evaluate(**kw, logit_scale=10.0, prompts="report", bootstrap=20)
    assert out["auroc/cardiomegaly"] == 1.0 and out["auroc/pleural effusion"] == 1.0
    with pytest.raises(ValueError, match="prompts"):
        zero_shot.evaluate(**kw, logit_scale=1.0, prompts="nope")


def test_normal_negatives_survive_an_encoder_blind_to_negation():
    names = ["no finding", "nodule", "mass"]
    directions = {"nodule": 0, "mass": 1}

    def bag_of_words(texts):
        # Reads finding words and ignores "no": "No nodule." embeds like "There is nodule.".
        out = np.zeros((len(texts), 3))
        for i, t in enumerate(texts):
            hit = [d for w, d in directions.items() if w in t.lower()]
            out[i, hit[0] if hit else 2] = 1.0
        return out

    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], np.float32)
    zimg = np.array([[0, 0, 1], [1, 0, 0.5], [0, 1, 0.5], [1, 1, 0.2]], float)
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    kw = dict(zimg=zimg, labels=labels, class_names=names, encode=bag_of_words, bootstrap=20)
    paired = zero_shot.evaluate(**kw, logit_scale=10.0, dataset="synth_cxr")
    normal = zero_shot.evaluate(**kw, logit_scale=10.0, negatives="normal", dataset="synth_cxr")
    assert paired["macro_auroc"] == 0.5  # positive and negative prompts embed alike: all ties
    assert normal["auroc/nodule"] == 1.0 and normal["auroc/mass"] == 1.0
    probs, _, _ = zero_shot.finding_probabilities(
        zimg=zimg[:1],
        class_names=names,
        encode=bag_of_words,
        logit_scale=10.0,
        prompts="templates",
        negatives="normal",
        dataset="synth_cxr",
    )
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(10.0)), rtol=1e-6)  # normal film: p ≈ 0
    with pytest.raises(ValueError, match="negatives"):
        zero_shot.evaluate(**kw, logit_scale=1.0, negatives="nope", dataset="synth_cxr")


def _split(names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """An embedded split of 24 films: one-hot ``labels [24, C]`` (each class at least twice),
    ``zimg [24, C + 1]`` near its class's oracle direction, ``logit_scale``."""
    rng = np.random.default_rng(seed)
    labels = np.eye(len(names), dtype=np.float32)[np.arange(24) % len(names)]
    noise = 0.3 * rng.random((24, 1 + len(names)))
    zimg = np.concatenate([labels, np.full((24, 1), 0.5)], 1) + noise
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    return dict(zimg=zimg, labels=labels, logit_scale=10.0)


def test_the_zero_shot_evaluator_reads_the_dataset_entry(tmp_path):
    entry = data_registry.get("synth_cxr")
    names = entry.class_names()
    encode = _oracle_encoder(names, len(names) + 1)
    emb = _split(names)
    ctx = registry.Context(dataset=entry, text=types.SimpleNamespace(encode=encode), grid=1)
    options = dict(zero_shot.OPTIONS, bootstrap=20)
    out = zero_shot.run(emb, ctx=ctx, **options)
    expected = zero_shot.evaluate(
        zimg=emb["zimg"],
        labels=emb["labels"],
        class_names=names,
        encode=encode,
        logit_scale=10.0,
        bootstrap=20,
        dataset="synth_cxr",
    )
    assert out == expected and out["macro_auroc"] == 1.0 and out["top1"] == 1.0
    zero_shot.plot(emb, str(tmp_path / "roc.png"), ctx=ctx, **options)
    with Image.open(tmp_path / "roc.png") as image:
        assert image.format == "PNG"
    # The report-language prompt sets are synth_cxr's: another dataset has only the templates.
    chexpert = registry.Context(dataset=data_registry.get("chexpert"), text=ctx.text, grid=1)
    with pytest.raises(ValueError, match="not a prompt set of dataset 'chexpert'.*templates"):
        zero_shot.run(emb, ctx=chexpert, **dict(options, prompts="sentences"))


def test_a_dataset_without_label_names_is_a_clear_zero_shot_error(tmp_path):
    def encode(texts):
        raise AssertionError("no prompt is encoded without class names")

    entry = data_registry.get("roco")  # report–image pairs, no labels
    ctx = registry.Context(dataset=entry, text=types.SimpleNamespace(encode=encode), grid=1)
    emb = dict(zimg=np.eye(3), labels=np.zeros((3, 0)), logit_scale=1.0)
    with pytest.raises(ValueError, match="dataset 'roco': no label names for zero-shot"):
        zero_shot.run(emb, ctx=ctx, **zero_shot.OPTIONS)
    with pytest.raises(ValueError, match="no label names"):
        zero_shot.plot(emb, str(tmp_path / "roc.png"), ctx=ctx, **zero_shot.OPTIONS)
    assert entry.no_finding_index() == -1  # and grounding scores every box
