"""Zero-shot classification of findings from prompts.

- Class embeddings: the mean of the L2-normalised embeddings of a class's prompts (templates,
  MedCLIP-style combinations of severity × finding × location as captions or as the reports'
  sentences, or the reports' own finding sentences), renormalised.
- Multi-label findings (CheXzero-style): each finding has a positive and a negative prompt set
  (its own negations, or the normal-study prompts for every finding);
  ``p(finding) = softmax(t · [sim_pos, sim_neg])[0]`` per image. Per-class and macro AUROC with
  bootstrap 95% CIs, macro F1 at p ≥ 0.5.
- Single-label: images with exactly one label (including "no finding") are classified among all
  classes; top-1 / top-5 accuracy and macro F1.
"""

import numpy as np

from region_medclip.evaluators import common

# Prompt templates in the language of radiology reports.
POSITIVE_TEMPLATES = ("{}", "There is {}.", "FINDINGS: There is {}.", "IMPRESSION: {}.")
NEGATIVE_TEMPLATES = ("No {}.", "There is no {}.", "FINDINGS: No {}.", "IMPRESSION: No {}.")
PROMPT_SETS = ("templates", "combinatorial", "sentences", "report")
# How a normal study is reported: the reference of every finding with ``negatives="normal"``.
NORMAL_PROMPTS = (
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "No acute cardiopulmonary process.",
    "Normal chest radiograph.",
    "FINDINGS: The lungs are clear. IMPRESSION: No acute cardiopulmonary process.",
    "FINDINGS: Lungs are clear bilaterally. IMPRESSION: Normal chest radiograph.",
)
NEGATIVE_SETS = ("prompts", "normal")


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


def template_prompts(names: list[str], templates=POSITIVE_TEMPLATES) -> list[list[str]]:
    """Every template filled with each class name."""
    return [[t.format(name) for t in templates] for name in names]


def combinatorial_prompts(names: list[str]) -> list[list[str]]:
    """MedCLIP-style prompts: severity × finding × location phrases of the synthetic language
    (a class without such phrases, e.g. "no finding", falls back to the templates)."""
    from region_medclip.data.synth import LOCATIONS
    from region_medclip.data.synth_text import SEVERITIES

    out = []
    for name in names:
        prompts = []
        for severity in SEVERITIES.get(name, ()):
            for side, zone in LOCATIONS.get(name, ()):
                where = f" in the {side} {zone} zone" if side else ""
                prompts.append(f"{severity} {name}{where}".strip())
        out.append(prompts or [t.format(name) for t in POSITIVE_TEMPLATES])
    return out


def sentence_prompts(names: list[str]) -> list[list[str]]:
    """The combinatorial prompts phrased as the synthetic reports state a finding: severity ×
    synonym × location (every zone word) in each of the reports' sentence templates ("A small
    nodular opacity in the left base is noted."), and cardiomegaly's own sentences ("The heart
    is enlarged."). CheXzero words its prompts after the reports it trained on: the global
    image embedding is trained against report sentences, not box captions. Names without such
    phrases (e.g. "no finding") fall back to the templates."""
    from region_medclip.data import synth_text
    from region_medclip.data.synth import LOCATIONS

    out = []
    for name in names:
        prompts = []
        for severity in synth_text.SEVERITIES.get(name, ()):
            if name == "cardiomegaly":
                prompts += [s.format(sev=severity) for s in synth_text.CARDIOMEGALY_SENTENCES]
                continue
            for synonym in synth_text.SYNONYMS[name]:
                noun = " ".join(synonym.format(sev=severity).split())
                for side, zone in LOCATIONS[name]:
                    for word in synth_text.ZONE_WORDS[zone]:
                        phrase = f"{noun} in the {side} {word}"
                        prompts += [
                            synth_text.sentence(t, phrase) for t in synth_text.SENTENCE_TEMPLATES
                        ]
        # Severity words may be empty: "nodule" and "small nodule" both occur; keep each once.
        out.append(list(dict.fromkeys(prompts)) or [t.format(name) for t in POSITIVE_TEMPLATES])
    return out


def report_prompts(names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Positive and negative prompts in the language of the synthetic reports: each finding's
    synonyms as report sentences ("There is a pleural fluid collection."), and the sentences the
    reports use to rule it out ("Heart size is normal." for cardiomegaly), as CheXzero words its
    prompts after the reports it was trained on. Names without such phrases (e.g. "no finding")
    fall back to the templates.

    Returns ``(positive [C][P], negative [C][Q])`` prompt lists.
    """
    from region_medclip.data.synth_text import NEGATIONS, SYNONYMS

    positive, negative = [], []
    for name in names:
        phrases = [" ".join(s.format(sev="").split()) for s in SYNONYMS.get(name, ())]
        positive.append(
            [f"There is {p}." for p in phrases] + [f"IMPRESSION: {p}." for p in phrases]
            or [t.format(name) for t in POSITIVE_TEMPLATES]
        )
        negative.append(
            list(NEGATIONS.get(name, ())) or [t.format(name) for t in NEGATIVE_TEMPLATES]
        )
    return positive, negative


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
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """``p(finding | image)`` for the finding classes (names not starting with "no ").

    ``negatives``: what each finding's positive prompts are weighed against: ``prompts``, its
    own negative prompts ("No {finding}.", or the report's negations), CheXzero's pairs; or
    ``normal``, the normal-study prompts (:data:`NORMAL_PROMPTS`) for every finding, as MedCLIP
    weighs each class against "No Finding". A contrastively trained text tower sees the finding
    word in both "There is X." and "No X.", and a small one trained briefly reads negation
    poorly; a normal report shares no finding word with the positive prompt.

    Returns ``(probs [N, F], finding class indices [F], class embeddings [C, D])``.
    """
    if prompts not in PROMPT_SETS:
        raise ValueError(f"config.evals.*.prompts: {prompts!r} is not one of {PROMPT_SETS}")
    if negatives not in NEGATIVE_SETS:
        raise ValueError(f"config.evals.*.negatives: {negatives!r} is not one of {NEGATIVE_SETS}")
    findings = [c for c, name in enumerate(class_names) if not name.startswith("no ")]
    names = [class_names[c] for c in findings]
    if prompts == "report":
        positive, negative = report_prompts(class_names)
        zcls = class_embeddings(encode, positive)
        zneg = class_embeddings(encode, [negative[c] for c in findings])
    else:
        make = {
            "combinatorial": combinatorial_prompts,
            "sentences": sentence_prompts,
            "templates": template_prompts,
        }[prompts]
        zcls = class_embeddings(encode, make(class_names))
        zneg = class_embeddings(encode, template_prompts(names, NEGATIVE_TEMPLATES))
    if negatives == "normal":
        zneg = normal_embeddings(encode, len(findings))
    return positive_probability(zimg, zcls[findings], zneg, logit_scale), findings, zcls


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
) -> dict[str, float]:
    """All zero-shot metrics for images ``zimg [N, D]`` with multi-hot ``labels [N, C]``
    (``prompts`` and ``negatives`` as in :func:`finding_probabilities`).

    Classes whose name starts with "no " (e.g. "no finding") have no negative prompt and are left
    out of the multi-label AUROC; they take part in single-label classification.
    """
    labels = np.asarray(labels)
    probs, findings, zcls = finding_probabilities(
        zimg=zimg,
        class_names=class_names,
        encode=encode,
        logit_scale=logit_scale,
        prompts=prompts,
        negatives=negatives,
    )
    names = [class_names[c] for c in findings]
    y = labels[:, findings]
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
    single = (labels == 1).sum(1) == 1
    if single.any():
        logits = zimg[single] @ zcls.T
        targets = labels[single].argmax(1)
        out["top1"] = common.top_k_accuracy(logits, targets, 1)
        out["top5"] = common.top_k_accuracy(logits, targets, min(5, len(class_names)))
        out["macro_f1"] = common.macro_f1(logits.argmax(1), targets, len(class_names))
        out["single_label_images"] = float(single.sum())
    return out
