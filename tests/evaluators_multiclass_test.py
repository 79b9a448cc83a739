"""The ``multiclass`` evaluator (CheXpert 5x200's protocol) on a hand-built case, its macro F1
against scikit-learn, the CheXpert combinatorial prompts, and the ``zero_shot`` evaluator's
``class_names=`` and ``classes=`` options."""

import types

import numpy as np
import pytest

from region_medclip.data import prompts_chexpert
from region_medclip.data import registry as data_registry
from region_medclip.data.prompts import template_prompts
from region_medclip.evaluators import common, multiclass, registry, zero_shot

NAMES = ("atelectasis", "nodule", "effusion")


def _oracle_encoder(names, width: int):
    """``list[str] → [n, width]``: the direction of the finding a text names (longest name
    first), ``width - 1`` for its negations; a text naming none points at "no finding" (or
    direction 0)."""
    findings = sorted((n for n in names if not n.startswith("no ")), key=len, reverse=True)
    normal = names.index("no finding") if "no finding" in names else 0

    def encode(texts):
        out = np.zeros((len(texts), width))
        for i, text in enumerate(texts):
            lower = text.lower()
            name = next((n for n in findings if n in lower), None)
            negated = lower.startswith(("no ", "there is no", "findings: no", "impression: no"))
            column = normal if name is None else (width - 1 if negated else names.index(name))
            out[i, column] = 1.0
        return out

    return encode


def _context(entry, names, width: int = 3, name: str = "five"):
    encoder = types.SimpleNamespace(encode=_oracle_encoder(list(names), width))
    return registry.Context(dataset=entry, text=encoder, grid=1, name=name)


def _entry(label_names=NAMES):
    return data_registry.Dataset("toy", builder=lambda: None, label_names=label_names)


# Eight films: six with one positive (two of them read wrong), one with none, one with two.
LABELS = np.array(
    [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0], [1, 1, 0]],
    np.float32,
)
ZIMG = np.array(
    [[1, 0, 0], [0.2, 1, 0], [0, 1, 0], [0, 1, 0.3], [1, 0.2, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]]
)


def _run(**options):
    emb = dict(zimg=ZIMG, labels=LABELS, logit_scale=10.0)
    options = dict(multiclass.OPTIONS, bootstrap=50, **options)
    return multiclass.run(emb, ctx=_context(_entry(), NAMES), **options)


def test_multiclass_metrics_by_hand():
    out = _run()
    # Targets [a, a, n, n, e, e], predictions [a, n, n, n, a, e].
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["accuracy/ci_low"] <= out["accuracy"] <= out["accuracy/ci_high"]
    # F1 = 2tp / (2tp + fp + fn): atelectasis 2/4, nodule 4/5, effusion 2/3.
    assert out["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert out["accuracy/atelectasis"] == 0.5
    assert out["accuracy/nodule"] == 1.0
    assert out["accuracy/effusion"] == 0.5
    assert out["images_left_out"] == 2.0  # no positive, and two


def test_multiclass_chooses_among_the_given_classes_only():
    out = _run(classes=("Nodule", "effusion"))
    # Among nodule and effusion: films 2, 3, 7 are nodule, 4, 5 effusion (film 7's atelectasis
    # is not a class here); films 0, 1 and 6 have neither. Predictions [n, n, e, n, e].
    assert out["images_left_out"] == 3.0
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["accuracy/nodule"] == pytest.approx(2 / 3) and out["accuracy/effusion"] == 0.5
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert "accuracy/atelectasis" not in out


def test_multiclass_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config.evals.five.classes: \['pneumonia'\] are not"):
        _run(classes=("nodule", "pneumonia"))
    with pytest.raises(ValueError, match="no image of 'toy' has exactly one positive"):
        emb = dict(zimg=ZIMG[6:7], labels=LABELS[6:7], logit_scale=1.0)
        multiclass.run(emb, ctx=_context(_entry(), NAMES), **multiclass.OPTIONS)


def test_macro_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(30):
        classes = int(rng.integers(2, 7))
        n = int(rng.integers(3, 80))
        targets, predicted = rng.integers(0, classes, n), rng.integers(0, classes, n)
        expected = metrics.f1_score(targets, predicted, average="macro")
        assert common.macro_f1(predicted, targets, classes) == pytest.approx(expected, abs=1e-12)
        names = [f"class {k}" for k in range(classes)]
        out = multiclass.metrics(predicted, targets, names, bootstrap=10)
        assert out["macro_f1"] == pytest.approx(expected, abs=1e-12)
        recall = metrics.recall_score(
            targets, predicted, average=None, labels=range(classes), zero_division=0
        )
        for k, name in enumerate(names):
            if (targets == k).any():
                assert out[f"accuracy/{name}"] == pytest.approx(recall[k])


def test_chexpert_prompts_sample_the_combinations_of_each_competition_class():
    names = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion"]
    positive, negative = prompts_chexpert.chexpert_prompts([*names, "no finding"])
    assert negative is None
    for name, prompts in zip(names, positive, strict=False):
        every = prompts_chexpert.combinations(name)
        assert len(prompts) == 5 == len(set(prompts)) and set(prompts) <= set(every)
        assert not any("  " in p or p != p.strip() for p in prompts)
    assert positive[-1] == template_prompts(["no finding"])[0]
    assert prompts_chexpert.chexpert_prompts(names)[0] == positive[:5]  # deterministic
    assert prompts_chexpert.chexpert_prompts(names, seed=1)[0] != positive[:5]
    assert "mild linear atelectasis at the lung bases" in prompts_chexpert.combinations(
        "atelectasis"
    )
    every, _ = prompts_chexpert.chexpert_all_prompts(["edema", "nodule"])
    assert every == [prompts_chexpert.combinations("edema"), template_prompts(["nodule"])[0]]
    # CheXpert-labelled datasets, 5x200 among them, have both sets; others only the templates.
    for dataset in ("chexpert", "chexpert_5x200", "mimic_cxr"):
        entry = data_registry.get(dataset)
        assert entry.prompts("combinatorial", names)[0] == positive[:5]
    with pytest.raises(ValueError, match="not a prompt set of dataset 'roco'"):
        data_registry.get("roco").prompts("combinatorial", names)


def _multilabel_split():
    """Four films of ``no finding, nodule, mass`` pointing at their findings' directions."""
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]], np.float32)
    zimg = np.array([[1, 0, 0, 0.5], [0, 1, 0, 0.5], [0, 0, 1, 0.5], [0, 1, 0, 0.5]])
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    return dict(zimg=zimg, labels=labels, logit_scale=10.0)


def test_zero_shot_class_names_name_the_labels_of_a_dataset_without_names():
    names = ("no finding", "nodule", "mass")
    ctx = _context(data_registry.get("roco"), names, width=4, name="mine")
    emb = _multilabel_split()
    options = dict(zero_shot.OPTIONS, bootstrap=20, class_names=names)
    out = zero_shot.run(emb, ctx=ctx, **options)
    assert out["auroc/nodule"] == out["auroc/mass"] == out["macro_auroc"] == 1.0
    assert out["top1"] == 1.0
    with pytest.raises(ValueError, match="config.evals.mine.class_names: 2 names for 3 labels"):
        zero_shot.run(emb, ctx=ctx, **dict(options, class_names=("nodule", "mass")))
    with pytest.raises(ValueError, match="no label names .* set config.evals.mine.class_names"):
        zero_shot.run(emb, ctx=ctx, **dict(zero_shot.OPTIONS, bootstrap=20))
    only = zero_shot.run(emb, ctx=ctx, **dict(options, classes=("mass",)))
    assert only["auroc/mass"] == 1.0 and "auroc/nodule" not in only
    with pytest.raises(ValueError, match=r"config.evals.mine.classes: \['edema'\] are not"):
        zero_shot.run(emb, ctx=ctx, **dict(options, classes=("edema",)))
    # multiclass reads the same names (the first three films have one positive each).
    first = dict(emb, zimg=emb["zimg"][:3], labels=emb["labels"][:3])
    single_options = dict(multiclass.OPTIONS, bootstrap=20, class_names=names)
    single = multiclass.run(first, ctx=ctx, **single_options)
    assert single["accuracy"] == 1.0 and single["images_left_out"] == 0.0
