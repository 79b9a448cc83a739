"""Linear probes: a classifier trained on a label fraction of one split, scored on another.

The protocol of ConVIRT, GLoRIA and MedCLIP. For each fraction of ``fractions`` and each seed of
``seeds`` a stratified subset of ``train_split`` (:func:`stratified_subset`) trains a logistic
regression (:mod:`logistic`, scikit-learn's objective ``0.5·‖W‖² + l2·Σ loss``, the bias not
penalised) on the frozen image embeddings ``zimg``; the evaluated split scores it. With
``finetune=True`` the image tower is fine-tuned together with a linear head instead
(:mod:`finetune`).

- Task (``task="auto"``): ``multiclass`` when every training example has exactly one positive
  label among all classes, else ``multilabel``.
- Multilabel: one binary model per finding class (names not starting with "no "), uncertain
  (−1) entries left out of that class's training and scoring; macro AUROC over classes.
- Multiclass: one softmax model over all classes (a binary one when a subset holds two, as
  scikit-learn does); accuracy and macro F1 over the evaluated images with exactly one positive.

Metrics, for each fraction written as a percent (``1%``, ``10%``, ``100%``):

- ``auroc@1%`` (multilabel), ``accuracy@1%`` and ``macro_f1@1%`` (multiclass): the mean over
  the seeds whose subset could be scored, each with ``<metric>@1%/std``, their sample standard
  deviation (ddof 1; 0.0 with one such seed; NaN with the metric). The full set (100%) is the
  same for every seed: the frozen probe is fitted once and its std is 0; fine-tuning still
  differs by seed.
- ``train_examples@1%``: the subset size, mean over seeds.
- ``skipped_classes@1%``: summed over seeds, the classes a seed's subset cannot train
  (multilabel: no positive or no negative; multiclass: no example). They are left out of that
  seed's macro AUROC; in the multiclass case the model never predicts them.
- ``unscored_seeds@1%``: seeds whose subset could not be scored at all (multilabel: no class
  both trainable and scorable; multiclass: fewer than two classes), left out of the mean; the
  metric is NaN only when every seed is.
- ``unscored_classes`` (multilabel): finding classes without both a positive and a negative
  on the evaluated split, left out of every macro AUROC.
- ``eval_examples``: the evaluated images scored.

Subsets depend only on the labels and the seed, so every checkpoint is probed on the same ones.
At 100% the frozen probe fits every finding class on the whole training split: on a large one,
``train_examples`` caps it (and the embedding pass).
"""

import dataclasses
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from region_medclip.evaluators import common, logistic, plots, zero_shot
from region_medclip.evaluators import finetune as finetune_lib

__all__ = [
    "OPTIONS",
    "Targets",
    "fraction_name",
    "frozen_score_fn",
    "plot",
    "plot_curves",
    "probe",
    "resolve_task",
    "run",
    "seed_metrics",
    "stratified_subset",
    "summarize",
    "targets",
    "trainable",
]

TASKS = ("auto", "multilabel", "multiclass")
# The keys of ``config.evals.<name>`` this evaluator reads, with their defaults.
OPTIONS = dict(
    fractions=(0.01, 0.1, 1.0),
    seeds=(0, 1, 2),
    train_split="train",
    train_examples=0,  # 0: the whole split
    task="auto",
    l2=1.0,  # scikit-learn's C: the weight of the summed loss against 0.5·‖W‖²
    max_iter=1000,
    finetune=False,
    finetune_steps=200,
    finetune_lr=1e-4,
    finetune_batch=32,
    classes=(),  # the classes probed (CheXpert: the five competition findings); (): all
)


def fraction_name(fraction: float) -> str:
    """``0.01 → "1%"``, ``1.0 → "100%"``, ``0.005 → "0.5%"``."""
    return f"{100 * fraction:g}%"


def resolve_task(labels: np.ndarray, task: str) -> str:
    """``multiclass`` or ``multilabel`` for training ``labels [N, C]`` (see the module
    docstring for ``auto``).

    Raises:
      ValueError: ``task`` is not one of :data:`TASKS`.
    """
    if task not in TASKS:
        raise ValueError(f"config.evals.*.task: {task!r} is not one of {TASKS}")
    if task != "auto":
        return task
    return "multiclass" if bool(np.all((labels == 1).sum(1) == 1)) else "multilabel"


@dataclasses.dataclass(frozen=True)
class Targets:
    """What a probe learns and is scored on.

    Attributes:
      task: ``multilabel`` or ``multiclass``.
      names: ``[K]`` the names of the scored classes (multilabel: the finding classes).
      train: multilabel ``[N, K]`` float (1, 0; anything else is left out); multiclass ``[N]``
        int classes.
      train_rows: ``[N]`` the rows of the training split they belong to.
      evaluation, eval_rows: the same on the evaluated split.
    """

    task: str
    names: list[str]
    train: np.ndarray
    train_rows: np.ndarray
    evaluation: np.ndarray
    eval_rows: np.ndarray


def _single_label(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``labels [N, C]`` → (``[M]`` int class, ``[M]`` rows) of the rows with one positive."""
    rows = np.flatnonzero((labels == 1).sum(1) == 1)
    return np.argmax(labels[rows] == 1, axis=1), rows


def targets(train_labels, eval_labels, class_names: list[str], task: str) -> Targets:
    """:class:`Targets` from ``labels [N, C]`` of the two splits with the dataset's
    ``class_names [C]`` (``task`` as in :func:`resolve_task`)."""
    train_labels, eval_labels = np.asarray(train_labels), np.asarray(eval_labels)
    task = resolve_task(train_labels, task)
    if task == "multiclass":
        train, train_rows = _single_label(train_labels)
        evaluation, eval_rows = _single_label(eval_labels)
        return Targets(task, list(class_names), train, train_rows, evaluation, eval_rows)
    findings = [c for c, name in enumerate(class_names) if not name.startswith("no ")]
    return Targets(
        task,
        [class_names[c] for c in findings],
        train_labels[:, findings].astype(np.float64),
        np.arange(len(train_labels)),
        eval_labels[:, findings].astype(np.float64),
        np.arange(len(eval_labels)),
    )


def class_subset(ctx, train_labels, eval_labels, classes) -> tuple:
    """``(train labels [N, C'], eval labels [M, C'], names [C'])`` of ``classes`` (all for
    ``()``) among the dataset's label names.

    Raises:
      ValueError: the dataset has no label names, or naming an unknown class.
    """
    names = ctx.dataset.class_names()
    keep = zero_shot.selected(names, classes, f"config.evals.{ctx.name or '*'}.classes")
    train_labels, eval_labels = np.asarray(train_labels), np.asarray(eval_labels)
    return train_labels[:, keep], eval_labels[:, keep], [names[c] for c in keep]


def _round(x: float) -> int:
    """Rounds half up (Python's ``round`` rounds half to even: 0.5 → 0)."""
    return int(np.floor(x + 0.5))


def _multiclass_subset(classes: np.ndarray, fraction: float, order: np.ndarray) -> np.ndarray:
    """``round(fraction · count)`` examples of each class, at least one, first in ``order``."""
    picked = []
    for c in np.unique(classes):
        members = order[classes[order] == c]
        picked.append(members[: max(1, _round(fraction * len(members)))])
    return np.concatenate(picked)


def _multilabel_subset(positive: np.ndarray, fraction: float, order: np.ndarray) -> np.ndarray:
    """Iterative stratification (Sechidis et al., 2011) of ``positive [N, K]`` into a subset of
    ``fraction`` and the rest, one class at a time, rarest first.

    Each class wants ``round(fraction · positives)`` positives in the subset (at least one) and
    the others in the rest; the examples with a positive of the class that no rarer class has
    placed go, in ``order``, to whichever side lacks more, so both end as close to their
    counts as the earlier classes allow. (The published algorithm places one example at a time;
    for one class with two sides that comes to this split.) A class whose positives all went to
    the rest then gets its first positive moved in, and examples with no positive fill the
    subset up to ``round(fraction · N)``.
    """
    positive = positive[order]
    counts = positive.sum(0)
    want = np.where(counts > 0, np.maximum(1, np.floor(fraction * counts + 0.5)), 0)
    placed, chosen = np.zeros(len(order), bool), np.zeros(len(order), bool)
    for c in np.argsort(counts, kind="stable"):
        free = np.flatnonzero(positive[:, c] & ~placed)
        lack_subset = want[c] - positive[chosen, c].sum()
        lack_rest = counts[c] - want[c] - positive[placed & ~chosen, c].sum()
        take = int(np.clip(_round((len(free) + lack_subset - lack_rest) / 2), 0, len(free)))
        chosen[free[:take]] = True
        placed[free] = True
    for c in np.flatnonzero((counts > 0) & ~positive[chosen].any(0)):
        chosen[np.flatnonzero(positive[:, c])[0]] = True
    free = np.flatnonzero(~placed)
    chosen[free[: max(0, _round(fraction * len(order)) - int(chosen.sum()))]] = True
    return order[chosen]


def stratified_subset(targets_: Targets, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices into ``targets_.train`` of the ``fraction`` subset drawn with ``seed``.

    Multiclass: ``round(fraction · count)`` examples of each class (half up), at least one
    where the class occurs; one seed's subsets are nested across fractions. Multilabel:
    :func:`_multilabel_subset`, which keeps each finding's positive rate and puts at least one
    positive of every finding that has one in the subset. ``fraction ≥ 1``: every example.
    """
    n = len(targets_.train)
    if fraction >= 1:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    if targets_.task == "multiclass":
        subset = _multiclass_subset(targets_.train, fraction, order)
    else:
        subset = _multilabel_subset(targets_.train == 1, fraction, order)
    return np.sort(subset)


def trainable(targets_: Targets, subset: np.ndarray) -> np.ndarray:
    """``[K]`` bool: the classes ``subset`` can train (multilabel: with a positive and a
    negative; multiclass: with an example)."""
    y = targets_.train[subset]
    if targets_.task == "multiclass":
        return np.bincount(y, minlength=len(targets_.names)) > 0
    return (y == 1).any(0) & (y == 0).any(0)


# (indices into targets.train [n], trainable [K], seed) → scores [M, K] of the evaluated rows.
ScoreFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def frozen_score_fn(
    train_features: np.ndarray,
    eval_features: np.ndarray,
    targets_: Targets,
    *,
    l2: float,
    max_iter: int,
) -> ScoreFn:
    """The frozen-embedding probe: logistic regression on ``train_features [N_split, D]``
    (rows ``targets_.train_rows``), scores ``[M, K]`` of ``eval_features`` (rows
    ``targets_.eval_rows``); the columns of classes that are not trainable are left at 0."""
    x_train = np.asarray(train_features, np.float64)[targets_.train_rows]
    x_eval = np.asarray(eval_features, np.float64)[targets_.eval_rows]

    def score_fn(subset, can_train, seed):
        del seed  # L-BFGS from zero is deterministic
        x, y = x_train[subset], targets_.train[subset]
        scores = np.zeros((len(x_eval), len(targets_.names)))
        if targets_.task == "multilabel":
            for k in np.flatnonzero(can_train):
                known = (y[:, k] == 0) | (y[:, k] == 1)
                w, b = logistic.fit_binary(x[known], y[known, k], c=l2, max_iter=max_iter)
                scores[:, k] = x_eval @ w + b
            return scores
        present = np.flatnonzero(can_train)
        local = np.searchsorted(present, y)
        if len(present) == 2:  # scikit-learn fits one binary model for two classes
            w, b = logistic.fit_binary(x, local, c=l2, max_iter=max_iter)
            scores[:, present[1]] = x_eval @ w + b
            return scores
        w, b = logistic.fit_multinomial(x, local, len(present), c=l2, max_iter=max_iter)
        scores[:, present] = x_eval @ w + b
        return scores

    return score_fn


def seed_metrics(targets_: Targets, scores: np.ndarray, can_train: np.ndarray) -> dict:
    """One seed's metrics from ``scores [M, K]`` of the evaluated rows and ``can_train [K]``:
    ``auroc`` or ``accuracy`` and ``macro_f1`` (NaN when the subset cannot be scored, or no
    evaluated row can) and ``skipped_classes``."""
    skipped = float(np.sum(~can_train))
    if targets_.task == "multiclass":
        if can_train.sum() < 2 or not len(targets_.evaluation):
            return dict(accuracy=np.nan, macro_f1=np.nan, skipped_classes=skipped)
        # A class the subset lacks is never predicted.
        predictions = np.argmax(np.where(can_train, scores, -np.inf), axis=1)
        y = targets_.evaluation
        accuracy = float(np.mean(predictions == y))
        macro_f1 = common.macro_f1(predictions, y, len(targets_.names))
        return dict(accuracy=accuracy, macro_f1=macro_f1, skipped_classes=skipped)
    per_class = [
        common.auroc(scores[:, k], targets_.evaluation[:, k]) for k in np.flatnonzero(can_train)
    ]
    finite = [a for a in per_class if np.isfinite(a)]
    return dict(auroc=float(np.mean(finite)) if finite else np.nan, skipped_classes=skipped)


def summarize(per_seed: list[dict], suffix: str, metric_names: Sequence[str]) -> dict:
    """Mean and ``/std`` of each metric over the seeds where it is finite, the summed
    ``skipped_classes``, the mean ``train_examples`` and the count of ``unscored_seeds``, with
    keys ``<name>@<suffix>`` (see the module docstring)."""
    out = {}
    for name in metric_names:
        values = np.array([s[name] for s in per_seed], np.float64)
        values = values[np.isfinite(values)]
        out[f"{name}@{suffix}"] = float(values.mean()) if len(values) else np.nan
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[f"{name}@{suffix}/std"] = std if len(values) else np.nan
    first = metric_names[0]
    out[f"train_examples@{suffix}"] = float(np.mean([s["train_examples"] for s in per_seed]))
    out[f"skipped_classes@{suffix}"] = float(sum(s["skipped_classes"] for s in per_seed))
    out[f"unscored_seeds@{suffix}"] = float(sum(not np.isfinite(s[first]) for s in per_seed))
    return out


def probe(
    targets_: Targets,
    score_fn: ScoreFn,
    *,
    fractions: Sequence[float],
    seeds: Sequence[int],
    seed_dependent: bool,
) -> dict[str, float]:
    """Every fraction × seed of ``score_fn`` (``seed_dependent``: whether a seed changes its
    scores on the same subset; if not, the full set is fitted once) → the module's metrics."""
    metric_names = ("accuracy", "macro_f1") if targets_.task == "multiclass" else ("auroc",)
    out: dict[str, float] = {"eval_examples": float(len(targets_.eval_rows))}
    if targets_.task == "multilabel":
        y = targets_.evaluation
        scorable = (y == 1).any(0) & (y == 0).any(0)
        out["unscored_classes"] = float(np.sum(~scorable))
    for fraction in fractions:
        per_seed = []
        for seed in seeds:
            if fraction >= 1 and per_seed and not seed_dependent:
                per_seed.append(per_seed[0])
                continue
            subset = stratified_subset(targets_, fraction, seed)
            can_train = trainable(targets_, subset)
            metrics = seed_metrics(targets_, score_fn(subset, can_train, seed), can_train)
            per_seed.append(dict(metrics, train_examples=float(len(subset))))
        out.update(summarize(per_seed, fraction_name(fraction), metric_names))
    return out


# The metrics of the last `run`, for the `plot` that follows it on the same embeddings: the
# probes (fine-tuning above all) are too slow to fit twice. Held by a weak reference to the
# evaluated zimg array, so a result never outlives the embeddings it was computed on.
_last_run: dict = {}


def run(
    emb,
    *,
    ctx,
    fractions,
    seeds,
    train_split,
    train_examples,
    task,
    l2,
    max_iter,
    finetune,
    finetune_steps,
    finetune_lr,
    finetune_batch,
    classes,
) -> dict[str, float]:
    """The ``linear_probe`` evaluator on ``emb["zimg"] [M, D]``, ``emb["labels"] [M, C]``,
    trained on ``ctx.embed(train_split, train_examples)`` (see the module docstring).

    Raises:
      ValueError: an unknown ``task``, or the dataset has no label names.
    """
    # The options as `plot` receives them, to recognise the run it follows.
    options = {key: value for key, value in locals().items() if key in OPTIONS}
    train = ctx.embed(train_split, train_examples)
    targets_ = targets(*class_subset(ctx, train["labels"], emb["labels"], classes), task)
    if finetune:
        score_fn = finetune_lib.score_fn(
            ctx.model,
            ctx.params,
            train["images"],
            emb["images"],
            targets_,
            steps=finetune_steps,
            learning_rate=finetune_lr,
            batch_size=finetune_batch,
        )
    else:
        score_fn = frozen_score_fn(train["zimg"], emb["zimg"], targets_, l2=l2, max_iter=max_iter)
    out = probe(targets_, score_fn, fractions=fractions, seeds=seeds, seed_dependent=finetune)
    _last_run.clear()
    _last_run.update(zimg=weakref.ref(emb["zimg"]), options=options, out=out)
    return out


def plot_curves(
    xs: Sequence[float], series: dict[str, tuple], path: str, *, xlabel: str, title: str
) -> None:
    """One line per ``series`` name, ``(means [X], stds [X])`` against ``xs [X]`` (log scale)
    with standard-deviation error bars."""
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (means, stds) in series.items():
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
    ax.set(xlabel=xlabel, ylabel="metric", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot(
    emb,
    path: str,
    *,
    ctx,
    fractions,
    seeds,
    train_split,
    train_examples,
    task,
    l2,
    max_iter,
    finetune,
    finetune_steps,
    finetune_lr,
    finetune_batch,
    classes,
) -> None:
    """Each metric against the label fraction, error bars one std over seeds (options as in
    :func:`run`; the metrics of the run just before on the same ``emb`` are reused)."""
    options = {key: value for key, value in locals().items() if key in OPTIONS}
    if _last_run.get("zimg", lambda: None)() is emb["zimg"] and _last_run["options"] == options:
        out = _last_run["out"]
    else:
        out = run(emb, ctx=ctx, **options)
    fractions = list(fractions)
    names = [
        n for n in ("auroc", "accuracy", "macro_f1") if f"{n}@{fraction_name(fractions[0])}" in out
    ]
    series = {
        n: tuple([out[f"{n}@{fraction_name(f)}{s}"] for f in fractions] for s in ("", "/std"))
        for n in names
    }
    title = "fine-tuned probe" if finetune else "linear probe"
    plot_curves([100 * f for f in fractions], series, path, xlabel="labels used (%)", title=title)
