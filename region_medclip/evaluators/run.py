"""Runs the evaluators named in ``config.evals`` on a model's params.

``config.evals.<name> = dict(kind=..., every=..., split="test", max_examples=0, ...)`` with kind
``zero_shot`` | ``retrieval`` | ``regions`` | ``grounding`` | ``modality_gap``. Evaluators on the
same split share one embedding pass. Results go to ``workdir/eval/<step>.json`` (one file per
step, all evaluators), TensorBoard (``eval/<name>/<metric>``) and a printed table.
"""

import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from region_medclip.data import tokenizers as tokenizers_lib
from region_medclip.evaluators import embeddings as embeddings_lib
from region_medclip.evaluators import (
    grounding,
    modality_gap,
    plots,
    regions,
    retrieval,
    zero_shot,
)

_log = logging.getLogger("region_medclip.evaluate")
KINDS = ("zero_shot", "retrieval", "regions", "grounding", "modality_gap")
DEFAULTS = dict(
    every=None,  # None: config.train.eval_every; 0: only from `python -m region_medclip.evaluate`
    split="test",
    max_examples=0,
    batch_size=64,
    prompts="templates",
    bootstrap=1000,
    threshold=0.5,
    tolerance=0.0,  # grounding: pointing-game tolerance in pixels (0: the maximum in the box)
    negatives="prompts",  # zero_shot: each finding's own negations, or "normal" study prompts
)


def eval_config(config, name: str) -> dict[str, Any]:
    """``config.evals.<name>`` with defaults; an unknown kind or key is an error naming it."""
    cfg = {**DEFAULTS, **dict(config.evals[name])}
    if cfg["every"] is None:
        cfg["every"] = int(config.train.eval_every)
    if cfg["kind"] not in KINDS:
        raise ValueError(f"config.evals.{name}.kind: {cfg['kind']!r} is not one of {KINDS}")
    unknown = set(cfg) - set(DEFAULTS) - {"kind"}
    if unknown:
        raise ValueError(f"config.evals.{name}: unknown keys {sorted(unknown)}")
    return cfg


def class_names(dataset: str) -> list[str]:
    """Label names of a dataset, in the order of its ``labels`` vectors."""
    if dataset == "synth_cxr":
        from region_medclip.data.synth import LABELS

        return list(LABELS)
    from region_medclip.data.formats import LABEL_NAMES

    if dataset not in LABEL_NAMES:
        raise ValueError(f"config.data.eval={dataset!r}: no label names for zero-shot evaluation")
    return [n.lower() for n in LABEL_NAMES[dataset]]


def _no_finding_label(dataset: str) -> int:
    """Index of the "no finding" class of ``dataset`` (boxes with it are clear regions), or -1."""
    try:
        names = class_names(dataset)
    except ValueError:
        return -1
    return names.index("no finding") if "no finding" in names else -1


def patch_grid(model, config) -> int:
    """Side of the image tower's patch grid at ``config.data.image_size``."""
    size = config.data.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    def patches(module, x):
        return module.encode_image(x)[1]

    shapes = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.PRNGKey(0),
            jnp.zeros(images.shape),
            method=patches,
        )[0]
    )
    return int(shapes.shape[1])


def phrase_mask(emb: dict[str, np.ndarray]) -> np.ndarray:
    """``[N, R]`` the ROIs whose captions are grounded: valid boxes of a finding. Boxes of clear
    regions (``box_labels`` 0 where the dataset's class 0 is "no finding", as in synth_cxr) are
    not phrases to ground, as MS-CXR grounds findings only; ``emb["no_finding"]`` names that
    label (-1: none)."""
    keep = emb["roi_mask"].astype(bool)
    no_finding = int(emb.get("no_finding", -1))
    if no_finding >= 0:
        keep = keep & (emb["box_labels"] != no_finding)
    return keep


def grounding_metrics(
    emb: dict[str, np.ndarray], grid: int, threshold: float, tolerance: float = 0.0
) -> dict[str, float]:
    """Each finding ROI's caption (:func:`phrase_mask`) as the phrase: heatmap of its
    similarity to every patch cell, upsampled to the image; CNR, pointing game and IoU of the
    thresholded map with the box. With ``tolerance > 0`` (pixels) the pointing game is also
    reported with that tolerance, as ``pointing_game@<tolerance>px``."""
    size = emb["images"].shape[1]
    scores = {"cnr": [], "pointing_game": [], f"miou@{threshold}": []}
    tolerant = f"pointing_game@{tolerance:g}px"
    if tolerance > 0:
        scores[tolerant] = []
    for i, r in zip(*np.nonzero(phrase_mask(emb)), strict=True):
        heat = (emb["zpatch"][i] @ emb["zcap"][i, r]).reshape(grid, grid)
        heat = grounding.upsample(heat, size, size)
        mask = grounding.boxes_mask(emb["boxes"][i, r][None] * size, size, size)
        if not mask.any() or mask.all():
            continue
        scores["cnr"].append(grounding.cnr(heat, mask))
        scores["pointing_game"].append(grounding.pointing_game(heat, mask))
        if tolerance > 0:
            scores[tolerant].append(grounding.pointing_game(heat, mask, tolerance))
        scores[f"miou@{threshold}"].append(grounding.iou_at_threshold(heat, mask, threshold))
    out = {k: float(np.nanmean(v)) if v else float("nan") for k, v in scores.items()}
    out["phrases"] = float(len(scores["cnr"]))
    return out


def evaluate(
    config, model, params, names: list[str] | None = None, plot_dir: str | None = None
) -> dict[str, dict]:
    """Runs the evaluators ``names`` (default: all of ``config.evals``); returns their metrics.
    With ``plot_dir``, each evaluator also saves its plot there as ``<name>.png``."""
    names = list(config.evals) if names is None else names
    if not names:
        return {}
    tokenizer = tokenizers_lib.from_config(config.data)
    # Prompts are encoded at the report length: sentence prompts are report sentences, longer
    # than box captions (the towers pool over the real tokens, so padding changes nothing).
    length = config.data.text_len

    def encode_fn():
        return embeddings_lib.text_encoder(model, params, tokenizer, length)

    grid = patch_grid(model, config)
    cache: dict[tuple, dict] = {}
    results = {}
    for name in names:
        cfg = eval_config(config, name)
        key = (cfg["split"], cfg["max_examples"], cfg["batch_size"])
        if key not in cache:
            cache[key] = embeddings_lib.embed_split(
                model,
                params,
                config.data,
                split=cfg["split"],
                batch_size=cfg["batch_size"],
                grid=grid,
                max_examples=cfg["max_examples"],
            )
            cache[key]["no_finding"] = _no_finding_label(config.data.eval)
        emb = cache[key]
        kind = cfg["kind"]
        if kind == "zero_shot":
            out = zero_shot.evaluate(
                zimg=emb["zimg"],
                labels=emb["labels"],
                class_names=class_names(config.data.eval),
                encode=encode_fn(),
                logit_scale=float(emb["logit_scale"]),
                prompts=cfg["prompts"],
                negatives=cfg["negatives"],
                bootstrap=cfg["bootstrap"],
            )
        elif kind == "retrieval":
            # Reports with the same tokens (e.g. normal studies) are all correct matches.
            same_text = retrieval.same_text_positives(emb["texts"])
            out = retrieval.retrieval_metrics(emb["zimg"], emb["ztxt"], same_text)
        elif kind == "regions":
            out = regions.split_retrieval(emb["zroi"], emb["zcap"], emb["roi_mask"], emb["cap_ids"])
            out["within_image_top1"] = regions.within_image_top1(
                emb["zroi"], emb["zcap"], emb["roi_mask"]
            )
            out["within_image_top1_multi"] = regions.within_image_top1_multi(
                emb["zroi"], emb["zcap"], emb["roi_mask"]
            )
        elif kind == "grounding":
            out = grounding_metrics(emb, grid, cfg["threshold"], cfg["tolerance"])
        else:
            out = {"gap": modality_gap.modality_gap(emb["zimg"], emb["ztxt"])}
        out["examples"] = float(len(emb["zimg"]))
        results[name] = out
        if plot_dir is not None:
            epath.Path(plot_dir).mkdir(parents=True, exist_ok=True)
            path = str(epath.Path(plot_dir) / f"{name}.png")
            plot(kind, emb, path, config=config, cfg=cfg, grid=grid, encode=encode_fn())
    return results


def plot(kind: str, emb: dict[str, np.ndarray], path: str, *, config, cfg, grid, encode) -> None:
    """Saves the plot of evaluator ``kind`` on the embedded split ``emb`` to ``path`` (PNG)."""
    if kind == "zero_shot":
        names = class_names(config.data.eval)
        probs, findings, _ = zero_shot.finding_probabilities(
            zimg=emb["zimg"],
            class_names=names,
            encode=encode,
            logit_scale=float(emb["logit_scale"]),
            prompts=cfg["prompts"],
            negatives=cfg["negatives"],
        )
        plots.plot_roc(probs, emb["labels"][:, findings], [names[c] for c in findings], path)
    elif kind == "retrieval":
        same_text = retrieval.same_text_positives(emb["texts"])
        similarity = emb["zimg"] @ emb["ztxt"].T
        ranks = {
            "image→report": retrieval.ranks_of_positives(similarity, same_text),
            "report→image": retrieval.ranks_of_positives(similarity.T, same_text.T),
        }
        plots.plot_recall(ranks, path, title=f"retrieval, {len(similarity)} {cfg['split']} pairs")
    elif kind == "regions":
        valid = emb["roi_mask"].astype(bool)
        zroi, zcap = emb["zroi"][valid], emb["zcap"][valid]
        ids = emb["cap_ids"][valid]
        positives = ids[:, None] == ids[None, :]  # the same caption text elsewhere also counts
        similarity = zroi @ zcap.T
        ranks = {
            "region→caption": retrieval.ranks_of_positives(similarity, positives),
            "caption→region": retrieval.ranks_of_positives(similarity.T, positives.T),
        }
        plots.plot_recall(ranks, path, title=f"region matching, {len(zroi)} regions")
    elif kind == "grounding":
        _plot_grounding(emb, grid, path, tokenizers_lib.from_config(config.data))
    else:
        plots.plot_pca(emb["zimg"], emb["ztxt"], path)


def _plot_grounding(emb, grid: int, path: str, tokenizer, count: int = 8) -> None:
    size = emb["images"].shape[1]
    picks = list(zip(*np.nonzero(phrase_mask(emb)), strict=True))[:count]
    images, heats, boxes = [], [], []
    for i, r in picks:
        heat = (emb["zpatch"][i] @ emb["zcap"][i, r]).reshape(grid, grid)
        images.append(emb["images"][i])
        heats.append(grounding.upsample(heat, size, size))
        boxes.append(emb["boxes"][i, r] * size)
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    titles = [
        tokenizer.tokenizer.decode([int(t) for t in emb["captions"][i, r] if t not in specials])
        for i, r in picks
    ]
    plots.plot_grounding(np.stack(images), np.stack(heats), np.stack(boxes), titles, path)


def write(workdir: str, step: int, results: dict[str, dict], tb=None) -> str:
    """Writes ``workdir/eval/<step>.json`` (and TensorBoard scalars); returns the table text."""
    path = epath.Path(workdir) / "eval"
    path.mkdir(parents=True, exist_ok=True)
    clean = {
        name: {k: (v if np.isfinite(v) else None) for k, v in out.items()}
        for name, out in results.items()
    }
    (path / f"{step}.json").write_text(json.dumps({"step": step, **clean}, indent=2))
    if tb is not None:
        for name, out in clean.items():
            for key, value in out.items():
                if value is not None:
                    tb.add_scalar(f"eval/{name}/{key}", value, step)
    return table(step, results)


def table(step: int, results: dict[str, dict]) -> str:
    """A plain-text table of the headline numbers (bootstrap bounds and per-class rows left out)."""
    # The name column fits the longest evaluator name, so no name runs into its metric.
    width = max([14, *(len(name) + 2 for name in results)])
    lines = [f"evaluation at step {step}", f"{'evaluator':<{width}}{'metric':<28}{'value':>10}"]
    for name, out in results.items():
        for key, value in out.items():
            if "/ci_" in key or key.startswith("auroc/"):
                continue
            lines.append(f"{name:<{width}}{key:<28}{value:>10.4f}")
    return "\n".join(lines)
