"""The loss ablation: global-only CLIP, MedCLIP loss, sigmoid loss, GLoRIA's global + local recipe,
the full region-aware model and region-aware + local, trained with the same config, budget and
seeds, evaluated on the same split, in one table (``python -m region_medclip.ablation`` runs it).

Each (variant, seed) trains in ``workdir/<variant>/seed<k>`` (an interrupted ablation resumes:
finished runs are not trained again) and is evaluated by ``config.evals`` at its last step.
"""

import json
import logging

import numpy as np
from etils import epath

from region_medclip import checkpointing
from region_medclip import config as config_lib
from region_medclip.evaluators import run as evals_lib
from region_medclip.models import clip
from region_medclip.train.loop import train_and_evaluate

_GLOBAL_ONLY = {"loss.beta": 0.0, "loss.gamma": 0.0, "loss.lambda_": 0.0}
# Config overrides per variant, on top of the base config. The global-only baselines switch the
# region and negative-caption terms off; the region head still exists (and shares W_i), so their
# region and grounding numbers measure what global training alone gives the patch tokens.
# `global_local` is GLoRIA's recipe (global + word–patch terms, weight 1 each, no boxes): it asks
# whether report words alone teach the patches what boxes and captions do; `both` adds the
# word–patch term to the region-aware model. A box head, where the config has one, trains in
# every variant: it is detached (models/boxes.py), so it reads each variant's patch tokens
# without changing them, and the detection columns compare what those tokens and the region
# head hold, through the same proposals.
VARIANTS = {
    "global_only": {**_GLOBAL_ONLY, "loss.local_weight": 0.0},
    "medclip": {**_GLOBAL_ONLY, "loss.local_weight": 0.0, "loss.global_kind": "medclip"},
    "sigmoid": {
        **_GLOBAL_ONLY,
        "loss.local_weight": 0.0,
        "loss.global_kind": "sigmoid",
        "model.logit_scale_init": None,
    },
    "global_local": {**_GLOBAL_ONLY, "loss.local_weight": 1.0},
    "region_aware": {"loss.local_weight": 0.0},
    "both": {"loss.local_weight": 1.0},
}
# The headline metric of each evaluator, in table order.
COLUMNS = (
    ("zero_shot", "macro_auroc"),
    ("retrieval", "i2t/R@5"),
    ("retrieval", "t2i/R@5"),
    ("regions", "within_image_top1"),
    ("regions", "r2c/R@1"),
    ("grounding", "pointing_game"),
    ("grounding", "pointing_game@8px"),  # the tolerance the quality bar is read at
    ("grounding", "cnr"),
    ("modality_gap", "gap"),
    ("detection", "map@0.4"),  # VinDr-CXR's challenge metric, the bar of docs/results.md
    ("detection", "froc/score"),
)
# Evaluator kinds that a run's own evaluation leaves to `evaluate` (every=0) and the ablation
# runs at the last step of each run all the same.
_AT_THE_END = ("detection",)


def variant_config(base, variant: str, seed: int):
    """``base`` with the overrides of ``variant`` and ``seed``."""
    config = base.copy_and_resolve_references()
    config.seed = seed
    for key, value in VARIANTS[variant].items():
        section, name = key.split(".")
        if key == "model.logit_scale_init":  # the sigmoid loss's own init (SigLIP)
            value = config_lib.SIGMOID_LOGIT_SCALE_INIT
        config[section][name] = value
    return config


def summarise(results: dict[str, list[dict]]) -> tuple[dict, str]:
    """``{variant: [eval dict per seed]}`` → (``{variant: {metric: (mean, std)}}``, markdown); the
    std is the sample std over seeds."""
    summary, header = {}, [f"{e}/{m}" for e, m in COLUMNS]
    lines = [
        "| variant | seeds | " + " | ".join(header) + " |",
        "|---|---|" + "---|" * len(header),
    ]
    for variant, runs in results.items():
        row = {}
        for evaluator, metric in COLUMNS:
            values = [r.get(evaluator, {}).get(metric) for r in runs]
            values = [v for v in values if v is not None and np.isfinite(v)]
            # The sample std (ddof=1), as seed spreads are reported: the population std of 3
            # seeds understates the spread by a factor of 1.22. One seed has no spread (nan).
            std = float(np.std(values, ddof=1)) if len(values) > 1 else np.nan
            row[f"{evaluator}/{metric}"] = (
                (float(np.mean(values)), std) if values else (np.nan, np.nan)
            )
        summary[variant] = row
        cells = [
            f"{m:.3f}" if np.isnan(s) else f"{m:.3f} ± {s:.3f}" for m, s in (row[h] for h in header)
        ]
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines)


def run(base, workdir: str, seeds: list[int], variants: list[str]) -> tuple[dict, str]:
    """Trains (or finds finished) every (variant, seed) run; returns ``summarise`` of their
    last-step evaluations."""
    if not base.evals:
        raise ValueError("config.evals is empty: the ablation has nothing to compare")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"--variants: unknown {sorted(unknown)}; known {list(VARIANTS)}")
    results: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in seeds:
            config = variant_config(base, variant, seed)
            rundir = epath.Path(workdir) / variant / f"seed{seed}"
            final = rundir / "eval" / f"{config.train.total_steps}.json"
            if not final.exists():
                logging.info("ablation: training %s seed %d in %s", variant, seed, rundir)
                train_and_evaluate(config, str(rundir))
            if not final.exists():  # trained before, stopped before its evaluation was written
                _evaluate_last(config, str(rundir))
            result = json.loads(final.read_text())
            missing = [
                name
                for name, cfg in config.evals.items()
                if cfg.kind in _AT_THE_END and name not in result
            ]
            if missing:
                result = _evaluate_last(config, str(rundir), missing)
            results.setdefault(variant, []).append(result)
    return summarise(results)


def _evaluate_last(config, rundir: str, names: list[str] | None = None) -> dict:
    """Evaluates the last checkpoint of ``rundir`` with ``names`` (default: every evaluator of
    ``config.evals``), merged into its ``eval/<step>.json``, which it returns."""
    params, _, step = checkpointing.restore_params(rundir, step=config.train.total_steps)
    model = clip.from_config(config.model)
    results = evals_lib.evaluate(config, model, params, names, plot_dir=f"{rundir}/plots/{step}")
    path = epath.Path(rundir) / "eval" / f"{step}.json"
    if names is not None and path.exists():
        earlier = json.loads(path.read_text())
        earlier.pop("step", None)
        # The file writes a non-finite metric as null; it goes back in as NaN.
        earlier = {
            name: {k: float("nan") if v is None else v for k, v in out.items()}
            for name, out in earlier.items()
        }
        results = {**earlier, **results}
    evals_lib.write(rundir, step, results)
    return json.loads(path.read_text())
