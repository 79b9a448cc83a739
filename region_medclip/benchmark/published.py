"""Published reference numbers for the benchmark tables, each with the paper and table it is from.

Every number here was read in its source: a paper's own text or table, or the authors' official
README or model card where it reproduces the paper's numbers. A row that could not be read in a
source is left out rather than filled in from memory. The tables print these rows labelled "as
reported", in rows of their own; they are never mixed with, averaged with, or ranked against our
numbers, because the splits, prompts and preprocessing differ from paper to paper (and often
from ours).

Scale of ``Published.value``:

- accuracy, AUROC, F1 and mIoU are fractions in [0, 1]. Papers print the first three as
  percentages; they are typed here as printed and divided by 100 by ``_percent_rows``, so each
  literal can be checked against the source by eye. mIoU is printed as a fraction already.
- CNR (contrast-to-noise ratio, MS-CXR phrase grounding) is unitless and kept as printed.

Metric names: ``accuracy``, ``f1``, ``auroc``; ``auroc@1%``, ``auroc@10%``, ``auroc@100%`` for
linear probes trained on that fraction of the training labels; ``cnr`` (average over MS-CXR
categories) and ``miou`` for grounding.
"""

import dataclasses
from collections.abc import Mapping

PROTOCOLS = (
    "chexpert_5x200",
    "linear_probe_chexpert",
    "linear_probe_rsna",
    "zero_shot_chexpert",
    "zero_shot_chestxray14",
    "zero_shot_rsna",
    "ms_cxr_grounding",
)


@dataclasses.dataclass(frozen=True)
class Published:
    """One number as a paper reports it.

    Attributes:
      protocol: one of ``PROTOCOLS``.
      method: the method's name as the source prints it, e.g. "MedCLIP" or "GLoRIA-MIMIC".
      metric: e.g. "accuracy", "auroc@1%", "cnr", "miou".
      value: accuracy/AUROC/F1/mIoU as a fraction in [0, 1]; CNR as printed.
      source: short citation of the paper (or official card/README) the number was read in.
      table: the table it was read in, as that source numbers it.
      url: where it was read.
      note: provenance ("as reported; ..."), including when the reporting paper evaluated
        someone else's method itself.
    """

    protocol: str
    method: str
    metric: str
    value: float
    source: str
    table: str
    url: str
    note: str

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; expected one of {PROTOCOLS}")


@dataclasses.dataclass(frozen=True)
class _Reference:
    """Where a block of rows was read: citation, table, url and the note every row carries."""

    source: str
    table: str
    url: str
    note: str


def _rows(
    *,
    protocol: str,
    method: str,
    reference: _Reference,
    values: Mapping[str, float],
    scale: float,
    note: str = "",
) -> tuple[Published, ...]:
    """One ``Published`` per ``metric: printed value``, the value divided by ``scale``."""
    full_note = f"{reference.note}; {note}" if note else reference.note
    return tuple(
        Published(
            protocol=protocol,
            method=method,
            metric=metric,
            value=round(printed / scale, 6),
            source=reference.source,
            table=reference.table,
            url=reference.url,
            note=full_note,
        )
        for metric, printed in values.items()
    )


def _percent_rows(**kwargs) -> tuple[Published, ...]:
    """``_rows`` for values printed as percentages."""
    return _rows(scale=100.0, **kwargs)


def _as_printed_rows(**kwargs) -> tuple[Published, ...]:
    """``_rows`` for values printed on their own scale (CNR, mIoU as a fraction)."""
    return _rows(scale=1.0, **kwargs)


def _fractions(printed: tuple[float, float, float]) -> dict[str, float]:
    """Linear-probe AUROCs printed for 1 %, 10 %, 100 % of the training labels, keyed by metric."""
    return dict(zip(("auroc@1%", "auroc@10%", "auroc@100%"), printed, strict=True))


# --- Sources ---------------------------------------------------------------------------------

_G2D = "Liu et al., G2D, NeurIPS 2024"
_G2D_URL = "https://arxiv.org/abs/2312.01522"
_G2D_READ = "NeurIPS 2024 camera-ready text"
_G2D_LINEAR = _Reference(
    source=_G2D,
    table="Table 4",
    url=_G2D_URL,
    note=(
        f"as reported in G2D Table 4 (linear classification, frozen encoder, metric as MGCA); "
        f"{_G2D_READ}"
    ),
)
_G2D_ZERO_SHOT = _Reference(
    source=_G2D,
    table="Table 2(b)",
    url=_G2D_URL,
    note=(
        "as reported in G2D Table 2(b) (zero-shot classification; CheXpert and ChestX-ray14 on "
        "their official test splits, RSNA on MedKLIP's test split); "
        f"{_G2D_READ}"
    ),
)

_EGMA = "Ma et al., EGMA, NeurIPS 2024"
_EGMA_URL = "https://openreview.net/pdf?id=0bINeW40u4"
_EGMA_READ = "NeurIPS 2024 camera-ready text"
_EGMA_LINEAR = _Reference(
    source=_EGMA,
    table="Table 1",
    url=_EGMA_URL,
    note=(
        "as reported in EGMA Table 1 (linear classification, frozen encoder; CheXpert test = "
        f"official validation set of 202 images, RSNA 70/15/15 split); {_EGMA_READ}"
    ),
)
_EGMA_ZERO_SHOT = _Reference(
    source=_EGMA,
    table="Table 2",
    url=_EGMA_URL,
    note=(
        "as reported in EGMA Table 2 (zero-shot, GLoRIA's radiologist prompts; the table does "
        f"not say which baseline rows EGMA re-ran); {_EGMA_READ}"
    ),
)

_ASG = "ASG (Anatomical Structure-Guided Medical VLP), official code README"
_ASG_URL = "https://github.com/ASGMVLP/ASGMVLP_CODE/blob/088e89698f41bff1ce19cb9e3469c2223c751a5a/README.md"
_ASG_LINEAR = _Reference(
    source=_ASG,
    table="README 'Linear Probe Classification' table",
    url=_ASG_URL,
    note="as reported in the ASG authors' README (data split and metric from MGCA)",
)
_ASG_ZERO_SHOT = _Reference(
    source=_ASG,
    table="README 'Zero-Shot Classification' table",
    url=_ASG_URL,
    note=(
        "as reported in the ASG authors' README (same data split as their linear probe; its "
        "'NIH X-ray' columns are ChestX-ray14)"
    ),
)

_CXR_BERT_CARD = _Reference(
    source="Boecking et al., BioViL, ECCV 2022 (authors' model card)",
    table="model card 'Performance' table (avg. CNR)",
    url="https://huggingface.co/microsoft/BiomedVLP-CXR-BERT-specialized",
    note=(
        "as reported in the BioViL authors' CXR-BERT-specialized model card, which points to the "
        "ECCV 2022 paper for details; the paper's own table number was not seen"
    ),
)
_BIOVIL_T_CARD = _Reference(
    source="Bannur et al., BioViL-T, CVPR 2023 (authors' model card)",
    table="model card 'Performance' table",
    url="https://huggingface.co/microsoft/BiomedVLP-BioViL-T",
    note=(
        "as reported in the BioViL-T authors' model card, which points to the CVPR 2023 paper; "
        "its BioViL and BioViL-L rows differ from the BioViL card's (1.07 vs 1.027 CNR); the "
        "paper's own table number was not seen"
    ),
)

# --- Rows --------------------------------------------------------------------------------------

_G2D_LINEAR_PRINTED = {
    # method: (CheXpert AUC 1/10/100 %, RSNA AUC 1/10/100 %), as printed in G2D Table 4.
    "Random init": ((56.1, 62.6, 65.7), (58.9, 69.4, 74.1)),
    "ImageNet init": ((74.4, 79.7, 81.4), (74.9, 74.5, 76.3)),
    "ConVIRT": ((85.9, 86.8, 87.3), (77.4, 80.1, 81.3)),
    "GLoRIA": ((86.6, 87.8, 88.1), (86.1, 88.0, 88.6)),
    "GLoRIA-MIMIC": ((87.1, 88.7, 88.0), (87.0, 89.4, 90.2)),
    "MGCA": ((87.6, 88.0, 88.2), (88.6, 89.1, 89.9)),
    "MRM": ((88.5, 88.5, 88.7), (91.3, 92.7, 93.3)),
    "MedKLIP": ((86.2, 86.5, 87.7), (87.3, 88.0, 89.3)),
    "G2D": ((89.7, 90.4, 91.1), (92.2, 92.9, 93.6)),
}
_G2D_LINEAR_NOTES = {
    "MedKLIP": "G2D marks MedKLIP as using disease-level annotations in pre-training",
    "G2D": "G2D's own result",
}

_EGMA_LINEAR_PRINTED = {
    # method: (CheXpert AUC 1/10/100 %, RSNA AUC 1/10/100 %), as printed in EGMA Table 1.
    "BioViL": ((81.95, 85.37, 88.62), (81.76, 85.68, 88.64)),
    "MedCLIP": ((85.74, 87.49, 88.02), (87.61, 88.19, 89.10)),
    "EGMA": ((87.71, 88.92, 89.50), (88.41, 89.40, 90.10)),
}

_ASG_LINEAR_PRINTED = {
    # method: (CheXpert AUC 1/10/100 %, RSNA AUC 1/10/100 %), as printed in the ASG README.
    "MedCLIP": ((87.1, 87.6, 88.1), (87.0, 88.6, 89.2)),
    "KAD": ((87.2, 88.6, 88.7), (86.7, 88.7, 89.9)),
    "ASG (CNN)": ((87.7, 88.2, 88.7), (87.2, 88.8, 89.7)),
    "ASG (ViT)": ((87.9, 89.0, 89.0), (88.4, 89.5, 90.2)),
}
_ASG_LINEAR_NOTES = {
    "MedCLIP": "listed under 'CNN-based' in the README table",
    "KAD": "listed under 'CNN-based' in the README table",
    "ASG (CNN)": "ASG's own result, 'Ours' under 'CNN-based'",
    "ASG (ViT)": "ASG's own result, 'Ours' under 'ViT-based'",
}


def _linear_probe_rows(
    printed: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]],
    reference: _Reference,
    notes: Mapping[str, str],
) -> tuple[Published, ...]:
    """CheXpert and RSNA linear-probe rows of one source."""
    collected = ()
    for method, (chexpert, rsna) in printed.items():
        for protocol, values in (
            ("linear_probe_chexpert", chexpert),
            ("linear_probe_rsna", rsna),
        ):
            collected += _percent_rows(
                protocol=protocol,
                method=method,
                reference=reference,
                values=_fractions(values),
                note=notes.get(method, ""),
            )
    return collected


_G2D_ZERO_SHOT_PRINTED = {
    # method: {protocol: {metric: printed %}}, as printed in G2D Table 2(b).
    "ConVIRT": {
        "zero_shot_rsna": {"auroc": 80.4, "f1": 58.4, "accuracy": 76.1},
        "zero_shot_chestxray14": {"auroc": 56.0, "f1": 13.5, "accuracy": 45.9},
        "zero_shot_chexpert": {"auroc": 59.0, "f1": 26.4},
    },
    "GLoRIA": {
        "zero_shot_rsna": {"auroc": 71.5, "f1": 49.0, "accuracy": 71.3},
        "zero_shot_chestxray14": {"auroc": 61.0, "f1": 17.4, "accuracy": 50.3},
        "zero_shot_chexpert": {"auroc": 75.0, "f1": 57.0},
    },
    "BioViL": {
        "zero_shot_rsna": {"auroc": 82.8, "f1": 58.3, "accuracy": 76.7},
        "zero_shot_chestxray14": {"auroc": 66.2, "f1": 66.2, "accuracy": 63.3},
        "zero_shot_chexpert": {"auroc": 69.3, "f1": 46.3},
    },
    "CheXzero": {
        "zero_shot_rsna": {"auroc": 85.8, "f1": 62.1, "accuracy": 79.4},
        "zero_shot_chexpert": {"auroc": 88.9, "f1": 60.6},
    },
    "MedKLIP": {
        "zero_shot_rsna": {"auroc": 86.9, "f1": 63.4, "accuracy": 80.0},
        "zero_shot_chestxray14": {"auroc": 72.6, "f1": 24.4, "accuracy": 79.6},
        "zero_shot_chexpert": {"auroc": 87.9, "f1": 61.4},
    },
    "KAD": {
        "zero_shot_chestxray14": {"auroc": 78.9, "f1": 32.3, "accuracy": 81.6},
        "zero_shot_chexpert": {"auroc": 90.5, "f1": 64.6},
    },
    "G2D": {
        "zero_shot_rsna": {"auroc": 87.6, "f1": 64.8, "accuracy": 81.5},
        "zero_shot_chestxray14": {"auroc": 79.4, "f1": 33.1, "accuracy": 82.3},
        "zero_shot_chexpert": {"auroc": 91.2, "f1": 65.6},
    },
}
_G2D_ZERO_SHOT_NOTES = {
    "BioViL": "ChestX-ray14 F1 printed equal to its AUROC (66.2), kept as printed",
    "CheXzero": (
        "row printed as 'CheXzero⋆[5]' with [5] = MedKLIP; not read in CheXzero's own paper"
    ),
    "MedKLIP": "G2D marks MedKLIP as using extra annotated data in pre-training",
    "KAD": "G2D marks KAD as using extra annotated data; KAD reports no CheXpert accuracy",
    "G2D": "G2D's own result",
}

_EGMA_ZERO_SHOT_PRINTED = {
    # method: (CheXpert 5x200 acc, F1, RSNA acc, F1) in %, as printed in EGMA Table 2.
    "CLIP": (20.10, 9.12, 25.03, 22.07),
    "GLoRIA": (53.30, 48.99, 29.15, 28.54),
    "PRIOR": (34.90, 30.56, 76.77, 51.80),
    "MGCA": (43.60, 41.37, 60.83, 57.77),
    "MedCLIP": (57.50, 55.97, 43.09, 31.01),
    "EGMA": (61.30, 60.38, 76.97, 43.49),
}
_EGMA_ZERO_SHOT_NOTES = {
    "MedCLIP": "equal to the 'Baseline' row of EGMA Table 4, i.e. evaluated by EGMA",
    "EGMA": "EGMA's own result",
}

_ASG_ZERO_SHOT_PRINTED = {
    # method: {protocol: (AUC, F1, ACC) in %}, as printed in the ASG README.
    "BioViL": {"zero_shot_rsna": (83.8, 58.1, 77.8), "zero_shot_chestxray14": (73.8, 25.2, 85.9)},
    "MedKLIP": {"zero_shot_rsna": (84.5, 61.1, 74.2), "zero_shot_chestxray14": (75.6, 26.0, 87.8)},
    "ASG": {"zero_shot_rsna": (86.2, 62.8, 79.4), "zero_shot_chestxray14": (77.0, 27.5, 90.0)},
}
_ASG_ZERO_SHOT_NOTES = {
    "ASG": "ASG's own result",
}


def _zero_shot_rows() -> tuple[Published, ...]:
    """Zero-shot rows from G2D, EGMA and ASG."""
    collected = ()
    for method, by_protocol in _G2D_ZERO_SHOT_PRINTED.items():
        for protocol, values in by_protocol.items():
            collected += _percent_rows(
                protocol=protocol,
                method=method,
                reference=_G2D_ZERO_SHOT,
                values=values,
                note=_G2D_ZERO_SHOT_NOTES.get(method, ""),
            )
    for method, (acc_5x200, f1_5x200, acc_rsna, f1_rsna) in _EGMA_ZERO_SHOT_PRINTED.items():
        method_note = _EGMA_ZERO_SHOT_NOTES.get(method, "")
        rsna_note = "; ".join(filter(None, (method_note, "RSNA test split is EGMA's 15 % split")))
        collected += _percent_rows(
            protocol="chexpert_5x200",
            method=method,
            reference=_EGMA_ZERO_SHOT,
            values={"accuracy": acc_5x200, "f1": f1_5x200},
            note=method_note,
        )
        collected += _percent_rows(
            protocol="zero_shot_rsna",
            method=method,
            reference=_EGMA_ZERO_SHOT,
            values={"accuracy": acc_rsna, "f1": f1_rsna},
            note=rsna_note,
        )
    for method, by_protocol in _ASG_ZERO_SHOT_PRINTED.items():
        for protocol, (auroc, f1, accuracy) in by_protocol.items():
            collected += _percent_rows(
                protocol=protocol,
                method=method,
                reference=_ASG_ZERO_SHOT,
                values={"auroc": auroc, "f1": f1, "accuracy": accuracy},
                note=_ASG_ZERO_SHOT_NOTES.get(method, ""),
            )
    return collected


def _grounding_rows() -> tuple[Published, ...]:
    """MS-CXR phrase-grounding rows from the BioViL and BioViL-T authors' model cards."""
    collected = ()
    for method, cnr in (
        ("Baseline (ClinicalBERT)", 0.769),
        ("Baseline (PubMedBERT)", 0.773),
        ("ConVIRT (ClinicalBERT)", 0.818),
        ("GLoRIA (ClinicalBERT)", 0.930),
        ("BioViL", 1.027),
        ("BioViL-L", 1.142),
    ):
        collected += _as_printed_rows(
            protocol="ms_cxr_grounding",
            method=method,
            reference=_CXR_BERT_CARD,
            values={"cnr": cnr},
        )
    for method, cnr, miou in (
        # CNR and mIoU as printed, "mean +- spread".
        ("BioViL", "1.07 +- 0.04", "0.229 +- 0.005"),
        ("BioViL-L", "1.21 +- 0.05", "0.202 +- 0.010"),
        ("BioViL-T", "1.33 +- 0.04", "0.240 +- 0.005"),
    ):
        collected += _as_printed_rows(
            protocol="ms_cxr_grounding",
            method=method,
            reference=_BIOVIL_T_CARD,
            values={"cnr": float(cnr.split()[0]), "miou": float(miou.split()[0])},
            note=f"printed as CNR {cnr}, mIoU {miou}",
        )
    return collected


PUBLISHED: tuple[Published, ...] = (
    *_linear_probe_rows(_G2D_LINEAR_PRINTED, _G2D_LINEAR, _G2D_LINEAR_NOTES),
    *_linear_probe_rows(_EGMA_LINEAR_PRINTED, _EGMA_LINEAR, {"EGMA": "EGMA's own result"}),
    *_linear_probe_rows(_ASG_LINEAR_PRINTED, _ASG_LINEAR, _ASG_LINEAR_NOTES),
    *_zero_shot_rows(),
    *_grounding_rows(),
)


def rows(protocol: str) -> list[Published]:
    """The published rows of one protocol, in the order of ``PUBLISHED``.

    Args:
      protocol: one of ``PROTOCOLS``.

    Returns:
      The rows whose ``protocol`` is ``protocol``; empty when no source was found for it.

    Raises:
      ValueError: ``protocol`` is not one of ``PROTOCOLS``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    return [row for row in PUBLISHED if row.protocol == protocol]
