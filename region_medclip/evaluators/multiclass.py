"""Zero-shot multi-class classification: each image is given the class whose prompt embedding
is nearest, among ``classes``; the evaluator of kind ``multiclass``.

The protocol of CheXpert 5×200 (GLoRIA, Huang et al., ICCV 2021, §4.3; MedCLIP, Wang et al.,
EMNLP 2022, §4.2): 200 images for each of the five competition findings (atelectasis,
cardiomegaly, consolidation, edema, pleural effusion), each positive for its finding only; a
class embedding is the mean of its prompts' embeddings (their combinatorial prompts: the
``combinatorial`` prompt set of CheXpert-labelled datasets, ``data/prompts_chexpert.py``); the
prediction is the arg-max of the image's similarity to the five. Reported: accuracy, macro F1
and each class's accuracy (its recall), with a bootstrap 95% CI on the accuracy.

Images with no positive or several among ``classes`` are not in the task and are counted
(``images_left_out``), never silently dropped.
"""

import numpy as np

from region_medclip.evaluators import common, plots, zero_shot

# The keys of ``config.evals.<name>`` this evaluator reads, with their defaults.
OPTIONS = dict(
    prompts="templates",  # a prompt set of the dataset's registry entry
    classes=(),  # the classes to choose among (CheXpert 5x200: the five findings); (): all
    class_names=(),  # names of ``labels [C]`` for a dataset that has none
    bootstrap=1000,
)


def predictions(zimg: np.ndarray, zcls: np.ndarray) -> np.ndarray:
    """``zimg [N, D]``, ``zcls [K, D]`` → ``[N]`` index of the most similar class (ties: the
    lower index)."""
    return np.argmax(np.asarray(zimg) @ np.asarray(zcls).T, axis=1)


def metrics(predicted: np.ndarray, targets: np.ndarray, names: list[str], bootstrap: int):
    """Accuracy (bootstrap CI), macro F1 and per-class accuracy of ``predicted, targets [N]``
    over the classes ``names [K]``."""

    def accuracy(p, t):
        return float(np.mean(p == t))

    out = {"accuracy": accuracy(predicted, targets)}
    out["accuracy/ci_low"], out["accuracy/ci_high"] = common.bootstrap_ci(
        accuracy, predicted, targets, num_samples=bootstrap
    )
    out["macro_f1"] = common.macro_f1(predicted, targets, len(names))
    for k, name in enumerate(names):
        mask = targets == k
        out[f"accuracy/{name}"] = accuracy(predicted[mask], targets[mask]) if mask.any() else np.nan
    return out


def _task(emb, ctx, prompts, classes, class_names):
    """``(zimg [M, D], targets [M], class embeddings [K, D], names [K], left out)``: the images
    with exactly one positive among ``classes``."""
    labels, names = zero_shot._scored(emb, ctx, classes, class_names)
    single = (labels == 1).sum(1) == 1
    positive, _ = ctx.dataset.prompts(prompts, names)
    zcls = zero_shot.class_embeddings(ctx.text.encode, positive)
    targets = labels[single].argmax(1)
    return np.asarray(emb["zimg"])[single], targets, zcls, names, int((~single).sum())


def run(emb, *, ctx, prompts, classes, class_names, bootstrap) -> dict[str, float]:
    """The ``multiclass`` evaluator on ``emb["zimg"] [N, D]``, ``emb["labels"] [N, C]``.

    Raises:
      ValueError: the dataset has no label names (and no ``class_names``), an unknown class or
        prompt set; no image has exactly one of ``classes``.
    """
    zimg, targets, zcls, names, left_out = _task(emb, ctx, prompts, classes, class_names)
    if not len(targets):
        raise ValueError(
            f"config.evals.{ctx.name or '*'}: no image of {ctx.dataset.name!r} has exactly one "
            f"positive among {names}"
        )
    out = metrics(predictions(zimg, zcls), targets, names, bootstrap)
    out["images_left_out"] = float(left_out)
    return out


def plot(emb, path: str, *, ctx, prompts, classes, class_names, bootstrap) -> None:
    """The confusion matrix (rows: true class, columns: predicted), as row fractions."""
    del bootstrap
    zimg, targets, zcls, names, _ = _task(emb, ctx, prompts, classes, class_names)
    predicted = predictions(zimg, zcls)
    matrix = np.zeros((len(names), len(names)))
    np.add.at(matrix, (targets, predicted), 1.0)
    matrix /= np.maximum(matrix.sum(1, keepdims=True), 1.0)
    plots.plot_confusion(matrix, names, path)
