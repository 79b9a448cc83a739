"""Linear probe, fine-tuning probe and few-shot ridge probe: the solver equals scikit-learn, the
subsets are stratified and reproducible, classes a subset cannot train are counted, never NaN."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

from region_medclip.evaluators import common, fewshot, finetune, logistic, probe
from region_medclip.models import clip

FRACTIONS = (0.01, 0.1, 1.0)


def _ctx(class_names, train_emb, calls=None, **extra):
    """A stand-in for ``registry.Context``: the dataset's names and ``embed`` of the train
    split (each call recorded in ``calls``)."""

    def embed(split, max_examples):
        if calls is not None:
            calls.append((split, max_examples))
        return train_emb

    dataset = types.SimpleNamespace(
        class_names=lambda: list(class_names), no_finding_index=lambda: -1
    )
    return types.SimpleNamespace(dataset=dataset, split="test", name="probe", embed=embed, **extra)


def _options(**overrides):
    return {**probe.OPTIONS, **overrides}


def _clusters(n_per_class, num_classes, dim=8, spread=0.3, seed=0):
    """``[n·K, dim]`` features around K far-apart centres and ``[n·K, K]`` one-hot labels."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * np.eye(num_classes, dim)
    classes = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[classes] + spread * rng.normal(size=(len(classes), dim))
    return x.astype(np.float32), np.eye(num_classes, dtype=np.float32)[classes]


def _multilabel(n, dim=8, seed=0, uncertain=0.1):
    """Features and labels of 3 findings plus "no finding": finding k is positive when feature k
    plus noise is high; a fraction of the entries is uncertain (−1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    findings = (x[:, :3] + 0.8 * rng.normal(size=(n, 3)) > 0.7).astype(np.float32)
    findings[rng.random((n, 3)) < uncertain] = -1
    normal = (~(findings == 1).any(1)).astype(np.float32)[:, None]
    return x.astype(np.float32), np.concatenate([findings, normal], 1)


MULTILABEL_NAMES = ["effusion", "nodule", "edema", "no finding"]


def test_binary_logistic_regression_equals_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8))
    y = (x[:, 0] - x[:, 1] + rng.normal(size=120) > 0).astype(int)
    w, b = logistic.fit_binary(x, y, c=0.5)
    # A tight tol: scikit-learn's default (1e-4) stops a little short of the optimum.
    reference = linear_model.LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w, reference.coef_[0], atol=1e-6)
    np.testing.assert_allclose(b, reference.intercept_[0], atol=1e-6)
    x_test = rng.normal(size=(80, 8))
    y_test = (x_test[:, 0] > 0).astype(int)
    probs = scipy.special.expit(x_test @ w + b)
    np.testing.assert_allclose(probs, reference.predict_proba(x_test)[:, 1], atol=1e-7)
    expected = metrics.roc_auc_score(y_test, reference.decision_function(x_test))
    assert common.auroc(x_test @ w + b, y_test) == pytest.approx(expected, abs=1e-12)
    # The default tolerance lands within 1e-3 of the same optimum.
    loose = linear_model.LogisticRegression(C=0.5).fit(x, y)
    np.testing.assert_allclose(w, loose.coef_[0], atol=1e-3)


def test_multinomial_logistic_regression_equals_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 6))
    y = np.argmax(x[:, :3] + 0.7 * rng.normal(size=(150, 3)), axis=1)
    w, b = logistic.fit_multinomial(x, y, 3, c=2.0)
    reference = linear_model.LogisticRegression(C=2.0, tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w, reference.coef_.T, atol=1e-6)
    np.testing.assert_allclose(b, reference.intercept_, atol=1e-6)
    assert abs(b.sum()) < 1e-12
    x_test = rng.normal(size=(90, 6))
    probs = scipy.special.softmax(x_test @ w + b, axis=1)
    np.testing.assert_allclose(probs, reference.predict_proba(x_test), atol=1e-7)
    np.testing.assert_array_equal(probs.argmax(1), reference.predict(x_test))


def test_multilabel_probe_equals_scikit_learn_per_class():
    linear_model = pytest.importorskip("sklearn.linear_model")
    metrics = pytest.importorskip("sklearn.metrics")
    x_train, y_train = _multilabel(160, seed=0)
    x_eval, y_eval = _multilabel(120, seed=1)
    ctx = _ctx(MULTILABEL_NAMES, dict(zimg=x_train, labels=y_train))
    out = probe.run(
        dict(zimg=x_eval, labels=y_eval), ctx=ctx, **_options(fractions=(1.0,), seeds=(0,), l2=0.3)
    )
    expected = []
    for k in range(3):  # the finding classes; uncertain entries left out of fit and score
        known, scored = np.isin(y_train[:, k], (0, 1)), np.isin(y_eval[:, k], (0, 1))
        model = linear_model.LogisticRegression(C=0.3, tol=1e-10, max_iter=10_000)
        model.fit(x_train[known], y_train[known, k])
        scores = model.decision_function(x_eval[scored])
        expected.append(metrics.roc_auc_score(y_eval[scored, k], scores))
    assert out["auroc@100%"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert out["auroc@100%/std"] == 0.0 and out["skipped_classes@100%"] == 0.0
    assert out["train_examples@100%"] == 160.0 and out["eval_examples"] == 120.0


def test_multiclass_probe_keys_sizes_and_separable_accuracy():
    x_train, y_train = _clusters(100, 2)  # 200 examples, 50/50
    x_eval, y_eval = _clusters(40, 2, seed=1)
    ctx = _ctx(["left", "right"], dict(zimg=x_train, labels=y_train))
    out = probe.run(dict(zimg=x_eval, labels=y_eval), ctx=ctx, **_options())
    for name in ("1%", "10%", "100%"):
        for metric in ("accuracy", "macro_f1"):
            assert {f"{metric}@{name}", f"{metric}@{name}/std"} <= set(out)
        assert out[f"skipped_classes@{name}"] == out[f"unscored_seeds@{name}"] == 0.0
    assert "auroc@100%" not in out and "unscored_classes" not in out
    # 1% of 100 is one per class; 10% ten.
    assert out["train_examples@1%"] == 2.0 and out["train_examples@10%"] == 20.0
    assert out["accuracy@100%"] == 1.0 and out["accuracy@100%/std"] == 0.0
    assert out["accuracy@10%"] == 1.0 and out["macro_f1@10%"] == 1.0
    assert all(np.isfinite(v) for v in out.values())


def test_multilabel_probe_separable_and_random_labels():
    rng = np.random.default_rng(0)
    x_train, x_eval = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    separable = lambda x: np.stack([x[:, 0] > 0, x[:, 1] > 0.5, x[:, 0] + x[:, 2] > 0], 1)
    names = ["a", "b", "c"]
    train = dict(zimg=x_train, labels=separable(x_train).astype(np.float32))
    evaluation = dict(zimg=x_eval, labels=separable(x_eval).astype(np.float32))
    options = _options(fractions=(0.1, 1.0), seeds=(0, 1), l2=100.0)
    out = probe.run(evaluation, ctx=_ctx(names, train), **options)
    assert out["auroc@100%"] > 0.99 and out["auroc@10%"] > 0.9
    assert out["auroc@10%/std"] > 0.0 and out["unscored_classes"] == 0.0
    random_labels = lambda n: (rng.random((n, 3)) < 0.4).astype(np.float32)
    train = dict(zimg=x_train, labels=random_labels(300))
    evaluation = dict(zimg=x_eval, labels=random_labels(300))
    out = probe.run(evaluation, ctx=_ctx(names, train), **options)
    assert abs(out["auroc@100%"] - 0.5) < 0.08


def test_subsets_are_stratified_reproducible_and_differ_across_seeds():
    _, labels = _clusters(100, 2)
    targets = probe.targets(labels, labels, ["left", "right"], "auto")
    assert targets.task == "multiclass"
    one = probe.stratified_subset(targets, 0.1, seed=0)
    assert len(one) == 20 and np.bincount(targets.train[one]).tolist() == [10, 10]
    np.testing.assert_array_equal(one, probe.stratified_subset(targets, 0.1, seed=0))
    assert not np.array_equal(one, probe.stratified_subset(targets, 0.1, seed=1))
    # Nested across fractions for one seed.
    assert set(probe.stratified_subset(targets, 0.01, seed=0)) <= set(one)
    assert len(probe.stratified_subset(targets, 1.0, seed=3)) == 200

    # Halves round up: 1% of 250 is 3, of 150 is 2 (half to even would take 2 and 2).
    classes = np.repeat([0, 1], [250, 150])
    targets = probe.targets(np.eye(2)[classes], np.eye(2), ["a", "b"], "multiclass")
    counts = np.bincount(targets.train[probe.stratified_subset(targets, 0.01, seed=0)])
    assert counts.tolist() == [3, 2]

    # Multilabel: 1000 examples with 300, 100 and 20 positives (overlapping), the rest normal.
    labels = np.zeros((1000, 4), np.float32)
    labels[:300, 0] = 1
    labels[250:350, 1] = 1
    labels[340:360, 2] = 1
    labels[:, 3] = labels[:, :3].sum(1) == 0
    targets = probe.targets(labels, labels, ["a", "b", "c", "no finding"], "auto")
    assert targets.task == "multilabel" and targets.names == ["a", "b", "c"]
    for fraction, expected in ((0.1, [30, 10, 2]), (0.01, [3, 1, 1])):
        subset = probe.stratified_subset(targets, fraction, seed=0)
        positives = (targets.train[subset] == 1).sum(0)
        assert np.all(np.abs(positives - expected) <= 1) and np.all(positives >= 1)
        assert abs(len(subset) - 1000 * fraction) <= 2
    a, b = (probe.stratified_subset(targets, 0.1, seed=s) for s in (0, 1))
    np.testing.assert_array_equal(a, probe.stratified_subset(targets, 0.1, seed=0))
    assert not np.array_equal(a, b)


def test_multilabel_subset_keeps_a_positive_of_a_class_the_rarer_ones_placed():
    # Findings a = {0, 1}, b = {2, 3}, c = {1, 2}: a and b (as rare, and first) each put one of
    # their positives in the 1% subset; in one seed of four those are 0 and 3, and c's
    # positives have all gone to the rest: one of them is moved in.
    labels = np.zeros((100, 3), np.float32)
    labels[[0, 1], 0] = labels[[2, 3], 1] = labels[[1, 2], 2] = 1
    targets = probe.targets(labels, labels, ["a", "b", "c"], "multilabel")
    for seed in range(20):
        subset = probe.stratified_subset(targets, 0.01, seed=seed)
        assert np.all((targets.train[subset] == 1).any(0)), seed


def test_a_class_without_positives_is_counted_and_left_out_of_the_macro():
    x_train, y_train = _multilabel(120, seed=0, uncertain=0.0)
    x_eval, y_eval = _multilabel(80, seed=1, uncertain=0.0)
    y_train[:, 1] = 0  # "nodule": no positive in any training subset
    ctx = _ctx(MULTILABEL_NAMES, dict(zimg=x_train, labels=y_train))
    evaluation = dict(zimg=x_eval, labels=y_eval)
    out = probe.run(evaluation, ctx=ctx, **_options(fractions=(0.1, 1.0), seeds=(0, 1, 2)))
    assert out["skipped_classes@10%"] == out["skipped_classes@100%"] == 3.0  # one per seed
    assert np.isfinite(out["auroc@10%"]) and np.isfinite(out["auroc@100%"])
    assert out["unscored_seeds@10%"] == 0.0
    # No class trainable at all: NaN, and the count says why.
    y_train[:, :3] = 0
    out = probe.run(evaluation, ctx=ctx, **_options(fractions=(1.0,), seeds=(0, 1)))
    assert np.isnan(out["auroc@100%"]) and out["unscored_seeds@100%"] == 2.0
    assert out["skipped_classes@100%"] == 6.0
    # A finding without positives on the evaluated split is left out of every macro.
    y_eval[:, 2] = 0
    ctx = _ctx(MULTILABEL_NAMES, dict(zimg=x_eval, labels=y_eval))
    out = probe.run(evaluation, ctx=ctx, **_options())
    assert out["unscored_classes"] == 1.0 and np.isfinite(out["auroc@1%"])


def test_multiclass_with_one_training_class_is_unscored():
    x, labels = _clusters(20, 3)
    train = dict(zimg=x[:20], labels=labels[:20])  # class 0 only
    out = probe.run(
        dict(zimg=x, labels=labels), ctx=_ctx(["a", "b", "c"], train), **_options(task="multiclass")
    )
    assert np.isnan(out["accuracy@10%"]) and out["unscored_seeds@10%"] == 3.0
    assert out["skipped_classes@10%"] == 6.0  # two absent classes, three seeds


def test_plot_reuses_the_run_before_it(tmp_path):
    x_train, y_train = _clusters(30, 3)
    calls = []
    ctx = _ctx(["a", "b", "c"], dict(zimg=x_train, labels=y_train), calls)
    emb = dict(zimg=x_train, labels=y_train)
    options = _options(fractions=(0.1, 1.0), seeds=(0, 1))
    probe.run(emb, ctx=ctx, **options)
    probe.plot(emb, str(tmp_path / "probe.png"), ctx=ctx, **options)
    assert len(calls) == 1 and (tmp_path / "probe.png").stat().st_size > 0
    probe.plot(emb, str(tmp_path / "other.png"), ctx=ctx, **dict(options, l2=2.0))
    assert len(calls) == 2
    few = dict(fewshot.OPTIONS, shots=(1, 2))
    fewshot.plot(emb, str(tmp_path / "fewshot.png"), ctx=ctx, **few)
    assert (tmp_path / "fewshot.png").stat().st_size > 0


@pytest.mark.parametrize("examples", [6, 40])  # the dual form (n < D + 1) and the primal one
def test_ridge_equals_a_direct_solve(examples):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, 9))
    classes = np.arange(examples) % 2
    y = 2.0 * np.eye(2)[classes] - 1.0
    mean, std, w = fewshot.ridge_fit(x, y, l2_reg=3.0)
    design = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-5), np.full((examples, 1), 100.0)], 1)
    expected = np.linalg.solve(design.T @ design + 3.0 * np.eye(10), design.T @ y)
    np.testing.assert_allclose(w, expected, rtol=1e-8, atol=1e-10)
    x_test = rng.normal(size=(5, 9))
    test_design = np.concatenate([(x_test - mean) / std, np.full((5, 1), 100.0)], 1)
    np.testing.assert_allclose(fewshot.ridge_scores(x_test, mean, std, w), test_design @ expected)


def test_fewshot_on_separated_clusters():
    x_train, y_train = _clusters(50, 4, dim=4, seed=0)
    x_eval, y_eval = _clusters(25, 4, dim=4, seed=1)
    ctx = _ctx(["a", "b", "c", "d"], dict(zimg=x_train, labels=y_train))
    options = dict(fewshot.OPTIONS, seeds=(0, 1))
    out = fewshot.run(dict(zimg=x_eval, labels=y_eval), ctx=ctx, **options)
    for k in (1, 5, 10):
        assert out[f"accuracy@{k}shot"] == 1.0 and out[f"accuracy@{k}shot/std"] == 0.0
        assert out[f"train_examples@{k}shot"] == 4.0 * k
        assert out[f"skipped_classes@{k}shot"] == out[f"unscored_seeds@{k}shot"] == 0.0
    targets = probe.targets(y_train, y_eval, ["a", "b", "c", "d"], "auto")
    assert not np.array_equal(*(fewshot.shot_subset(targets, 1, s) for s in (0, 1)))


def test_fewshot_multilabel_draws_positives_of_each_finding_and_normals():
    x_train, y_train = _multilabel(200, seed=0)
    x_eval, y_eval = _multilabel(150, seed=1)
    targets = probe.targets(y_train, y_eval, MULTILABEL_NAMES, "auto")
    subset = fewshot.shot_subset(targets, 5, seed=0)
    assert np.all((targets.train[subset] == 1).sum(0) >= 5)
    assert np.sum(~(targets.train[subset] == 1).any(1)) == 5  # five normal studies
    ctx = _ctx(MULTILABEL_NAMES, dict(zimg=x_train, labels=y_train))
    out = fewshot.run(dict(zimg=x_eval, labels=y_eval), ctx=ctx, **fewshot.OPTIONS)
    assert set(out) >= {"auroc@1shot", "auroc@10shot/std", "skipped_classes@5shot"}
    assert out["auroc@10shot"] > 0.7 and out["unscored_classes"] == 0.0


@pytest.fixture(scope="module")
def tiny_model():
    model = clip.RegionCLIP(
        image=dict(variant="mu/16"),
        text=dict(kind="clip", variant="mu", vocab_size=100, context_len=16),
        region=dict(roi_size=2, sampling_ratio=2),
        embed_dim=32,
    )
    images = jnp.zeros((1, 32, 32, 3))
    tokens = jnp.zeros((1, 16), jnp.int32)
    boxes = jnp.asarray([[[0.1, 0.1, 0.6, 0.6]]])
    # Jitted: op by op, initialising the three towers takes longer than compiling it.
    params = jax.jit(model.init)(jax.random.key(0), images, tokens, boxes, jnp.ones((1, 1), bool))
    return model, params["params"]


def test_finetune_trains_the_image_tower_only(tiny_model):
    model, params = tiny_model
    before = jax.tree.map(np.array, params)
    rng = np.random.default_rng(0)
    first_channel = rng.normal(size=(16, 32, 32)).astype(np.float32)
    targets = np.stack([np.arange(16) % 2, np.full(16, -1.0)], 1).astype(np.float32)
    optimizer = optax.adam(1e-2)
    step_fn = finetune.make_step_fn(model, optimizer, finetune.multilabel_loss)
    trainable = finetune.finetune(
        model,
        params,
        first_channel,
        targets,
        num_outputs=2,
        step_fn=step_fn,
        optimizer=optimizer,
        steps=2,
        batch_size=4,
        seed=0,
    )
    tuned = finetune.tuned_params(params, trainable)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.device_get(tuned))
    assert all(jax.tree.leaves(changed[finetune.IMAGE_TOWER]))
    for name in set(params) - {finetune.IMAGE_TOWER}:  # text, regions, temperature: untouched
        assert not any(jax.tree.leaves(changed[name])), name
    # The caller's params are not donated nor changed.
    same = jax.tree.map(np.array_equal, before, jax.device_get(params))
    assert all(jax.tree.leaves(same))
    # The uncertain column is masked: its head weights get no gradient.
    assert np.all(np.asarray(trainable["head"]["kernel"])[:, 1] == 0)


def test_finetune_option_of_the_probe(tiny_model):
    model, params = tiny_model
    rng = np.random.default_rng(1)
    labels = np.eye(2, dtype=np.float32)[np.arange(16) % 2]
    train = dict(images=rng.normal(size=(16, 32, 32)).astype(np.float32), labels=labels)
    evaluation = dict(images=train["images"][:10], labels=labels[:10], zimg=np.zeros((10, 32)))
    ctx = _ctx(["left", "right"], train, model=model, params=params)
    options = _options(
        fractions=(0.5, 1.0), seeds=(0,), finetune=True, finetune_steps=2, finetune_batch=4
    )
    out = probe.run(evaluation, ctx=ctx, **options)
    assert out["train_examples@50%"] == 8.0 and out["eval_examples"] == 10.0
    for key in ("accuracy@50%", "accuracy@100%", "macro_f1@100%"):
        assert 0.0 <= out[key] <= 1.0


def test_classes_restricts_the_probe_to_named_findings():
    x_train, y_train = _multilabel(120, seed=0, uncertain=0.0)
    x_eval, y_eval = _multilabel(80, seed=1, uncertain=0.0)
    ctx = _ctx(MULTILABEL_NAMES, dict(zimg=x_train, labels=y_train))
    evaluation = dict(zimg=x_eval, labels=y_eval)
    kept = MULTILABEL_NAMES[0:2]
    out = probe.run(evaluation, ctx=ctx, **_options(fractions=(1.0,), seeds=(0,), classes=kept))
    # The same probe on the two columns alone, with their names.
    alone = _ctx(kept, dict(zimg=x_train, labels=y_train[:, 0:2]))
    columns = dict(zimg=x_eval, labels=y_eval[:, 0:2])
    expected = probe.run(columns, ctx=alone, **_options(fractions=(1.0,), seeds=(0,)))
    assert out["auroc@100%"] == expected["auroc@100%"]
    with pytest.raises(ValueError, match=r"config.evals.probe.classes: \[.pneumonia.\]"):
        probe.run(evaluation, ctx=ctx, **_options(classes=("pneumonia",)))
