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

import dataclasses

import numpy as np

from region_medclip.data import schema
from region_medclip.data import synth_render as render
from region_medclip.data import synth_text as text

LABELS = text.LABELS
# Where each finding may occur: (side, zone) pairs; cardiomegaly has no lung location.
LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "nodule": tuple((s, z) for s in render.SIDES for z in render.ZONES),
    "mass": tuple((s, z) for s in render.SIDES for z in render.ZONES),
    "consolidation": tuple((s, z) for s in render.SIDES for z in render.ZONES),
    "atelectasis": tuple((s, z) for s in render.SIDES for z in ("middle", "lower")),
    "pleural effusion": tuple((s, "lower") for s in render.SIDES),
    "pneumothorax": tuple((s, "upper") for s in render.SIDES),
    "cardiomegaly": ((None, None),),
}
# The lung zones; a film's zones without findings get "clear" boxes (see render_record).
NORMAL_ZONES = tuple((s, z) for s in render.SIDES for z in render.ZONES)
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


def _mask_box(mask: np.ndarray, threshold: float = 0.3) -> tuple[float, float, float, float]:
    rows = np.nonzero((mask > threshold).any(axis=1))[0]
    cols = np.nonzero((mask > threshold).any(axis=0))[0]
    h, w = mask.shape
    if not len(rows):
        return (0.0, 0.0, 0.0, 0.0)
    return (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)


def _overlap(zone, box) -> float:
    """Fraction of the area of ``zone`` (normalised xyxy) that ``box`` covers."""
    w = max(0.0, min(zone[2], box[2]) - max(zone[0], box[0]))
    h = max(0.0, min(zone[3], box[3]) - max(zone[1], box[1]))
    return w * h / max((zone[2] - zone[0]) * (zone[3] - zone[1]), 1e-12)


def _point_in_zone(rng, anatomy, side: int, zone: int, margin: float = 0.25):
    u0, v0, u1, v1 = render.zone_box(anatomy, side, zone)
    return (
        rng.uniform(u0 + margin * (u1 - u0), u1 - margin * (u1 - u0)),
        rng.uniform(v0 + margin * (v1 - v0), v1 - margin * (v1 - v0)),
    )


def draw_finding(canvas, u, v, lungs, anatomy, rng, name, side, zone) -> Finding:
    """Draws one finding onto ``canvas`` in place and returns it with its box."""
    s = render.SIDES.index(side) if side else 0
    z = render.ZONES.index(zone) if zone else 0
    if name in ("nodule", "mass"):
        center = _point_in_zone(rng, anatomy, s, z)
        big = name == "mass"
        # Sizes are in image fractions: at 128 px a nodule is 7-11 px across and a mass 14-20,
        # so both stay resolvable by a 16-px-patch ViT at the embedded default's resolution.
        radius = rng.uniform(0.055, 0.08) if big else rng.uniform(0.028, 0.042)
        severity = "large" if big and radius > 0.07 else ("small" if radius < 0.033 else "")
        shape = render.blob(u, v, center, radius, rng, irregular=0.18 if big else 0.0)
        canvas += rng.uniform(0.36, 0.46) * shape
        pad = radius * 1.15
        box = (center[0] - pad, center[1] - pad, center[0] + pad, center[1] + pad)
    elif name == "consolidation":
        center = _point_in_zone(rng, anatomy, s, z, margin=0.3)
        patch = np.zeros_like(canvas)
        for _ in range(rng.integers(4, 8)):
            offset = rng.normal(0, 0.03, size=2)
            c = (center[0] + offset[0], center[1] + offset[1])
            patch = np.maximum(patch, render.blob(u, v, c, rng.uniform(0.025, 0.045), rng))
        texture = 0.75 + 0.25 * render.smooth(rng.random(canvas.shape), passes=2)
        patch = render.smooth(patch, passes=2) * lungs * texture
        severity = "dense" if rng.random() < 0.5 else "patchy"
        canvas += (0.42 if severity == "dense" else 0.32) * patch
        box = _mask_box(patch)
    elif name == "atelectasis":
        center = _point_in_zone(rng, anatomy, s, z)
        angle = rng.uniform(-0.35, 0.35)
        half = rng.uniform(0.06, 0.09)
        du, dv = u - center[0], v - center[1]
        along = du * np.cos(angle) + dv * np.sin(angle)
        across = -du * np.sin(angle) + dv * np.cos(angle)
        thick = rng.uniform(0.012, 0.018)  # 1.5-2.3 px at 128 px: a visible plate
        band = np.exp(-((across / thick) ** 2)) * np.clip((half - np.abs(along)) * 60, 0, 1)
        canvas += 0.36 * band * lungs
        severity = str(rng.choice(["linear", "plate-like", "subsegmental"]))
        eu, ev = abs(np.cos(angle)) * half, abs(np.sin(angle)) * half
        box = (
            center[0] - eu - 0.02,
            center[1] - ev - 0.02,
            center[0] + eu + 0.02,
            center[1] + ev + 0.02,
        )
    elif name == "pleural effusion":
        lung = render.lung_mask(u, v, anatomy, s)
        (cu, cv), (ru, rv) = anatomy.lung_centers[s], anatomy.lung_radii[s]
        height = rng.uniform(0.05, 0.16)
        lateral = np.abs(u - cu) / ru * (1 if side == "right" else 1)
        # Meniscus: the fluid climbs higher laterally.
        level = cv + rv * 0.75 - height - 0.04 * lateral
        fluid = lung * np.clip((v - level) * 60, 0, 1)
        canvas += fluid * (0.62 - canvas) * 0.9
        severity = "small" if height < 0.08 else ("moderate" if height < 0.12 else "large")
        box = _mask_box(fluid)
    elif name == "pneumothorax":
        lung = render.lung_mask(u, v, anatomy, s)
        (cu, cv), (ru, rv) = anatomy.lung_centers[s], anatomy.lung_radii[s]
        depth = rng.uniform(0.3, 0.5)
        # The collapsed lung edge (visceral pleura) is a smaller ellipse anchored at the hilum.
        shift = ru * depth * (1 if side == "left" else -1)
        inner = ((u - cu + shift * 0.5) / (ru * (1 - depth))) ** 2 + (
            (v - cv - rv * depth * 0.4) / (rv * (1 - depth * 0.6))
        ) ** 2
        air = lung * np.clip((inner - 1.0) * 4.0, 0, 1) * (v < cv + 0.05)
        line = lung * np.exp(-(((inner - 1.0) / 0.06) ** 2)) * (v < cv)
        canvas[:] = canvas * (1 - air) + air * 0.05 + 0.2 * line
        severity = "small" if depth < 0.38 else "large"
        box = _mask_box(air)
    elif name == "cardiomegaly":
        # Drawn by render_heart with enlarged radii; the box is the heart's bounds.
        (hu, hv), (hr_u, hr_v) = anatomy.heart_center, anatomy.heart_radii
        severity = "mild" if hr_u < 0.165 else "moderate"
        box = (hu - hr_u, hv - hr_v, hu + hr_u, hv + hr_v)
    else:
        raise ValueError(f"unknown finding {name!r}")
    box = tuple(float(np.clip(b, 0.0, 1.0)) for b in box)
    return Finding(name, side, zone, severity, box)


def render_record(index: int, *, size: int = 128, seed: int = 0) -> schema.Record:
    """Film ``index`` of the dataset ``seed`` at ``size`` px, as a schema record."""
    patient = patient_of(index, seed)
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
        draw_finding(canvas, u, v, lungs, anatomy, rng, name, side, zone)
        for name, side, zone in findings_spec
    ]
    image = render.to_uint8(canvas, rng)
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
    normal_rng = np.random.default_rng([seed, index, 2])
    clear = []
    for side, zone in NORMAL_ZONES:
        box = render.zone_box(anatomy, render.SIDES.index(side), render.ZONES.index(zone))
        box = tuple(float(np.clip(b, 0.0, 1.0)) for b in box)
        # A zone is clear when no finding reaches into it (a pneumothorax or a large effusion
        # spans more than its own zone; an enlarged heart overlaps the left lower zone).
        if all(_overlap(box, f.box) < 0.1 for f in findings):
            clear.append((side, zone, box))
    for k in normal_rng.permutation(len(clear))[: max(0, BOXES_PER_FILM - len(findings))]:
        side, zone, box = clear[k]
        box_list.append(box)
        captions.append(text.normal_caption(side, zone, normal_rng))
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
    from PIL import Image, ImageDraw

    # Tiles of at least 256 px keep the captions legible for small films.
    scale = max(1, 256 // records[0]["image"].shape[0])
    size = records[0]["image"].shape[0] * scale
    rows = -(-len(records) // columns)
    sheet = Image.new("RGB", (columns * size, rows * size))
    colours = [(255, 80, 80), (80, 200, 255), (255, 220, 60)]
    for k, record in enumerate(records):
        tile = Image.fromarray(record["image"]).convert("RGB").resize((size, size))
        draw = ImageDraw.Draw(tile)
        for j, (box, text_) in enumerate(zip(record["boxes"], record["box_captions"], strict=True)):
            colour = colours[j % len(colours)]
            box = [float(b) * scale for b in box]
            draw.rectangle(box, outline=colour)
            draw.text((box[0], max(box[1] - 11, 0)), text_, fill=colour)
        sheet.paste(tile, ((k % columns) * size, (k // columns) * size))
    sheet.save(path)


def main(argv) -> None:
    """CLI: build the dataset into ``--out`` and/or write a contact sheet."""
    del argv
    from absl import flags

    from region_medclip.data.builders import synth_cxr

    f = flags.FLAGS
    if f.sheet:
        contact_sheet([render_record(i, size=f.size, seed=f.seed) for i in range(16)], f.sheet)
        print(f"wrote {f.sheet}")
    if f.out:
        b = synth_cxr.ensure_built(f.out, size=f.size, num=f.num, seed=f.seed)
        print(f"built {b.info.full_name} in {f.out}: {dict(b.info.splits)}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "TFDS data_dir to build synth_cxr into.")
    flags.DEFINE_integer("num", 26_000, "Number of films (all splits).")
    flags.DEFINE_integer("size", 128, "Image size in pixels.")
    flags.DEFINE_integer("seed", 0, "Generator seed.")
    flags.DEFINE_string("sheet", None, "Write a PNG contact sheet of 16 films here.")
    app.run(main)
