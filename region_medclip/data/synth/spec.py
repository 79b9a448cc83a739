"""What a ``synth_cxr`` film may show: the labels, the lung sides and zones, where each finding
may occur, and how many findings and boxes a film gets.

Everything here is plain data (no pixels, no words); the renderer, the report language and the
record assembly all read it.
"""

import dataclasses

import numpy as np

# Label order of ``labels`` (index 0 is the explicit "no finding" class).
LABELS = (
    "no finding",
    "nodule",
    "mass",
    "pleural effusion",
    "consolidation",
    "pneumothorax",
    "cardiomegaly",
    "atelectasis",
)
SIDES = ("right", "left")  # patient's side; "right" is on the image's left
ZONES = ("upper", "middle", "lower")
# Where each finding may occur: (side, zone) pairs; cardiomegaly has no lung location.
LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "nodule": tuple((s, z) for s in SIDES for z in ZONES),
    "mass": tuple((s, z) for s in SIDES for z in ZONES),
    "consolidation": tuple((s, z) for s in SIDES for z in ZONES),
    "atelectasis": tuple((s, z) for s in SIDES for z in ("middle", "lower")),
    "pleural effusion": tuple((s, "lower") for s in SIDES),
    "pneumothorax": tuple((s, "upper") for s in SIDES),
    "cardiomegaly": ((None, None),),
}
# The lung zones; a film's zones without findings get "clear" boxes (see records.render_record).
NORMAL_ZONES = tuple((s, z) for s in SIDES for z in ZONES)
# Boxes per film: its findings first, then clear lung zones until the film has this many. Normal
# regions are what teach a region embedding that a finding is *there* (every finding box is
# otherwise only contrasted with other findings), as Chest ImaGenome annotates normal anatomy.
BOXES_PER_FILM = 3
# Probability of 0, 1, 2, 3 findings on a film.
NUM_FINDINGS_P = (0.25, 0.35, 0.25, 0.15)
IMAGES_PER_PATIENT = 2  # films per patient on average (1–3)


@dataclasses.dataclass
class Finding:
    """One drawn finding: its name, location, severity word and normalised box."""

    name: str
    side: str | None
    zone: str | None
    severity: str
    box: tuple[float, float, float, float]  # (u0, v0, u1, v1)


def choose_findings(rng: np.random.Generator) -> list[tuple[str, str | None, str | None]]:
    """0–3 findings at distinct locations: ``[(name, side, zone), ...]``."""
    count = rng.choice(len(NUM_FINDINGS_P), p=NUM_FINDINGS_P)
    names = [n for n in LABELS if n != "no finding"]
    chosen, used = [], set()
    for name in rng.permutation(names):
        if len(chosen) == count:
            break
        options = [loc for loc in LOCATIONS[str(name)] if loc not in used]
        if not options:
            continue
        side, zone = options[rng.integers(len(options))]
        used.add((side, zone))
        chosen.append((str(name), side, zone))
    return chosen
