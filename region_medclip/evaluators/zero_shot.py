"""Zero-shot classification of findings from prompts.

- Class embeddings: the mean of the L2-normalised embeddings of a class's prompts, renormalised.
  The prompts are a prompt set of the dataset's registry entry (``data/registry.py``):
  ``templates`` for every dataset, and the sets written in a dataset's own report language
  (``synth_cxr``: MedCLIP-style ``combinatorial`` captions, ``sentences``, ``report``).
- Multi-label findings (CheXzero-style): each finding has a positive and a negative prompt set
  (its own negations, or the normal-study prompts for every finding);
  ``p(finding) = softmax(t · [sim_pos, sim_neg])[0]`` per image. Per-class and macro AUROC with
  bootstrap 95% CIs, macro F1 at p ≥ 0.5.
- Single-label: images with exactly one label (including "no finding") are classified among all
  classes; top-1 / top-5 accuracy and macro F1.

- Learned prompts (``coop=`` the path of a file that ``python -m region_medclip.coop`` wrote,
  :mod:`coop`): CoOp's context vectors in place of the prompt set's words; multi-label ones weigh
  each finding against their own negative (learned or normal-study), multi-class ones give the
  softmax over their classes. ``prompts`` and ``negatives`` are then not used.

The evaluator of kind ``zero_shot`` is :func:`run` (metrics) and :func:`plot` (ROC curves).
"""

import numpy as np

from region_medclip.data import registry
from region_medclip.data.prompts import NEGATIVE_TEMPLATES, NORMAL_PROMPTS, template_prompts
from region_medclip.evaluators import common, plots
from region_medclip.evaluators import coop as coop_lib

__all__ = [
    "NEGATIVE_SETS",
    "NEGATIVE_TEMPLATES",
    "OPTIONS",
    "class_embeddings",
    "evaluate",
    "finding_probabilities",
    "learned_probabilities",
    "normal_embeddings",
    "plot",
    "positive_probability",
    "run",
    "template_prompts",
]

NEGATIVE_SETS = ("prompts", "normal")
# The keys of ``config.evals.<name>`` this evaluator reads, with their defaults.
OPTIONS = dict(
    prompts="templates",  # a prompt set of the dataset's registry entry
    negatives="prompts",  # each finding's own negations, or "normal" study prompts
    bootstrap=1000,
    classes=(),  # the findings scored (e.g. CheXpert's five); (): every class
    class_names=(),  # names of ``labels [C]`` for a dataset that has none (a user's CSV)
    coop="",  # the path of learned prompts (W/coop/<dataset>/<name>.npz); "": the prompt set
)


def class_embeddings(encode, prompts: list[list[str]]) -> np.ndarray:
    """``prompts[c]``: the prompts of class c → ``[C, D]`` renormalised mean embeddings.

    ``encode``: ``list[str] → [n, D]`` L2-normalised embeddings.
    """
    flat = [p for group in prompts for p in group]
    z = encode(flat)
    out, start = [], 0
    for group in prompts:
        mean = z[start : start + len(group)].mean(0)
        out.append(mean / max(np.linalg.norm(mean), 1e-12))
        start += len(group)
    return np.stack(out)


def normal_embeddings(encode, count: int) -> np.ndarray:
    """``[count, D]``: the normal-study prompts' class embedding, the reference of each of
    ``count`` findings with ``negatives="normal"``."""
    return np.repeat(class_embeddings(encode, [list(NORMAL_PROMPTS)]), count, axis=0)


def positive_probability(zimg, zpos, zneg, logit_scale: float) -> np.ndarray:
    """``zimg [N, D]``, ``zpos, zneg [C, D]`` → ``[N, C]`` probability of each finding from the
    two-way softmax between its positive and negative prompt embeddings."""
    pos, neg = logit_scale * zimg @ zpos.T, logit_scale * zimg @ zneg.T
    return 1.0 / (1.0 + np.exp(neg - pos))


def finding_probabilities(
    *,
    zimg: np.ndarray,
    class_names: list[str],
    encode,
    logit_scale: float,
    prompts: str,
    negatives: str = "prompts",
    dataset: str | registry.Dataset,
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """``p(finding | image)`` for the finding classes (names not starting with "no ").

    ``prompts``: a prompt set of ``dataset`` (a registry name or entry), each class's positive
    prompts and, for sets that have them, its negative ones ("There is no pleural fluid."); a
    set without negatives weighs each finding against the generic negations ("No {finding}.").
    ``negatives``: what each finding's positive prompts are weighed against: ``prompts``, its
    own negative prompts, CheXzero's pairs; or ``normal``, the normal-study prompts
    (:data:`NORMAL_PROMPTS`) for every finding, as MedCLIP weighs each class against "No
    Finding". A contrastively trained text tower sees the finding word in both "There is X."
    and "No X.", and a small one trained briefly reads negation poorly; a normal report shares
    no finding word with the positive prompt.

    Returns ``(probs [N, F], finding class indices [F], class embeddings [C, D])``.
    """
    if negatives not in NEGATIVE_SETS:
        raise ValueError(f"config.evals.*.negatives: {negatives!r} is not one of {NEGATIVE_SETS}")
    entry = registry.get(dataset) if isinstance(dataset, str) else dataset
    positive, negative = entry.prompts(prompts, class_names)
    findings = [c for c, name in enumerate(class_names) if not name.startswith("no ")]
    zcls = class_embeddings(encode, positive)
    if negative is None:
        negative = template_prompts(class_names, NEGATIVE_TEMPLATES)
    zneg = class_embeddings(encode, [negative[c] for c in findings])
    if negatives == "normal":
        zneg = normal_embeddings(encode, len(findings))
    return positive_probability(zimg, zcls[findings], zneg, logit_scale), findings, zcls


def learned_probabilities(
    *,
    zimg: np.ndarray,
    class_names: list[str],
    learned: coop_lib.LearnedPrompts,
    encode_learned,
    encode,
    logit_scale: float,
) -> tuple[np.ndarray, list[int], np.ndarray | None]:
    """``p(finding | image)`` from learned prompts, as :func:`finding_probabilities` from a
    prompt set.

    ``encode_learned``: ``LearnedPrompts → [S, K, D]`` (:class:`coop.Encoder`); ``encode``:
    ``list[str] → [n, D]``, for the normal-study prompts that ``negatives="normal"`` prompts
    weigh against. Multi-label prompts score each finding by the two-way softmax of its positive
    against its negative prompt; multi-class ones by the softmax over all their classes.

    Returns ``(probs [N, F], finding class indices [F], class embeddings [C, D] or None)``:
    multi-label prompts have none for "no finding", so no single-label classification.

    Raises:
      ValueError: naming the classes the learned prompts do not prompt.
    """
    findings = [c for c, name in enumerate(class_names) if not name.startswith("no ")]
    multiclass = learned.task == "multiclass"
    wanted = list(class_names) if multiclass else [class_names[c] for c in findings]
    missing = [name for name in wanted if name not in learned.class_names]
    if missing:
        raise ValueError(
            f"coop: the learned prompts of {learned.dataset!r} have no prompt for {missing}; "
            f"they prompt {list(learned.class_names)}"
        )
    z = encode_learned(learned)
    rows = [learned.class_names.index(class_names[c]) for c in findings]
    if multiclass:
        scores = logit_scale * zimg @ z[0].T
        scores = np.exp(scores - scores.max(1, keepdims=True))
        probs = scores / scores.sum(1, keepdims=True)
        zcls = z[0][[learned.class_names.index(name) for name in class_names]]
        return probs[:, rows], findings, zcls
    zneg = z[1][rows] if learned.negatives == "learned" else normal_embeddings(encode, len(rows))
    return positive_probability(zimg, z[0][rows], zneg, logit_scale), findings, None


def _auroc_metrics(probs: np.ndarray, y: np.ndarray, names, bootstrap: int) -> dict[str, float]:
    """Per-class and macro AUROC (bootstrap CIs) and macro F1 of ``probs, y [N, F]``."""
    out: dict[str, float] = {}
    per_class = common.per_class_auroc(probs, y)
    for c, name in enumerate(names):
        out[f"auroc/{name}"] = float(per_class[c])
        if np.isfinite(per_class[c]):
            low, high = common.bootstrap_ci(
                common.auroc, probs[:, c], y[:, c], num_samples=bootstrap
            )
            out[f"auroc/{name}/ci_low"], out[f"auroc/{name}/ci_high"] = low, high
    out["macro_auroc"] = common.macro_auroc(probs, y)
    out["macro_auroc/ci_low"], out["macro_auroc/ci_high"] = common.bootstrap_ci(
        common.macro_auroc, probs, y, num_samples=bootstrap
    )
    out["multilabel_macro_f1"] = common.multilabel_f1(probs, y)
    return out


def evaluate(
    *,
    zimg: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    encode,
    logit_scale: float,
    prompts: str = "templates",
    negatives: str = "prompts",
    bootstrap: int = 1000,
    dataset: str | registry.Dataset,
    learned: coop_lib.LearnedPrompts | None = None,
    encode_learned=None,
) -> dict[str, float]:
    """All zero-shot metrics for images ``zimg [N, D]`` with multi-hot ``labels [N, C]``
    (``prompts``, ``negatives`` and ``dataset`` as in :func:`finding_probabilities`; with
    ``learned`` prompts and their ``encode_learned``, :func:`learned_probabilities` instead).

    Classes whose name starts with "no " (e.g. "no finding") have no negative prompt and are left
    out of the multi-label AUROC; they take part in single-label classification (not with
    multi-label learned prompts: they prompt no "no finding").
    """
    labels = np.asarray(labels)
    if learned is not None:
        probs, findings, zcls = learned_probabilities(
            zimg=zimg,
            class_names=class_names,
            learned=learned,
            encode_learned=encode_learned,
            encode=encode,
            logit_scale=logit_scale,
        )
    else:
        probs, findings, zcls = finding_probabilities(
            zimg=zimg,
            class_names=class_names,
            encode=encode,
            logit_scale=logit_scale,
            prompts=prompts,
            negatives=negatives,
            dataset=dataset,
        )
    names = [class_names[c] for c in findings]
    out = _auroc_metrics(probs, labels[:, findings], names, bootstrap)
    single = (labels == 1).sum(1) == 1
    if single.any() and zcls is not None:
        logits = zimg[single] @ zcls.T
        targets = labels[single].argmax(1)
        out["top1"] = common.top_k_accuracy(logits, targets, 1)
        out["top5"] = common.top_k_accuracy(logits, targets, min(5, len(class_names)))
        out["macro_f1"] = common.macro_f1(logits.argmax(1), targets, len(class_names))
        out["single_label_images"] = float(single.sum())
    return out


def names_of(ctx, given=()) -> list[str]:
    """``[C]`` names of ``labels``: the dataset's, or ``config.evals.<name>.class_names``.

    Raises:
      ValueError: naming the keys, when neither gives names or they disagree in number.
    """
    if given:
        return [str(n).lower() for n in given]
    if not ctx.dataset.label_names:
        raise ValueError(
            f"dataset {ctx.dataset.name!r}: no label names for zero-shot evaluation; set "
            f"config.evals.{ctx.name or '*'}.class_names (or prepare it with --label_names)"
        )
    return ctx.dataset.class_names()


def selected(names: list[str], classes, key: str) -> list[int]:
    """Indices of ``classes`` in ``names`` (all of them for ``()``).

    Raises:
      ValueError: naming ``key`` for a class the dataset does not have.
    """
    if not classes:
        return list(range(len(names)))
    missing = [c for c in classes if c.lower() not in names]
    if missing:
        raise ValueError(f"{key}: {missing} are not classes of the dataset: {names}")
    return [names.index(c.lower()) for c in classes]


def _scored(emb, ctx, classes, given):
    """``(labels [N, C'], names [C'])`` of the scored classes."""
    names = names_of(ctx, given)
    labels = np.asarray(emb["labels"])
    if labels.shape[1] != len(names):
        raise ValueError(
            f"config.evals.{ctx.name or '*'}.class_names: {len(names)} names for "
            f"{labels.shape[1]} labels"
        )
    keep = selected(names, classes, f"config.evals.{ctx.name or '*'}.classes")
    return labels[:, keep], [names[c] for c in keep]


def _learned(ctx, coop: str):
    """``(learned prompts, their encoder)`` of the file ``coop``, or ``(None, None)`` for ""."""
    if not coop:
        return None, None
    if ctx.model is None or ctx.data_config is None:
        raise ValueError(
            f"config.evals.{ctx.name or '*'}.coop: learned prompts need the model in the "
            "evaluator's context (run.evaluate gives it)"
        )
    encoder = coop_lib.Encoder(ctx.model, ctx.params, ctx.text.tokenizer, ctx.data_config.text_len)
    return coop_lib.load(coop), encoder


def run(
    emb: dict[str, np.ndarray],
    *,
    ctx,
    prompts,
    negatives,
    bootstrap,
    classes,
    class_names,
    coop,
) -> dict[str, float]:
    """The ``zero_shot`` evaluator: :func:`evaluate` on ``emb["zimg"] [N, D]`` and
    ``emb["labels"] [N, C]`` with the class names and prompt sets of ``ctx.dataset`` (only
    ``classes`` when given), or the learned prompts saved at ``coop``.

    Raises:
      ValueError: the dataset has no label names (and no ``class_names``), an unknown class,
        prompt or negative set, or a class the learned prompts do not prompt.
      FileNotFoundError: ``coop`` names no file.
    """
    ctx.dataset.prompts(prompts, [])  # an unknown prompt set is named before anything else
    labels, names = _scored(emb, ctx, classes, class_names)
    learned, encode_learned = _learned(ctx, coop)
    return evaluate(
        zimg=emb["zimg"],
        labels=labels,
        class_names=names,
        encode=ctx.text.encode,
        logit_scale=float(emb["logit_scale"]),
        prompts=prompts,
        negatives=negatives,
        bootstrap=bootstrap,
        dataset=ctx.dataset,
        learned=learned,
        encode_learned=encode_learned,
    )


def plot(
    emb: dict[str, np.ndarray],
    path: str,
    *,
    ctx,
    prompts,
    negatives,
    bootstrap,
    classes,
    class_names,
    coop,
) -> None:
    """ROC curve of each finding class (``bootstrap`` unused: the curves have no CIs)."""
    del bootstrap
    labels, names = _scored(emb, ctx, classes, class_names)
    learned, encode_learned = _learned(ctx, coop)
    kw = dict(zimg=emb["zimg"], class_names=names, encode=ctx.text.encode)
    kw.update(logit_scale=float(emb["logit_scale"]))
    if learned is not None:
        probs, findings, _ = learned_probabilities(
            **kw, learned=learned, encode_learned=encode_learned
        )
    else:
        probs, findings, _ = finding_probabilities(
            **kw, prompts=prompts, negatives=negatives, dataset=ctx.dataset
        )
    plots.plot_roc(probs, labels[:, findings], [names[c] for c in findings], path)
