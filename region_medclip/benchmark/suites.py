"""The benchmark suites: which protocol runs on which dataset, with which evaluator entry, and
which of its metrics fill the columns of the published table it is laid out as.

``cxr``: the protocols that ConVIRT, GLoRIA, MedCLIP, CheXzero and BioViL report, each on its
dataset (CheXpert 5×200 zero-shot classification; multi-label zero-shot AUROC on CheXpert's
five competition findings, ChestX-ray14 and RSNA pneumonia; linear probes at 1/10/100 % of the
training labels on CheXpert and RSNA; MS-CXR phrase grounding; image ↔ report retrieval on
MIMIC-CXR's test split) and open-vocabulary detection without given boxes on VinDr-CXR (its
challenge's mAP at IoU 0.4; no paper of the field reports it open-vocabulary, so it stands
without published rows). ``synth``: the same protocols on the embedded synth_cxr, which runs on
the tiny model in minutes on a CPU.
"""

import dataclasses
from typing import Any

# CheXpert's five competition findings, as the label names spell them (lower case).
COMPETITION = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion")
FRACTIONS = ("1%", "10%", "100%")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One table of the suite.

    Attributes:
      name: the table's name; published reference rows are those of
        ``published.rows(name)`` when it is one of ``published.PROTOCOLS``.
      title: the table's heading.
      dataset: the registered dataset it evaluates (``python -m region_medclip.prepare``).
      evals: ``config.evals`` entries it runs (``{name: dict(kind=..., ...)}``); the dataset is
        set by the suite.
      columns: ``(column title, evaluator name, metric key, published metric or "")``.
    """

    name: str
    title: str
    dataset: str
    evals: dict[str, dict[str, Any]]
    columns: tuple[tuple[str, str, str, str], ...]


def _probe_columns(eval_name: str, metric: str = "auroc") -> tuple:
    return tuple((f, eval_name, f"{metric}@{f}", f"{metric}@{f}") for f in FRACTIONS)


def _retrieval(dataset: str, title: str, max_examples: int = 0) -> Protocol:
    columns = tuple(
        (f"{d} R@{k}", "retrieval", f"{d}/R@{k}", "") for d in ("i2t", "t2i") for k in (1, 5, 10)
    )
    evals = {"retrieval": dict(kind="retrieval", max_examples=max_examples)}
    return Protocol(f"retrieval_{dataset}", title, dataset, evals, columns)


def cxr_suite() -> tuple[Protocol, ...]:
    """The real datasets' protocols (see the module docstring)."""
    five = dict(classes=COMPETITION)
    return (
        Protocol(
            "chexpert_5x200",
            "CheXpert 5×200 zero-shot classification",
            "chexpert_5x200",
            {"multiclass": dict(kind="multiclass", prompts="combinatorial", **five)},
            (
                ("accuracy", "multiclass", "accuracy", "accuracy"),
                ("macro F1", "multiclass", "macro_f1", "f1"),
            ),
        ),
        _zero_shot("zero_shot_chexpert", "CheXpert (5 findings)", "chexpert", **five),
        _zero_shot("zero_shot_chestxray14", "ChestX-ray14", "chestxray14"),
        _zero_shot("zero_shot_rsna", "RSNA pneumonia", "rsna_pneumonia"),
        Protocol(
            "linear_probe_chexpert",
            "CheXpert linear probe (AUROC, 5 findings)",
            "chexpert",
            {"linear_probe": dict(kind="linear_probe", **five)},
            _probe_columns("linear_probe"),
        ),
        Protocol(
            "linear_probe_rsna",
            "RSNA pneumonia linear probe (AUROC)",
            "rsna_pneumonia",
            {"linear_probe": dict(kind="linear_probe")},
            _probe_columns("linear_probe"),
        ),
        Protocol(
            "ms_cxr_grounding",
            "MS-CXR phrase grounding",
            "ms_cxr",
            {"phrase_grounding": dict(kind="phrase_grounding")},
            (
                ("CNR", "phrase_grounding", "cnr", "cnr"),
                ("mIoU", "phrase_grounding", "miou", "miou"),
            ),
        ),
        _retrieval("mimic_cxr", "MIMIC-CXR image ↔ report retrieval (test split)"),
        _detection("vindr_cxr", "VinDr-CXR detection without boxes", prompts="templates"),
    )


def _detection(dataset: str, title: str, **options) -> Protocol:
    evals = {"detection": dict(kind="detection", **options)}
    columns = (
        ("mAP@0.4", "detection", "map@0.4", ""),
        ("mAP@0.5:0.95", "detection", "map@0.5:0.95", ""),
        ("FROC", "detection", "froc/score", ""),
        ("lesion films R@10", "detection", "lesion/films_R@10", ""),
        ("lesion box R@10", "detection", "lesion/box_R@10", ""),
    )
    return Protocol(f"detection_{dataset}", title, dataset, evals, columns)


def _zero_shot(name: str, title: str, dataset: str, **options) -> Protocol:
    evals = {"zero_shot": dict(kind="zero_shot", **options)}
    columns = (("AUROC", "zero_shot", "macro_auroc", "auroc"),)
    return Protocol(name, f"{title} multi-label zero-shot", dataset, evals, columns)


def synth_suite(train_examples: int = 4000, max_examples: int = 600) -> tuple[Protocol, ...]:
    """The protocols on synth_cxr: ``max_examples`` test films, probes trained on the first
    ``train_examples`` training films (the whole suite in minutes on the tiny model)."""
    size = dict(max_examples=max_examples, bootstrap=200)
    train = dict(max_examples=max_examples, train_examples=train_examples)
    return (
        Protocol(
            "synth_zero_shot",
            "synth_cxr multi-label zero-shot",
            "synth_cxr",
            {"zero_shot": dict(kind="zero_shot", prompts="sentences", negatives="normal", **size)},
            (("AUROC", "zero_shot", "macro_auroc", ""),),
        ),
        Protocol(
            "synth_multiclass",
            "synth_cxr zero-shot classification (films with one label)",
            "synth_cxr",
            {"multiclass": dict(kind="multiclass", prompts="sentences", **size)},
            (
                ("accuracy", "multiclass", "accuracy", ""),
                ("macro F1", "multiclass", "macro_f1", ""),
            ),
        ),
        Protocol(
            "synth_linear_probe",
            "synth_cxr linear probe (AUROC)",
            "synth_cxr",
            {"linear_probe": dict(kind="linear_probe", **train)},
            tuple((*c[:3], "") for c in _probe_columns("linear_probe")),
        ),
        Protocol(
            "synth_fewshot",
            "synth_cxr few-shot ridge probe (AUROC)",
            "synth_cxr",
            {"fewshot": dict(kind="fewshot", shots=(1, 5, 10), seeds=(0, 1, 2), **train)},
            tuple((f"{k}-shot", "fewshot", f"auroc@{k}shot", "") for k in (1, 5, 10)),
        ),
        Protocol(
            "synth_grounding",
            "synth_cxr phrase grounding",
            "synth_cxr",
            {
                "phrase_grounding": dict(kind="phrase_grounding", tolerance=8.0, **size),
            },
            (
                ("CNR", "phrase_grounding", "cnr", ""),
                ("mIoU", "phrase_grounding", "miou", ""),
                ("pointing 8 px", "phrase_grounding", "pointing_game@8px", ""),
                ("signed CNR", "phrase_grounding", "signed_cnr", ""),
            ),
        ),
        _retrieval("synth_cxr", "synth_cxr image ↔ report retrieval", max_examples),
        _detection(
            "synth_cxr",
            "synth_cxr detection without boxes",
            prompts="combinatorial",
            max_examples=max_examples,
        ),
    )


SUITES = {"cxr": cxr_suite, "synth": synth_suite}
