"""``synth_cxr`` records: film ``index`` of dataset ``seed`` as a schema record, the patient
and split of every film, and a contact sheet to look at them.

Every record is a pure function of ``(seed, index, size)``. Each film draws from streams of its
own (``default_rng([seed, index, k])``; the patient's anatomy from ``[seed, patient, 0]``), so
any film renders alone, in any order, in any process.
"""

import numpy as np

from region_medclip.data import schema
from region_medclip.data.synth import render, text
from region_medclip.data.synth.spec import (
    BOXES_PER_FILM,
    IMAGES_PER_PATIENT,
    LABELS,
    NORMAL_ZONES,
    SIDES,
    ZONES,
    Finding,
    choose_findings,
)


def patient_of(index: int, seed: int) -> int:
    """Patient number of film ``index``: consecutive films share a patient, 1–3 each."""
    rng = np.random.default_rng([seed, index // (IMAGES_PER_PATIENT * 64), 7])
    # Group boundaries within blocks of 128 films, so any index resolves in O(1).
    cuts = np.cumsum(rng.integers(1, 4, size=128))
    block = index // (IMAGES_PER_PATIENT * 64)
    offset = index % (IMAGES_PER_PATIENT * 64)
    return block * 1000 + int(np.searchsorted(cuts, offset, side="right"))


def split_of(index: int, seed: int) -> str:
    """Split of film ``index`` (by patient, ~80/10/10), computed without rendering."""
    return schema.patient_split(f"synth-{seed}-{patient_of(index, seed)}")


def _overlap(zone, box) -> float:
    """Fraction of the area of ``zone`` (normalised xyxy) that ``box`` covers."""
    w = max(0.0, min(zone[2], box[2]) - max(zone[0], box[0]))
    h = max(0.0, min(zone[3], box[3]) - max(zone[1], box[1]))
    return w * h / max((zone[2] - zone[0]) * (zone[3] - zone[1]), 1e-12)


def _film(index: int, size: int, seed: int, patient: int):
    """Draws film ``index``: ``(image [size, size] uint8, findings, anatomy, rng)``; ``rng`` is
    left where the report's words continue it."""
    anatomy = render.sample_anatomy(np.random.default_rng([seed, patient, 0]))
    rng = np.random.default_rng([seed, index, 1])
    findings_spec = choose_findings(rng)
    if any(name == "cardiomegaly" for name, _, _ in findings_spec):
        hr_u, hr_v = anatomy.heart_radii
        anatomy.heart_radii = (hr_u * rng.uniform(1.3, 1.5), hr_v * rng.uniform(1.1, 1.2))
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(grid, grid)
    canvas, lungs = render.render_anatomy(u, v, anatomy, rng)
    heart = render.heart_mask(u, v, anatomy.heart_center, anatomy.heart_radii)
    canvas = canvas * (1 - heart) + heart * np.maximum(canvas, 0.6)
    lungs = lungs * (1 - heart)
    findings = [
        render.draw_finding(canvas, u, v, lungs, anatomy, rng, name, side, zone)
        for name, side, zone in findings_spec
    ]
    return render.to_uint8(canvas, rng), findings, anatomy, rng


def _clear_zones(anatomy, findings: list[Finding], rng: np.random.Generator):
    """``[(box, caption)]`` of the lung zones no finding reaches, as many as fill the film up to
    BOXES_PER_FILM boxes."""
    clear = []
    for side, zone in NORMAL_ZONES:
        box = render.zone_box(anatomy, SIDES.index(side), ZONES.index(zone))
        box = tuple(float(np.clip(b, 0.0, 1.0)) for b in box)
        # A zone is clear when no finding reaches into it (a pneumothorax or a large effusion
        # spans more than its own zone; an enlarged heart overlaps the left lower zone).
        if all(_overlap(box, f.box) < 0.1 for f in findings):
            clear.append((side, zone, box))
    out = []
    for k in rng.permutation(len(clear))[: max(0, BOXES_PER_FILM - len(findings))]:
        side, zone, box = clear[k]
        out.append((box, text.normal_caption(side, zone, rng)))
    return out


def render_record(index: int, *, size: int = 128, seed: int = 0) -> schema.Record:
    """Film ``index`` of the dataset ``seed`` at ``size`` px, as a schema record: ``image
    [size, size]`` uint8, ``labels [8]``, ``boxes [3, 4]`` in pixels (findings first, then clear
    zones), one caption and one label per box, and the report."""
    patient = patient_of(index, seed)
    image, findings, anatomy, rng = _film(index, size, seed, patient)
    labels = np.zeros(len(LABELS), np.float32)
    for f in findings:
        labels[LABELS.index(f.name)] = 1.0
    if not findings:
        labels[LABELS.index("no finding")] = 1.0
    report = text.report(findings, rng)
    captions = [text.caption(f, rng) for f in findings]
    box_list = [f.box for f in findings]
    box_labels = [LABELS.index(f.name) for f in findings]
    # Clear zones from a stream of their own: films, reports and finding captions are those of
    # synth_cxr 1.1.0.
    for box, caption in _clear_zones(anatomy, findings, np.random.default_rng([seed, index, 2])):
        box_list.append(box)
        captions.append(caption)
        box_labels.append(LABELS.index("no finding"))
    boxes = np.array(box_list, np.float32).reshape(-1, 4) * size
    return schema.make_record(
        image=image,
        report=report,
        labels=labels,
        id=f"synth-{seed}-{index:07d}",
        patient_id=f"synth-{seed}-{patient}",
        split=split_of(index, seed),
        boxes=boxes,
        box_captions=captions,
        box_labels=box_labels,
    )


def contact_sheet(records: list[schema.Record], path: str, columns: int = 4) -> None:
    """Writes a PNG grid of films with their boxes and captions (for looking at the data)."""
    from PIL import Image, ImageDraw  # only the sheet needs PIL

    # Tiles of at least 256 px keep the captions legible for small films.
    scale = max(1, 256 // records[0]["image"].shape[0])
    size = records[0]["image"].shape[0] * scale
    rows = -(-len(records) // columns)
    sheet = Image.new("RGB", (columns * size, rows * size))
    colours = [(255, 80, 80), (80, 200, 255), (255, 220, 60)]
    for k, record in enumerate(records):
        tile = Image.fromarray(record["image"]).convert("RGB").resize((size, size))
        draw = ImageDraw.Draw(tile)
        for j, (box, caption) in enumerate(
            zip(record["boxes"], record["box_captions"], strict=True)
        ):
            colour = colours[j % len(colours)]
            box = [float(b) * scale for b in box]
            draw.rectangle(box, outline=colour)
            draw.text((box[0], max(box[1] - 11, 0)), caption, fill=colour)
        sheet.paste(tile, ((k % columns) * size, (k // columns) * size))
    sheet.save(path)
