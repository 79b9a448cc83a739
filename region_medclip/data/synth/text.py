"""Report and caption language of ``synth_cxr``: synonyms, severities, negations.

Reports follow the radiology layout (``FINDINGS:`` then ``IMPRESSION:``); absent findings are
sometimes negated explicitly ("No pleural effusion or pneumothorax."), as real reports do, so a
model has to read negation rather than count finding words.
"""

import numpy as np

from region_medclip.data import negatives
from region_medclip.data.synth.spec import LABELS, LOCATIONS, NORMAL_ZONES, Finding, choose_findings

# Noun phrases per finding; "{sev}" takes the severity word (may be empty).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "nodule": ("{sev} nodule", "{sev} pulmonary nodule", "{sev} nodular opacity"),
    "mass": ("{sev} mass", "{sev} mass lesion", "{sev} masslike opacity"),
    "pleural effusion": (
        "{sev} pleural effusion",
        "{sev} effusion",
        "{sev} pleural fluid collection",
    ),
    "consolidation": ("{sev} consolidation", "{sev} airspace opacity", "{sev} airspace disease"),
    "pneumothorax": ("{sev} pneumothorax", "{sev} apical pneumothorax"),
    "cardiomegaly": ("{sev} cardiomegaly", "enlarged cardiac silhouette", "enlarged heart"),
    "atelectasis": ("{sev} atelectasis", "{sev} atelectatic change", "atelectasis"),
}

ZONE_WORDS = {
    "upper": ("upper zone", "upper lobe", "apex"),
    "middle": ("mid zone", "middle zone"),
    "lower": ("lower zone", "lower lobe", "base"),
}

NEGATIONS: dict[str, tuple[str, ...]] = {
    "nodule": ("No suspicious pulmonary nodule.", "No nodule is seen."),
    "mass": ("No mass.", "No focal mass lesion."),
    "pleural effusion": ("No pleural effusion.", "No pleural fluid."),
    "consolidation": ("No focal consolidation.", "No airspace opacity."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "cardiomegaly": ("Heart size is normal.", "The cardiac silhouette is normal in size."),
    "atelectasis": ("No atelectasis.", "No volume loss."),
}


def _pick(options, rng: np.random.Generator) -> str:
    return str(options[rng.integers(len(options))])


def location_phrase(side: str | None, zone: str | None, rng: np.random.Generator) -> str:
    """``"right upper zone"``, ``"left base"``, ... (empty for cardiomegaly)."""
    if side is None:
        return ""
    return f"{side} {_pick(ZONE_WORDS[zone], rng)}"


def noun_phrase(name: str, severity: str, rng: np.random.Generator) -> str:
    """A synonym of finding ``name`` with its severity word, e.g. ``"small pleural effusion"``."""
    return " ".join(_pick(SYNONYMS[name], rng).format(sev=severity).split())


def caption(finding, rng: np.random.Generator) -> str:
    """One region caption, e.g. ``"small nodule in the right upper zone"``."""
    words = noun_phrase(finding.name, finding.severity, rng)
    if finding.side is None:
        return words
    return f"{words} in the {location_phrase(finding.side, finding.zone, rng)}"


# Captions of a lung zone without findings (Chest ImaGenome-style normal region annotations).
NORMAL_CAPTIONS = ("{} is clear", "clear {}", "normal {}")


def normal_caption(side: str, zone: str, rng: np.random.Generator) -> str:
    """A caption of a clear lung zone, e.g. ``"right upper zone is clear"``."""
    return _pick(NORMAL_CAPTIONS, rng).format(location_phrase(side, zone, rng))


# How a report states a finding: a template around its caption, or for cardiomegaly (which has
# no location) one of its own sentences, "{sev}" taking the severity word.
SENTENCE_TEMPLATES = ("There is a {}.", "{}.", "A {} is noted.", "Findings of {}.")
CARDIOMEGALY_SENTENCES = (
    "The heart is enlarged.",
    "There is {sev} cardiomegaly.",
    "The cardiac silhouette is enlarged.",
)


def sentence(template: str, phrase: str) -> str:
    """``template`` filled with ``phrase`` and capitalised: ``"A small nodule in the ... is
    noted."``."""
    text = template.format(phrase)
    return text[0].upper() + text[1:]


def _sentence(finding, rng: np.random.Generator) -> str:
    phrase = caption(finding, rng)
    if finding.name == "cardiomegaly":
        return _pick(CARDIOMEGALY_SENTENCES, rng).format(sev=finding.severity)
    return sentence(_pick(SENTENCE_TEMPLATES, rng), phrase)


def report(findings, rng: np.random.Generator) -> str:
    """A FINDINGS / IMPRESSION report of ``findings`` with some absent findings negated."""
    present = {f.name for f in findings}
    sentences = [_sentence(f, rng) for f in findings]
    absent = [name for name in LABELS[1:] if name not in present]
    for name in rng.permutation(absent)[: rng.integers(1, 3)]:
        sentences.append(_pick(NEGATIONS[str(name)], rng))
    if not findings:
        sentences.insert(0, _pick(("The lungs are clear.", "Lungs are clear bilaterally."), rng))
        impression = _pick(("No acute cardiopulmonary process.", "Normal chest radiograph."), rng)
    else:
        parts = []
        for f in findings:
            noun = noun_phrase(f.name, "", rng)
            where = f"{f.side} {f.zone} " if f.side else ""
            parts.append(f"{where}{noun}")
        impression = "; ".join(parts).capitalize() + "."
    return "FINDINGS: " + " ".join(sentences) + " IMPRESSION: " + impression


def concept_vocabulary() -> list[str]:
    """``[K]`` finding × location phrases: the distillation concept vocabulary."""
    concepts = []
    for name, locations in LOCATIONS.items():
        for side, zone in locations:
            concepts.append(f"{name} in the {side} {zone} zone" if side else name)
    return concepts


# Severity words each finding can carry (as render.draw_finding draws them).
SEVERITIES = {
    "nodule": ("small", ""),
    "mass": ("large", ""),
    "consolidation": ("dense", "patchy"),
    "atelectasis": ("linear", "plate-like", "subsegmental"),
    "pleural effusion": ("small", "moderate", "large"),
    "pneumothorax": ("small", "large"),
    "cardiomegaly": ("mild", "moderate"),
}


def corpus(num_reports: int = 3000, seed: int = 0) -> list[str]:
    """Reports, captions and hard negatives in the synthetic language (no images rendered):
    the training text of the ``synth_bpe`` tokenizer."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(num_reports):
        findings = [
            Finding(name, side, zone, _pick(SEVERITIES[name], rng), (0.0, 0.0, 1.0, 1.0))
            for name, side, zone in choose_findings(rng)
        ]
        texts.append(report(findings, rng))
        used = {(f.side, f.zone) for f in findings}
        clear = [(s, z) for s, z in NORMAL_ZONES if (s, z) not in used]
        region_texts = [caption(f, rng) for f in findings]
        region_texts += [normal_caption(s, z, rng) for s, z in clear[:2]]
        for text in region_texts:
            texts.append(text)
            texts.extend(negatives.hard_negatives(text, 4))
    return texts
