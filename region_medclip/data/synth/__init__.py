"""``synth_cxr``: the embedded, deterministic synthetic chest X-ray dataset.

Every record is a pure function of ``(seed, index, size)``: no download, random access, and the
same bytes on every machine. Images are grayscale radiograph-like films (body outline, two lung
fields, heart, ribs, clavicles, spine, noise) with 0–3 findings drawn at known boxes; each finding
has its own visual signature and a location (patient's right/left × upper/middle/lower zone where
it applies). Reports have FINDINGS and IMPRESSION sections with synonyms and negated absent
findings; each box has one caption. Patients own 1–3 films (same anatomy), and the
train/validation/test split is by patient.

    python -m region_medclip.data.synth --out=DIR --num=N --size=PX --seed=S [--sheet=PNG]
"""

# Modules, each importing only those above it: spec (labels, locations, Finding) ← render
# (pixels) ← text (report language) ← records (schema records, splits) ← parallel (render
# workers) ← builder (TFDS); prompts (zero-shot prompt sets) reads spec and text. The builder
# and the prompts are not imported here: TFDS is slow to import, and the render workers import
# this package.
from region_medclip.data.synth.records import _overlap as _overlap  # data tests check boxes
from region_medclip.data.synth.records import (
    contact_sheet,
    patient_of,
    render_record,
    split_of,
)
from region_medclip.data.synth.render import draw_finding
from region_medclip.data.synth.spec import (
    BOXES_PER_FILM,
    IMAGES_PER_PATIENT,
    LABELS,
    LOCATIONS,
    NORMAL_ZONES,
    NUM_FINDINGS_P,
    SIDES,
    ZONES,
    Finding,
    choose_findings,
)
from region_medclip.data.synth.text import concept_vocabulary, corpus

__all__ = [
    "BOXES_PER_FILM",
    "IMAGES_PER_PATIENT",
    "LABELS",
    "LOCATIONS",
    "NORMAL_ZONES",
    "NUM_FINDINGS_P",
    "SIDES",
    "ZONES",
    "Finding",
    "choose_findings",
    "concept_vocabulary",
    "contact_sheet",
    "corpus",
    "draw_finding",
    "patient_of",
    "render_record",
    "split_of",
]
