"""Few-shot ridge-regression probe on frozen image embeddings, cheap enough to run in training.

After big_vision's ``evaluators/fewshot_lsr.py``. For each k of ``shots`` and each seed, the k-shot
training set is drawn from ``train_split`` (:func:`shot_subset`); a closed-form ridge
regression onto ±1 targets is fitted on its embeddings ``zimg`` and scores the evaluated split:

- features standardised with the k-shot set's own mean and standard deviation (+1e-5), and a
  constant feature of 100 appended: the bias is its weight, so large a feature that the penalty
  hardly touches it (big_vision's way of a nearly unregularised bias);
- targets ``2·y − 1``: ±1 one-hot (multiclass) or multi-hot over the finding classes
  (multilabel; an uncertain −1 entry becomes 0, halfway, as it can be neither);
- ``W = (XᵀX + λI)⁻¹ XᵀY`` with λ = ``l2_reg`` (big_vision's default 2¹⁰), computed as
  ``Xᵀ (XXᵀ + λI)⁻¹ Y`` when the set has fewer examples than features: the same W.

Task as in :mod:`probe` (``auto``: multiclass when every training example has one positive).
Metrics, for each k (``5shot``):

- ``accuracy@5shot`` (multiclass: argmax of the scores, over the evaluated images with one
  positive) or ``auroc@5shot`` (multilabel: macro AUROC of the scores over finding classes),
  the mean over the scored seeds, and ``/std`` (ddof 1; 0.0 with one seed);
- ``train_examples@5shot``, ``skipped_classes@5shot``, ``unscored_seeds@5shot``, and
  ``unscored_classes``, ``eval_examples``: as in :mod:`probe`.
"""

from collections.abc import Sequence

import numpy as np

from region_medclip.evaluators import probe

__all__ = ["OPTIONS", "evaluate", "plot", "ridge_fit", "ridge_scores", "run", "shot_subset"]

# The keys of ``config.evals.<name>`` this evaluator reads, with their defaults.
OPTIONS = dict(
    shots=(1, 5, 10),
    seeds=(0,),
    train_split="train",
    train_examples=0,  # 0: the whole split
    l2_reg=2.0**10,
    task="auto",
    classes=(),  # the classes probed; (): all
)
# The bias feature: big_vision's constant.
BIAS_FEATURE = 100.0


def _design(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``[n, D]`` → ``[n, D + 1]`` standardised features with the constant bias feature."""
    x = (np.asarray(features, np.float64) - mean) / std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)


def ridge_fit(
    features: np.ndarray, targets: np.ndarray, l2_reg: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression of ``targets [n, K]`` (±1) on ``features [n, D]``.

    Returns ``(mean [D], std [D], W [D + 1, K])``: the scores of new features are
    :func:`ridge_scores` of them.
    """
    features = np.asarray(features, np.float64)
    mean, std = features.mean(0), features.std(0) + 1e-5
    x, y = _design(features, mean, std), np.asarray(targets, np.float64)
    n, dim = x.shape
    # The smaller of the two Gram matrices: XᵀX + λI [D+1, D+1] or XXᵀ + λI [n, n]; the push-
    # through identity (XᵀX + λI)⁻¹Xᵀ = Xᵀ(XXᵀ + λI)⁻¹ makes both give the same W.
    if n >= dim:
        w = np.linalg.solve(x.T @ x + l2_reg * np.eye(dim), x.T @ y)
    else:
        w = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
    return mean, std, w


def ridge_scores(features: np.ndarray, mean: np.ndarray, std: np.ndarray, w: np.ndarray):
    """``features [M, D]`` → ``[M, K]`` scores of a :func:`ridge_fit` model."""
    return _design(features, mean, std) @ w


def shot_subset(targets_: probe.Targets, shots: int, seed: int) -> np.ndarray:
    """Sorted indices into ``targets_.train`` of the ``shots``-shot training set of ``seed``.

    Multiclass: the first ``shots`` examples of each class in a random order (big_vision's
    draw). Multilabel: the first ``shots`` positives of each finding class and the first
    ``shots`` examples with no positive finding (normal studies: without them no negative
    need be drawn at all), their union.
    """
    order = np.random.default_rng(seed).permutation(len(targets_.train))
    y = targets_.train[order]
    if targets_.task == "multiclass":
        groups = [y == c for c in range(len(targets_.names))]
    else:
        positive = y == 1
        groups = [*positive.T, ~positive.any(1)]
    return np.unique(np.concatenate([order[np.flatnonzero(g)[:shots]] for g in groups]))


def evaluate(
    train_features: np.ndarray,
    eval_features: np.ndarray,
    targets_: probe.Targets,
    *,
    shots: Sequence[int],
    seeds: Sequence[int],
    l2_reg: float,
) -> dict[str, float]:
    """The metrics of the module docstring for ``train_features [N, D]`` and
    ``eval_features [M, D]`` of the splits whose rows and targets ``targets_`` holds."""
    x_train = np.asarray(train_features, np.float64)[targets_.train_rows]
    x_eval = np.asarray(eval_features, np.float64)[targets_.eval_rows]
    multiclass = targets_.task == "multiclass"
    if multiclass:
        y_train = 2.0 * np.eye(len(targets_.names))[targets_.train] - 1.0
    else:  # 1 → 1, 0 → −1, uncertain → 0
        y_train = np.select([targets_.train == 1, targets_.train == 0], [1.0, -1.0], 0.0)
    out: dict[str, float] = {"eval_examples": float(len(targets_.eval_rows))}
    if not multiclass:
        y = targets_.evaluation
        out["unscored_classes"] = float(np.sum(~((y == 1).any(0) & (y == 0).any(0))))
    for k in shots:
        per_seed = []
        for seed in seeds:
            subset = shot_subset(targets_, k, seed)
            can_train = probe.trainable(targets_, subset)
            scores = ridge_scores(x_eval, *ridge_fit(x_train[subset], y_train[subset], l2_reg))
            metrics = probe.seed_metrics(targets_, scores, can_train)
            per_seed.append(dict(metrics, train_examples=float(len(subset))))
        name = "accuracy" if multiclass else "auroc"
        out.update(probe.summarize(per_seed, f"{k}shot", (name,)))
    return out


def run(
    emb, *, ctx, shots, seeds, train_split, train_examples, l2_reg, task, classes
) -> dict[str, float]:
    """The ``fewshot`` evaluator on ``emb["zimg"] [M, D]`` and ``emb["labels"] [M, C]``,
    trained on ``ctx.embed(train_split, train_examples)`` (see the module docstring).

    Raises:
      ValueError: an unknown ``task``, or the dataset has no label names.
    """
    train = ctx.embed(train_split, train_examples)
    subset = probe.class_subset(ctx, train["labels"], emb["labels"], classes)
    targets_ = probe.targets(*subset, task)
    return evaluate(train["zimg"], emb["zimg"], targets_, shots=shots, seeds=seeds, l2_reg=l2_reg)


def plot(
    emb, path: str, *, ctx, shots, seeds, train_split, train_examples, l2_reg, task, classes
) -> None:
    """The metric against the number of shots, error bars one std over seeds (options as in
    :func:`run`)."""
    out = run(
        emb,
        ctx=ctx,
        shots=shots,
        seeds=seeds,
        train_split=train_split,
        train_examples=train_examples,
        l2_reg=l2_reg,
        task=task,
        classes=classes,
    )
    shots = list(shots)
    name = "accuracy" if f"accuracy@{shots[0]}shot" in out else "auroc"
    series = {name: tuple([out[f"{name}@{k}shot{s}"] for k in shots] for s in ("", "/std"))}
    probe.plot_curves(shots, series, path, xlabel="examples per class", title="few-shot ridge")
