"""Procedural chest-radiograph rendering for ``synth_cxr``: anatomy and finding signatures.

Everything works in normalised image coordinates ``(u, v) ∈ [0, 1]²`` (u to the right, v down)
on a float "attenuation" canvas where brighter means denser, as on a radiograph: air is dark,
soft tissue grey, bone and fluid bright. The radiological convention holds: the patient's right
is on the image's left.
"""

import dataclasses

import numpy as np

# Finding signatures, each drawn by one function below.
SIDES = ("right", "left")  # patient's side; "right" is on the image's left
ZONES = ("upper", "middle", "lower")


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
