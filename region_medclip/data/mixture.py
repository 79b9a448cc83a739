"""Training on several sources at once: paired ones mixed by weight, and MedCLIP's unpaired
images and reports.

``config.data.train`` names one dataset (``synth_cxr``) or a weighted mixture of entries
``NAME[#i/k][@KIND][:WEIGHT]``, comma-separated:

- ``NAME``: a registry dataset (``data.registry``);
- ``#i/k``: only its records ``i, i + k, i + 2k, …`` (disjoint parts of one dataset);
- ``@KIND``: ``paired`` (default: image and report), ``images`` (its images only) or ``texts``
  (its reports only) — MedCLIP's decoupling of images from texts;
- ``:WEIGHT``: its share of the stream (default 1; weights are normalised).

``mimic_cxr:0.7,roco:0.3`` mixes two paired sources; ``synth_cxr#0/3,synth_cxr#1/3@images,
synth_cxr#2/3@texts`` gives a third of the films paired, a third as images alone and a third as
reports alone. Each source is sharded, seeded and shuffled on its own, then grain's
``MapDataset.mix`` interleaves them by index: the stream is a pure function of the seed and the
position, so the iterator state stays one index and exact resume holds.

A row of an unpaired source keeps every key of a paired one (fixed shapes), marks the side it
lacks in ``has_image`` / ``has_text`` and has no boxes (``roi_mask`` all False: a box caption is
text that belongs to its film). Only the MedCLIP loss learns from such rows
(``config.loss.global_kind=medclip``); the region losses see none of their boxes.
"""

import dataclasses
import re

import grain
import numpy as np

KINDS = ("paired", "images", "texts")
_ENTRY = re.compile(
    r"^(?P<name>[A-Za-z0-9_.\-]+)(#(?P<part>\d+)/(?P<parts>\d+))?(@(?P<kind>\w+))?"
    r"(:(?P<weight>[^:]+))?$"
)


@dataclasses.dataclass(frozen=True)
class Source:
    """One entry of a mixture (see the module docstring)."""

    name: str
    weight: float = 1.0
    kind: str = "paired"
    part: int = 0
    parts: int = 1

    @property
    def label(self) -> str:
        """How the metrics name it (``data/source/<label>``)."""
        part = f"#{self.part}/{self.parts}" if self.parts > 1 else ""
        kind = f"@{self.kind}" if self.kind != "paired" else ""
        return f"{self.name}{part}{kind}"


def parse(spec: str, key: str = "config.data.train") -> list[Source]:
    """The sources of ``spec`` (see the module docstring).

    Raises:
      ValueError: naming ``key`` and the entry for a malformed entry, an unknown kind, a weight
        that is not a positive number, a part outside ``0 … k-1``, or a repeated entry.
    """
    sources = []
    for raw in filter(None, (e.strip() for e in str(spec).split(","))):
        m = _ENTRY.match(raw)
        if not m:
            raise ValueError(f"{key}={spec!r}: cannot read {raw!r} as NAME[#i/k][@KIND][:WEIGHT]")
        kind = m["kind"] or "paired"
        if kind not in KINDS:
            raise ValueError(f"{key}: {raw!r} has kind {kind!r}; choose one of {list(KINDS)}")
        try:
            weight = float(m["weight"]) if m["weight"] is not None else 1.0
        except ValueError:
            weight = float("nan")
        if not weight > 0 or not np.isfinite(weight):
            raise ValueError(f"{key}: {raw!r} has weight {m['weight']!r}; it must be positive")
        part, parts = int(m["part"] or 0), int(m["parts"] or 1)
        if parts < 1 or not 0 <= part < parts:
            raise ValueError(f"{key}: {raw!r} takes part {part} of {parts}; need 0 ≤ i < k")
        sources.append(Source(m["name"], weight, kind, part, parts))
    if not sources:
        raise ValueError(f"{key}={spec!r}: names no dataset")
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{key}={spec!r}: an entry is repeated ({labels})")
    return sources


def is_mixture(spec: str) -> bool:
    """Whether ``spec`` is more than one plain dataset name."""
    sources = parse(spec)
    return len(sources) > 1 or sources[0] != Source(sources[0].name)


def unpaired(spec: str) -> bool:
    """Whether any source of ``spec`` gives images or reports alone."""
    return any(s.kind != "paired" for s in parse(spec))


class Tag(grain.transforms.Map):
    """Marks an example with its source's index (counted per batch, then dropped)."""

    def __init__(self, index: int):
        self.index = index

    def map(self, example: dict) -> dict:
        return {**example, "_source": np.int32(self.index)}


class Unpair(grain.transforms.Map):
    """A finalised example as its source's ``kind`` gives it: ``has_image`` / ``has_text``, and
    for an unpaired kind the missing side blanked and no boxes (see the module docstring)."""

    def __init__(self, kind: str):
        self.kind = kind

    def map(self, example: dict) -> dict:
        if "_skip" in example:
            return example
        out = dict(example)
        out["has_image"] = np.bool_(self.kind != "texts")
        out["has_text"] = np.bool_(self.kind != "images")
        if self.kind == "paired":
            return out
        if self.kind == "texts":
            out["images"] = np.zeros_like(example["images"])
        else:
            out["texts"] = np.zeros_like(example["texts"])
        out["roi_mask"] = np.zeros_like(example["roi_mask"])
        out["box_finding"] = np.zeros_like(example["box_finding"])
        out["neg_mask"] = np.zeros_like(example["neg_mask"])
        out["cap_ids"] = np.full_like(example["cap_ids"], -1)
        if "report_neg_mask" in example:
            out["report_neg_mask"] = np.zeros_like(example["report_neg_mask"])
        return out


def mix(datasets: list[grain.MapDataset], sources: list[Source]) -> grain.MapDataset:
    """One infinite stream of the per-source streams ``datasets`` (each already sharded,
    shuffled and repeated), interleaved by the sources' weights."""
    weights = [s.weight for s in sources]
    tagged = [ds.map(Tag(i)) for i, ds in enumerate(datasets)]
    return grain.MapDataset.mix(tagged, [w / sum(weights) for w in weights])
