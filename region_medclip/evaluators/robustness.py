"""Zero-shot AUROC of the same films presented as real films arrive: non-square, JPEG, 16-bit, RGB.

Every synthetic film is a square PNG; a real chest film is taller or wider than it is broad,
often a JPEG, and as often a 16-bit PNG. Each presentation below encodes and decodes a film as
a file of that kind would be, and the model's zero-shot function scores every presentation of
the same films, so the differences to ``square PNG`` are the model's sensitivity to the
presentation and nothing else.

``python -m region_medclip.robustness --workdir=W`` runs it through ``load(W).zero_shot``.
"""

import io
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from region_medclip.evaluators import common

# Width : height of the non-square presentations: a portrait PA film and a landscape one.
ASPECTS = {"5:6": 5 / 6, "4:3": 4 / 3}
JPEG_QUALITY = 85


def _png(image: np.ndarray) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def _jpeg(image: np.ndarray) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _aspect(image: np.ndarray, ratio: float) -> np.ndarray:
    """The square film stretched to ``width / height = ratio``, keeping its longer side."""
    size = image.shape[0]
    width, height = (size, round(size / ratio)) if ratio > 1 else (round(size * ratio), size)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def presentations() -> dict[str, Callable[[np.ndarray], object]]:
    """Name → function from a square uint8 ``[S, S]`` film to what a reader would hand the
    model: a decoded PIL image or an array (``[H, W]``, ``[H, W, 3]``, uint8 or uint16)."""
    out: dict[str, Callable[[np.ndarray], object]] = {"square PNG": _png}
    for name, ratio in ASPECTS.items():
        out[name] = lambda image, ratio=ratio: _png(_aspect(image, ratio))
    out[f"JPEG q{JPEG_QUALITY}"] = _jpeg
    out["16-bit PNG"] = lambda image: _png(image.astype(np.uint16) * 257)
    out["RGB"] = lambda image: np.repeat(image[..., None], 3, axis=-1)
    return out


def evaluate(
    zero_shot: Callable[[list], np.ndarray],
    films: Sequence[np.ndarray],
    labels: np.ndarray,
    names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Macro and per-finding AUROC of each presentation of ``films``.

    Args:
      zero_shot: a list of films as :func:`presentations` makes them → ``[N, F]``
        probabilities (e.g. ``load(W).zero_shot``).
      films: ``N`` square uint8 ``[S, S]`` films.
      labels: ``[N, F]`` multi-hot findings, in the order of ``zero_shot``'s columns.
      names: the ``F`` finding names (for the per-finding keys); default ``f0, f1, ...``.

    Returns:
      ``{presentation: {"macro_auroc", "delta" (to square PNG), "auroc/<finding>"...}}``.
    """
    labels = np.asarray(labels)
    names = list(names) if names is not None else [f"f{c}" for c in range(labels.shape[1])]
    results = {}
    for name, present in presentations().items():
        probs = zero_shot([present(film) for film in films])
        per_class = common.per_class_auroc(probs, labels)
        row = {"macro_auroc": common.macro_auroc(probs, labels)}
        row.update({f"auroc/{n}": float(v) for n, v in zip(names, per_class, strict=True)})
        results[name] = row
    reference = results["square PNG"]["macro_auroc"]
    for row in results.values():
        row["delta"] = row["macro_auroc"] - reference
    return results


def confusions(
    probs: np.ndarray, labels: np.ndarray, names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """What each finding is mistaken for: its AUROC over every film, and without the negatives
    that hold each other finding in turn.

    A finding whose AUROC rises far when the films of one other finding leave its negatives is
    scored high on those films: the model confuses the two (a nodule with a mass, say), rather
    than failing to see the finding.

    Args:
      probs: ``[N, F]`` zero-shot probabilities.
      labels: ``[N, F]`` multi-hot findings.
      names: the ``F`` finding names.

    Returns:
      ``{finding: {"all": AUROC, "without <other>": AUROC, ...}}`` (NaN where a subset lacks
      positives or negatives).
    """
    probs, labels = np.asarray(probs), np.asarray(labels) > 0
    out = {}
    for c, name in enumerate(names):
        row = {"all": float(common.auroc(probs[:, c], labels[:, c]))}
        for o, other in enumerate(names):
            if o != c:
                keep = labels[:, c] | ~labels[:, o]
                row[f"without {other}"] = float(common.auroc(probs[keep, c], labels[keep, c]))
        out[name] = row
    return out


def confusion_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown of :func:`confusions`: one line a finding, one column an excluded finding."""
    names = list(rows)
    lines = ["| finding | all films | " + " | ".join(f"without {n}" for n in names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    for name, row in rows.items():
        cells = ["–" if o == name else f"{row[f'without {o}']:.3f}" for o in names]
        lines.append(f"| {name} | {row['all']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def synth_films(
    num: int, *, size: int, split: str = "test", seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The first ``num`` synth_cxr films of ``split`` in index order, rendered at ``size`` px:
    ``(image [size, size] uint8, labels [8])`` pairs."""
    from region_medclip.data.synth import records

    index, found = 0, 0
    while found < num:
        if records.split_of(index, seed) == split:
            record = records.render_record(index, size=size, seed=seed)
            yield record["image"], record["labels"]
            found += 1
        index += 1


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table of :func:`evaluate`'s results, one row a presentation."""
    lines = ["| presentation | macro AUROC | Δ to square PNG |", "|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['macro_auroc']:.4f} | {row['delta']:+.4f} |")
    return "\n".join(lines)
