"""Zero-shot prompts for the CheXpert competition findings, built as GLoRIA and MedCLIP build
them: every combination of a severity word, a subtype phrase and a location phrase of a class
("mild linear atelectasis at the lung bases"), of which a seeded sample of ``n`` is averaged
into the class embedding (Huang et al., "GLoRIA", ICCV 2021, §4.3 and its code's
``generate_chexpert_class_prompts``; Wang et al., "MedCLIP", EMNLP 2022, §4.2, the same
construction with ``n = 5``). The words below are ours, in the language of chest-film reports.

``chexpert_prompts(["atelectasis", "cardiomegaly"])`` → ``([[5 prompts], [5 prompts]], None)``.
Classes outside the five (and "no finding") get the project's report templates.
"""

import itertools
import random

from region_medclip.data.prompts import template_prompts

# class → (severities, subtypes, locations); "" keeps the part out of the sentence.
CHEXPERT_PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "atelectasis": (
        ("", "mild", "minimal", "small"),
        (
            "atelectasis",
            "linear atelectasis",
            "plate-like atelectasis",
            "subsegmental atelectasis",
            "bibasilar atelectasis",
        ),
        ("", "at the lung bases", "in the left lower lobe", "in the right lower lobe"),
    ),
    "cardiomegaly": (
        ("", "mild", "moderate", "severe"),
        (
            "cardiomegaly",
            "enlargement of the cardiac silhouette",
            "enlarged heart size",
            "prominent cardiac contour",
        ),
        ("",),
    ),
    "consolidation": (
        ("", "small", "patchy", "focal"),
        ("consolidation", "airspace consolidation", "airspace opacity", "dense consolidation"),
        ("", "in the right lower lobe", "in the left lower lobe", "at the lung bases"),
    ),
    "edema": (
        ("", "mild", "moderate", "severe"),
        (
            "pulmonary edema",
            "interstitial edema",
            "vascular congestion",
            "perihilar edema",
        ),
        ("", "in both lungs"),
    ),
    "pleural effusion": (
        ("", "small", "moderate", "large"),
        ("pleural effusion", "pleural fluid", "layering effusion", "loculated effusion"),
        ("", "on the left", "on the right", "bilaterally"),
    ),
}


def combinations(name: str) -> list[str]:
    """Every prompt of class ``name`` (lower case, one of :data:`CHEXPERT_PARTS`)."""
    return [
        " ".join(part for part in parts if part)
        for parts in itertools.product(*CHEXPERT_PARTS[name])
    ]


def chexpert_prompts(names: list[str], n: int = 5, seed: int = 0) -> tuple[list[list[str]], None]:
    """``names [C]`` → (``n`` prompts of each competition class sampled from its
    :func:`combinations` with ``seed``, templates for the other classes; None: each finding is
    weighed against its generic negations in multi-label use)."""
    out = []
    for name in names:
        if name in CHEXPERT_PARTS:
            prompts = combinations(name)
            out.append(random.Random(f"{seed}:{name}").sample(prompts, min(n, len(prompts))))
        else:
            out.append(template_prompts([name])[0])
    return out, None


def chexpert_all_prompts(names: list[str]) -> tuple[list[list[str]], None]:
    """Every combination of each competition class (no sampling), templates for the others."""
    out = [combinations(n) if n in CHEXPERT_PARTS else template_prompts([n])[0] for n in names]
    return out, None
