"""Classification metrics shared by the evaluators (numpy, host-side).

AUROC is the Mann–Whitney statistic with average ranks for ties, which equals the area under the
empirical ROC curve (the trapezoid rule through tied scores) — the value scikit-learn reports.
"""

from collections.abc import Callable

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x [N]``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores [N]`` for binary ``labels [N]`` (1 positive, 0
    negative; other values, e.g. −1 uncertain, are left out). NaN when a class is missing."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    keep = (labels == 0) | (labels == 1)
    scores, positive = scores[keep], labels[keep] == 1
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def per_class_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``scores, labels [N, C]`` → ``[C]`` AUROC per class (NaN where a class is one-sided)."""
    return np.array([auroc(scores[:, c], labels[:, c]) for c in range(scores.shape[1])])


def macro_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean AUROC over the classes that have both positives and negatives."""
    values = per_class_auroc(scores, labels)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays: np.ndarray,
    num_samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(*arrays)``, resampling rows (axis 0) of all
    ``arrays`` together; resamples where the metric is NaN (one class drawn) are dropped."""
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_samples):
        idx = rng.integers(0, n, n)
        value = metric(*(a[idx] for a in arrays))
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def top_k_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows of ``logits [N, C]`` whose ``targets [N]`` class is among the k highest
    (ties broken in favour of the lower class index, as ``argsort`` does)."""
    logits = np.asarray(logits)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == np.asarray(targets)[:, None]).any(axis=1)))


def macro_f1(predictions: np.ndarray, targets: np.ndarray, num_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class never predicted nor present scores 0 and is
    left out of the mean)."""
    scores = []
    for c in range(num_classes):
        tp = np.sum((predictions == c) & (targets == c))
        fp = np.sum((predictions == c) & (targets != c))
        fn = np.sum((predictions != c) & (targets == c))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def multilabel_f1(probabilities: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Macro F1 over classes of thresholded ``probabilities [N, C]`` against ``labels [N, C]``
    (uncertain −1 entries left out)."""
    scores = []
    for c in range(labels.shape[1]):
        keep = (labels[:, c] == 0) | (labels[:, c] == 1)
        pred, true = probabilities[keep, c] >= threshold, labels[keep, c] == 1
        tp, fp, fn = np.sum(pred & true), np.sum(pred & ~true), np.sum(~pred & true)
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")
