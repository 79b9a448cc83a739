"""Zero-shot prompt sets in the language of the ``synth_cxr`` reports (its registry entry's).

Each function maps class names ``[C]`` to ``(positive [C][P], negative [C][Q] or None)``; a
class without phrases of its own (e.g. "no finding") falls back to the shared templates.
"""

from region_medclip.data.prompts import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES
from region_medclip.data.synth import text
from region_medclip.data.synth.spec import LOCATIONS


def _fallback(name: str) -> list[str]:
    return [t.format(name) for t in POSITIVE_TEMPLATES]


def combinatorial_prompts(names: list[str]) -> tuple[list[list[str]], None]:
    """MedCLIP-style prompts: severity × finding × location phrases of the synthetic language,
    in the form of the box captions ("small nodule in the right upper zone")."""
    out = []
    for name in names:
        prompts = []
        for severity in text.SEVERITIES.get(name, ()):
            for side, zone in LOCATIONS.get(name, ()):
                where = f" in the {side} {zone} zone" if side else ""
                prompts.append(f"{severity} {name}{where}".strip())
        out.append(prompts or _fallback(name))
    return out, None


def _finding_sentences(name: str, severity: str) -> list[str]:
    if name == "cardiomegaly":
        return [s.format(sev=severity) for s in text.CARDIOMEGALY_SENTENCES]
    prompts = []
    for synonym in text.SYNONYMS[name]:
        noun = " ".join(synonym.format(sev=severity).split())
        for side, zone in LOCATIONS[name]:
            for word in text.ZONE_WORDS[zone]:
                phrase = f"{noun} in the {side} {word}"
                prompts += [text.sentence(t, phrase) for t in text.SENTENCE_TEMPLATES]
    return prompts


def sentence_prompts(names: list[str]) -> tuple[list[list[str]], None]:
    """The combinatorial prompts phrased as the synthetic reports state a finding: severity ×
    synonym × location (every zone word) in each of the reports' sentence templates ("A small
    nodular opacity in the left base is noted."), and cardiomegaly's own sentences ("The heart
    is enlarged."). CheXzero words its prompts after the reports it trained on: the global
    image embedding is trained against report sentences, not box captions."""
    out = []
    for name in names:
        prompts = []
        for severity in text.SEVERITIES.get(name, ()):
            prompts += _finding_sentences(name, severity)
        # Severity words may be empty: "nodule" and "small nodule" both occur; keep each once.
        out.append(list(dict.fromkeys(prompts)) or _fallback(name))
    return out, None


def report_prompts(names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Positive and negative prompts in the language of the synthetic reports: each finding's
    synonyms as report sentences ("There is a pleural fluid collection."), and the sentences the
    reports use to rule it out ("Heart size is normal." for cardiomegaly), as CheXzero words its
    prompts after the reports it was trained on.

    Returns ``(positive [C][P], negative [C][Q])`` prompt lists.
    """
    positive, negative = [], []
    for name in names:
        phrases = [" ".join(s.format(sev="").split()) for s in text.SYNONYMS.get(name, ())]
        positive.append(
            [f"There is {p}." for p in phrases] + [f"IMPRESSION: {p}." for p in phrases]
            or _fallback(name)
        )
        negative.append(
            list(text.NEGATIONS.get(name, ())) or [t.format(name) for t in NEGATIVE_TEMPLATES]
        )
    return positive, negative
