"""CoOp's few-shot curve: zero-shot AUROC against the shots the prompts were learned on
(``python -m region_medclip.coop`` runs it).

The train split and the evaluated split are embedded once. For each k of ``shots`` and each
seed, :class:`coop.PromptLearner` learns prompts on the k-shot set of that seed, saves them as
``<workdir>/coop/<dataset>/<k>shot_seed<seed>.npz`` and the zero-shot evaluator scores the
evaluated split with them: the multi-label macro AUROC over the dataset's findings and each
finding's AUROC. The hand prompts of the run's own zero-shot evaluator
(``Model.zero_shot_settings()``) are the 0-shot row. The table holds the mean ± sample std
over seeds (ddof 1).
"""

import dataclasses
import json
import logging

import numpy as np

from region_medclip.data import registry as data_registry
from region_medclip.data import tokenizers as tokenizers_lib
from region_medclip.evaluators import coop as coop_lib
from region_medclip.evaluators import embeddings, zero_shot
from region_medclip.evaluators import run as evals_run
from region_medclip.train import coop

_log = logging.getLogger("region_medclip.coop")


def _auroc(metrics: dict[str, float]) -> dict[str, float]:
    """The macro and per-finding AUROCs of a zero-shot result (no CIs)."""
    keep = {k: v for k, v in metrics.items() if k == "macro_auroc" or k.startswith("auroc/")}
    return {k: float(v) for k, v in keep.items() if "/ci_" not in k}


def _embedded(module, params, config, dataset, split, train_examples, max_examples, batch_size):
    """``(registry entry, train split's emb, evaluated split's emb, tokenizer)`` of
    ``dataset``, its splits embedded once (``embed_split``)."""
    data_config = evals_run.dataset_config(config, dataset)
    entry = data_registry.get(dataset, data_config.get("data_dir"))
    entry.class_names()  # a dataset without label names fails before the embedding passes
    grid = evals_run.patch_grid(module, config)

    def embed(which: str, limit: int) -> dict:
        return embeddings.embed_split(
            module,
            params,
            data_config,
            split=which,
            batch_size=batch_size,
            grid=grid,
            max_examples=limit,
        )

    train, evaluated = embed("train", train_examples), embed(split, max_examples)
    return entry, train, evaluated, tokenizers_lib.from_config(data_config)


def sweep(
    module,
    params,
    config,
    *,
    workdir: str,
    dataset: str,
    shots,
    seeds,
    options: coop.Options,
    settings: dict[str, str],
    split: str = "test",
    train_examples: int = 0,
    max_examples: int = 0,
    batch_size: int = 64,
) -> dict:
    """Learns and scores prompts for every shots × seed (see the module docstring).

    Args:
      module, params, config: the model and the config it was trained with.
      workdir: where the learned prompts are saved (``<workdir>/coop/<dataset>/``).
      dataset: a registered or prepared dataset with label names.
      settings: the hand prompts' ``prompts`` and ``negatives`` (the run's evaluator's).
      split: the evaluated split; ``train_examples``, ``max_examples``: the first this many
        films of the train and evaluated splits (0: all).

    Returns:
      ``{"dataset", "split", "options", "hand": {metric: value}, "runs": [{shots, seed,
      final_loss, train_examples, metric: value, ...}]}``.
    """
    entry, train, evaluated, tokenizer = _embedded(
        module, params, config, dataset, split, train_examples, max_examples, batch_size
    )
    names, text_len = entry.class_names(), int(config.data.text_len)
    scored = dict(
        zimg=evaluated["zimg"],
        labels=evaluated["labels"],
        class_names=names,
        encode=embeddings.text_encoder(module, params, tokenizer, text_len),
        logit_scale=float(evaluated["logit_scale"]),
        bootstrap=0,
        dataset=entry,
    )
    hand = zero_shot.evaluate(
        **scored, prompts=settings["prompts"], negatives=settings["negatives"]
    )
    learner = coop.PromptLearner(module, params, tokenizer, text_len=text_len, options=options)
    encoder = coop_lib.Encoder(module, params, tokenizer, text_len)
    runs = []
    for k in shots:
        for seed in seeds:
            learned, losses = learner.train(
                zimg=train["zimg"],
                labels=train["labels"],
                class_names=names,
                logit_scale=float(train["logit_scale"]),
                shots=k,
                seed=seed,
                dataset=dataset,
            )
            coop_lib.save(coop_lib.path(workdir, dataset, f"{k}shot_seed{seed}"), learned)
            metrics = zero_shot.evaluate(**scored, learned=learned, encode_learned=encoder)
            runs.append(_run_record(learned, losses, metrics))
    return dict(
        dataset=dataset,
        split=split,
        options=dict(dataclasses.asdict(options), hand=settings),
        hand=_auroc(hand),
        runs=runs,
    )


def _run_record(learned: coop_lib.LearnedPrompts, losses: list[float], metrics: dict) -> dict:
    """One shots × seed row of :func:`sweep`'s ``runs``, logged as it is made."""
    run = dict(shots=learned.shots, seed=learned.seed, final_loss=losses[-1], **_auroc(metrics))
    run["train_examples"] = learned.options["train_examples"]
    _log.info("%d shots, seed %d: macro AUROC %.4f", run["shots"], run["seed"], run["macro_auroc"])
    return run


def summarise(result: dict) -> dict[str, dict]:
    """``{shots: {metric: [mean, std]}}`` over the seeds of :func:`sweep`'s runs, with the
    hand prompts as shots ``"0"`` (std 0); a metric that is NaN for a seed is left out of its
    mean."""
    out = {"0": {k: [v, 0.0] for k, v in result["hand"].items()}}
    for k in sorted({r["shots"] for r in result["runs"]}):
        runs = [r for r in result["runs"] if r["shots"] == k]
        row = {}
        for key in [key for key in runs[0] if key not in ("shots", "seed")]:
            values = np.array([r[key] for r in runs], np.float64)
            values = values[np.isfinite(values)]
            std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[key] = [float(values.mean()) if len(values) else float("nan"), std]
        row["seeds"] = [float(len(runs)), 0.0]
        out[str(k)] = row
    return out


def to_json(result: dict) -> str:
    """:func:`sweep`'s result with its :func:`summarise` as JSON, NaN written as null."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and not np.isfinite(x) else x

    return json.dumps(clean(dict(result, summary=summarise(result))), indent=2)


def _cell(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.3f}" if not np.isfinite(std) or std == 0 else f"{mean:.3f} ± {std:.3f}"


def table(result: dict) -> str:
    """Markdown: one row per shots (0: the hand prompts), the macro AUROC (mean ± std over
    seeds) and each finding's mean AUROC."""
    summary = summarise(result)
    findings = [k for k in result["hand"] if k.startswith("auroc/")]
    hand = result["options"]["hand"]
    header = ["shots", "seeds", "macro AUROC", *(f.split("/", 1)[1] for f in findings)]
    lines = [
        f"CoOp on {result['dataset']} ({result['split']} split); 0 shots: the hand prompts "
        f"({hand['prompts']} against {hand['negatives']})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for k, row in summary.items():
        seeds = "–" if k == "0" else f"{row['seeds'][0]:.0f}"
        cells = [_cell(*row["macro_auroc"]), *(_cell(row[f][0], 0.0) for f in findings)]
        lines.append(f"| {k} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
