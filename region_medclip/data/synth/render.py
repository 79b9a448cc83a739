"""Procedural chest-radiograph rendering for ``synth_cxr``: anatomy and finding signatures.

Everything works in normalised image coordinates ``(u, v) ∈ [0, 1]²`` (u to the right, v down)
on a float "attenuation" canvas where brighter means denser, as on a radiograph: air is dark,
soft tissue grey, bone and fluid bright. The radiological convention holds: the patient's right
is on the image's left.
"""

import dataclasses
import functools

import numpy as np

from region_medclip.data.synth.spec import SIDES, ZONES, Finding


@dataclasses.dataclass
class Anatomy:
    """Per-patient geometry (normalised units)."""

    lung_centers: tuple[tuple[float, float], tuple[float, float]]  # (u, v) right, left
    lung_radii: tuple[tuple[float, float], tuple[float, float]]  # (ru, rv)
    heart_center: tuple[float, float]
    heart_radii: tuple[float, float]
    body_halfwidth: float
    rib_spacing: float
    rib_phase: float
    tilt: float


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Random but plausible patient geometry."""
    cy = rng.uniform(0.44, 0.5)
    ry = rng.uniform(0.26, 0.31)
    rx = rng.uniform(0.13, 0.16)
    gap = rng.uniform(0.17, 0.2)
    return Anatomy(
        lung_centers=((0.5 - gap, cy), (0.5 + gap, cy + rng.uniform(-0.01, 0.01))),
        lung_radii=((rx, ry), (rx * rng.uniform(0.92, 1.0), ry * rng.uniform(0.95, 1.0))),
        heart_center=(0.5 + rng.uniform(0.04, 0.07), cy + ry * rng.uniform(0.45, 0.6)),
        heart_radii=(rng.uniform(0.11, 0.13), rng.uniform(0.09, 0.11)),
        body_halfwidth=rng.uniform(0.38, 0.44),
        rib_spacing=rng.uniform(0.075, 0.09),
        rib_phase=rng.uniform(0, 1),
        tilt=rng.uniform(-0.02, 0.02),
    )


def lung_mask(u: np.ndarray, v: np.ndarray, anatomy: Anatomy, side: int) -> np.ndarray:
    """Soft (0..1) mask of one lung field: an ellipse with a domed diaphragm cut."""
    (cu, cv), (ru, rv) = anatomy.lung_centers[side], anatomy.lung_radii[side]
    d = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
    inside = np.clip((1.0 - d) * 6.0, 0.0, 1.0)
    # The diaphragm dome: lower edge highest at the lung's middle.
    dome = cv + rv * (0.75 - 0.35 * ((u - cu) / ru) ** 2)
    return inside * np.clip((dome - v) * 40.0, 0.0, 1.0)


def zone_box(anatomy: Anatomy, side: int, zone: int) -> tuple[float, float, float, float]:
    """``(u0, v0, u1, v1)`` of one third (upper/middle/lower) of a lung field."""
    (cu, cv), (ru, rv) = anatomy.lung_centers[side], anatomy.lung_radii[side]
    top, bottom = cv - rv * 0.9, cv + rv * 0.8
    third = (bottom - top) / 3
    return cu - ru * 0.85, top + zone * third, cu + ru * 0.85, top + (zone + 1) * third


def render_anatomy(u: np.ndarray, v: np.ndarray, anatomy: Anatomy, rng: np.random.Generator):
    """Returns ``(canvas, lungs)``: the attenuation map of a normal chest and the lung mask."""
    tilt_u = u + anatomy.tilt * (v - 0.5)
    lateral = np.abs(tilt_u - 0.5)
    canvas = np.full(u.shape, 0.04, np.float32)
    # Torso: narrow at the neck, sloping shoulders, widest at the lower chest; brighter towards
    # the edges (more tissue is traversed obliquely) and below the diaphragm (abdomen).
    halfwidth = anatomy.body_halfwidth * (0.55 + 0.45 * np.clip((v - 0.02) / 0.16, 0, 1) ** 0.5)
    body = np.clip((halfwidth - lateral) * 30.0, 0.0, 1.0) * np.clip(v * 25.0, 0.0, 1.0)
    canvas += body * (0.4 + 0.3 * lateral + 0.1 * np.clip((v - 0.7) * 5, 0, 1))
    lungs = np.maximum(lung_mask(tilt_u, v, anatomy, 0), lung_mask(tilt_u, v, anatomy, 1))
    # Lungs are air: dark, with vascular markings that fade from the hila to the periphery.
    # Fine reticular texture: upsampled noise, kept faint so that it never looks like a nodule.
    coarse = rng.normal(0.0, 1.0, size=(u.shape[0] // 3 + 1, u.shape[1] // 3 + 1))
    markings = smooth(np.kron(coarse, np.ones((3, 3)))[: u.shape[0], : u.shape[1]], passes=1)
    hilum = np.exp(-(((lateral - 0.1) / 0.12) ** 2)) * np.exp(-(((v - 0.45) / 0.15) ** 2))
    lung_density = 0.14 + 0.02 * markings * (0.5 + hilum) + 0.1 * hilum
    canvas = canvas * (1 - lungs) + lungs * lung_density.astype(np.float32)
    # Ribs: posterior arcs rising from the spine and curving down laterally.
    arc = v - 0.25 * lateral + 1.2 * lateral**2
    phase = (arc / anatomy.rib_spacing + anatomy.rib_phase) % 1.0
    rib = np.clip(1.0 - np.abs(phase - 0.5) * 6.0, 0.0, 1.0)
    canvas += 0.1 * rib * ((lateral > 0.05) & (v > 0.1) & (v < 0.78)) * body
    # Clavicles.
    for sign in (-1.0, 1.0):
        line = v - (0.15 + 0.12 * np.abs(tilt_u - 0.5))
        near = (sign * (tilt_u - 0.5) > 0.03) & (np.abs(tilt_u - 0.5) < 0.3)
        canvas += 0.22 * np.exp(-((line / 0.012) ** 2)) * near
    # Spine and mediastinum: a bright midline band.
    canvas += 0.28 * np.exp(-(((tilt_u - 0.5) / 0.045) ** 2)) * np.clip((v - 0.05) * 10, 0, 1)
    return canvas, lungs


def heart_mask(u, v, center, radii) -> np.ndarray:
    """Soft ellipse of the cardiac silhouette."""
    d = ((u - center[0]) / radii[0]) ** 2 + ((v - center[1]) / radii[1]) ** 2
    return np.clip((1.0 - d) * 5.0, 0.0, 1.0)


def blob(u, v, center, radius, rng, *, irregular: float = 0.0, soft: float = 3.0) -> np.ndarray:
    """Round (optionally lobulated) opacity profile in 0..1."""
    du, dv = u - center[0], v - center[1]
    r = np.sqrt(du**2 + dv**2) + 1e-6
    if irregular:
        angle = np.arctan2(dv, du)
        k = rng.integers(3, 7)
        r = r * (1.0 + irregular * np.sin(k * angle + rng.uniform(0, 6.3)))
    return np.clip((1.0 - r / radius) * soft, 0.0, 1.0)


def smooth(x: np.ndarray, passes: int = 1) -> np.ndarray:
    """Cheap separable [1 2 1]/4 blur, edges replicated."""
    for _ in range(passes):
        p = np.pad(x, 1, mode="edge")
        x = (p[:-2, 1:-1] + 2 * p[1:-1, 1:-1] + p[2:, 1:-1]) / 4
        p = np.pad(x, 1, mode="edge")
        x = (p[1:-1, :-2] + 2 * p[1:-1, 1:-1] + p[1:-1, 2:]) / 4
    return x


def to_uint8(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Film response: exposure and contrast jitter, quantum noise, slight blur, 8 bits."""
    gain = rng.uniform(0.9, 1.15)
    gamma = rng.uniform(0.85, 1.15)
    x = np.clip(canvas * gain, 0.0, 1.0) ** gamma
    x = x + rng.normal(0.0, rng.uniform(0.015, 0.035), size=x.shape)
    x = smooth(x, passes=1)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# Finding signatures. Each drawer adds one finding to the canvas ``[H, W]`` in place and returns
# ``(severity word, box (u0, v0, u1, v1))``; ``s`` and ``z`` index SIDES and ZONES. The order of
# the draws from ``rng`` is part of the dataset: changing it changes every later film detail.


def _mask_box(mask: np.ndarray, threshold: float = 0.3) -> tuple[float, float, float, float]:
    rows = np.nonzero((mask > threshold).any(axis=1))[0]
    cols = np.nonzero((mask > threshold).any(axis=0))[0]
    h, w = mask.shape
    if not len(rows):
        return (0.0, 0.0, 0.0, 0.0)
    return (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)


def _point_in_zone(rng, anatomy, side: int, zone: int, margin: float = 0.25):
    u0, v0, u1, v1 = zone_box(anatomy, side, zone)
    return (
        rng.uniform(u0 + margin * (u1 - u0), u1 - margin * (u1 - u0)),
        rng.uniform(v0 + margin * (v1 - v0), v1 - margin * (v1 - v0)),
    )


def _draw_round(canvas, u, v, lungs, anatomy, rng, side, s, z, *, big: bool):
    """A nodule (``big=False``) or a mass: a round, for a mass lobulated, opacity."""
    center = _point_in_zone(rng, anatomy, s, z)
    # Sizes are in image fractions: at 128 px a nodule is 7-11 px across and a mass 14-20,
    # so both stay resolvable by a 16-px-patch ViT at the embedded default's resolution.
    radius = rng.uniform(0.055, 0.08) if big else rng.uniform(0.028, 0.042)
    severity = "large" if big and radius > 0.07 else ("small" if radius < 0.033 else "")
    shape = blob(u, v, center, radius, rng, irregular=0.18 if big else 0.0)
    canvas += rng.uniform(0.36, 0.46) * shape
    pad = radius * 1.15
    return severity, (center[0] - pad, center[1] - pad, center[0] + pad, center[1] + pad)


def _draw_consolidation(canvas, u, v, lungs, anatomy, rng, side, s, z):
    center = _point_in_zone(rng, anatomy, s, z, margin=0.3)
    patch = np.zeros_like(canvas)
    for _ in range(rng.integers(4, 8)):
        offset = rng.normal(0, 0.03, size=2)
        c = (center[0] + offset[0], center[1] + offset[1])
        patch = np.maximum(patch, blob(u, v, c, rng.uniform(0.025, 0.045), rng))
    texture = 0.75 + 0.25 * smooth(rng.random(canvas.shape), passes=2)
    patch = smooth(patch, passes=2) * lungs * texture
    severity = "dense" if rng.random() < 0.5 else "patchy"
    canvas += (0.42 if severity == "dense" else 0.32) * patch
    return severity, _mask_box(patch)


def _draw_atelectasis(canvas, u, v, lungs, anatomy, rng, side, s, z):
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
    return severity, box


def _draw_effusion(canvas, u, v, lungs, anatomy, rng, side, s, z):
    lung = lung_mask(u, v, anatomy, s)
    (cu, cv), (ru, rv) = anatomy.lung_centers[s], anatomy.lung_radii[s]
    height = rng.uniform(0.05, 0.16)
    lateral = np.abs(u - cu) / ru
    # Meniscus: the fluid climbs higher laterally.
    level = cv + rv * 0.75 - height - 0.04 * lateral
    fluid = lung * np.clip((v - level) * 60, 0, 1)
    canvas += fluid * (0.62 - canvas) * 0.9
    severity = "small" if height < 0.08 else ("moderate" if height < 0.12 else "large")
    return severity, _mask_box(fluid)


def _draw_pneumothorax(canvas, u, v, lungs, anatomy, rng, side, s, z):
    lung = lung_mask(u, v, anatomy, s)
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
    return ("small" if depth < 0.38 else "large"), _mask_box(air)


def _draw_cardiomegaly(canvas, u, v, lungs, anatomy, rng, side, s, z):
    # Drawn with the heart (records.render_record enlarges its radii); the box is its bounds.
    (hu, hv), (hr_u, hr_v) = anatomy.heart_center, anatomy.heart_radii
    severity = "mild" if hr_u < 0.165 else "moderate"
    return severity, (hu - hr_u, hv - hr_v, hu + hr_u, hv + hr_v)


_DRAWERS = {
    "nodule": functools.partial(_draw_round, big=False),
    "mass": functools.partial(_draw_round, big=True),
    "consolidation": _draw_consolidation,
    "atelectasis": _draw_atelectasis,
    "pleural effusion": _draw_effusion,
    "pneumothorax": _draw_pneumothorax,
    "cardiomegaly": _draw_cardiomegaly,
}


def draw_finding(canvas, u, v, lungs, anatomy, rng, name, side, zone) -> Finding:
    """Draws one finding onto ``canvas [H, W]`` in place and returns it with its box.

    ``u, v [H, W]`` are the pixel-centre coordinates, ``lungs [H, W]`` the soft lung mask (heart
    removed); the box is normalised and clipped to ``[0, 1]``.

    Raises:
      ValueError: ``name`` is not a finding.
    """
    if name not in _DRAWERS:
        raise ValueError(f"unknown finding {name!r}")
    s = SIDES.index(side) if side else 0
    z = ZONES.index(zone) if zone else 0
    severity, box = _DRAWERS[name](canvas, u, v, lungs, anatomy, rng, side, s, z)
    box = tuple(float(np.clip(b, 0.0, 1.0)) for b in box)
    return Finding(name, side, zone, severity, box)
