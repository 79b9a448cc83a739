"""Rule-based hard-negative captions for the negative-caption loss.

A hard negative changes exactly what a region embedding must get right: which side
(laterality swap), which zone (upper ↔ lower), which finding (a swap within a group a reader could
confuse: nodule ↔ mass, effusion ↔ consolidation ↔ atelectasis, ...), or whether it is there at
all (negation; a clear region's opposite is an opacity there). Perturbations are deterministic
and never equal the positive caption.
"""

import hashlib
import re

import numpy as np

SIDE_SWAP = {"left": "right", "right": "left"}
ZONE_SWAP = {
    "upper": "lower",
    "lower": "upper",
    "apex": "base",
    "base": "apex",
    "apical": "basal",
    "basal": "apical",
    "middle": "upper",
    "mid": "lower",
}
# Each finding word → the findings it is confused with (in order of preference).
CONFUSABLE = {
    "nodule": ("mass",),
    "nodular": ("masslike",),
    "mass": ("nodule",),
    "masslike": ("nodular",),
    "effusion": ("consolidation", "atelectasis"),
    "consolidation": ("effusion", "atelectasis"),
    "atelectasis": ("consolidation", "effusion"),
    "atelectatic": ("consolidative",),
    "pneumothorax": ("effusion",),
    "pneumonia": ("edema", "atelectasis"),
    "edema": ("pneumonia",),
    "opacity": ("lucency",),
    "cardiomegaly": ("pneumomediastinum",),
    "enlarged": ("normal-sized",),
}
for _phrase in ("pleural effusion", "pleural fluid collection", "pleural fluid"):
    CONFUSABLE[_phrase] = ("consolidation", "atelectasis")
# Multi-word findings first, so "pleural effusion" is swapped whole.
_WORD = re.compile(r"pleural (?:effusion|fluid collection|fluid)|[A-Za-z][A-Za-z-]*", re.I)


def _replace_words(caption: str, table: dict[str, tuple[str, ...] | str], choice: int = 0) -> str:
    """Replaces every word found in ``table`` (case-insensitive), keeping capitalisation."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        options = table.get(word.lower())
        if options is None:
            return word
        new = options if isinstance(options, str) else options[choice % len(options)]
        return new.capitalize() if word[0].isupper() else new

    return _WORD.sub(swap, caption)


# A caption of a clear region: "clear right apex", "normal left base", "left mid zone is clear".
_NORMAL = re.compile(r"^(?:(?:clear|normal) (?P<a>.+)|(?P<b>.+) is clear)$", re.I)


def _negate(caption: str) -> str:
    text = caption.strip().rstrip(".")
    normal = _NORMAL.match(text)
    if normal:
        # The opposite of a clear region is an abnormal one at the same place.
        return f"opacity in the {(normal['a'] or normal['b']).lower()}"
    return f"no {text[0].lower()}{text[1:]}" if text else "no finding"


def _groups(caption: str) -> tuple[list[str], list[str]]:
    """(single-rule perturbations, combined ones), deduplicated, the positive excluded."""
    side = _replace_words(caption, SIDE_SWAP)
    zone = _replace_words(caption, ZONE_SWAP)
    found = [_replace_words(caption, CONFUSABLE, choice=i) for i in range(2)]
    single = [side, zone, *found, _negate(caption)]
    combined = [
        _replace_words(side, ZONE_SWAP),
        _replace_words(side, CONFUSABLE),
        _replace_words(zone, CONFUSABLE),
    ]
    seen = {_normal(caption)}
    groups = ([], [])
    for group, texts in zip(groups, (single, combined), strict=True):
        for text in texts:
            if _normal(text) not in seen:
                seen.add(_normal(text))
                group.append(text)
    return groups


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def candidates(caption: str) -> list[str]:
    """Every rule's perturbation of ``caption`` (single rules first, then combinations), without
    duplicates or the positive itself (compared case- and whitespace-insensitively)."""
    single, combined = _groups(caption)
    return single + combined


def hard_negatives(caption: str, k: int, *, seed: int = 0) -> list[str]:
    """Up to ``k`` hard negatives of ``caption``.

    The single-rule perturbations (side, zone, finding, negation) come first, in an order
    shuffled by a stable hash of ``(caption, seed)``, then the combined ones, shuffled likewise.
    Fewer than ``k`` come back when the rules produce fewer distinct captions (the pipeline
    masks the missing ones with ``neg_mask``).
    """
    digest = hashlib.sha256(f"{seed}\x00{caption}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    out = []
    for group in _groups(caption):
        out += [group[i] for i in rng.permutation(len(group))]
    return out[:k]


# A sentence that negates or says normal is left as it is in a hard-negative report: "No
# pleural effusion." with another finding named is still true of the film.
_NEGATED = re.compile(r"\b(?:no|not|without|clear|normal|unremarkable|resolved)\b", re.I)
# Report pieces: sentences and the items of an impression, with the whitespace after each kept.
_PIECES = re.compile(r"(?<=[.;:])(\s+)")


def _perturb_findings(report: str, table: dict, choice: int = 0) -> str:
    """``report`` with the words of ``table`` replaced in its positive pieces only."""
    pieces = _PIECES.split(report)
    for i, piece in enumerate(pieces):
        if piece.strip() and not _NEGATED.search(piece):
            pieces[i] = _replace_words(piece, table, choice)
    return "".join(pieces)


def report_negatives(report: str, k: int, *, seed: int = 0) -> list[str]:
    """Up to ``k`` hard-negative reports of ``report`` for the image→report loss (NegCLIP).

    Each changes what the report finds and nothing it rules out: the findings it reports swapped
    for confusable ones (nodule ↔ mass, effusion ↔ consolidation ↔ atelectasis, ...), or their
    side, or their zone, in an order shuffled by a stable hash of ``(report, seed)``. A report
    that finds nothing has none (its negations, changed, would still describe its film).
    """
    rules = [
        _perturb_findings(report, CONFUSABLE, 0),
        _perturb_findings(report, CONFUSABLE, 1),
        _perturb_findings(report, SIDE_SWAP),
        _perturb_findings(report, ZONE_SWAP),
    ]
    seen, out = {_normal(report)}, []
    for text in rules:
        if _normal(text) not in seen:
            seen.add(_normal(text))
            out.append(text)
    digest = hashlib.sha256(f"{seed}\x00report\x00{report}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return [out[i] for i in rng.permutation(len(out))][:k]
