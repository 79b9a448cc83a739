"""The ``detection`` evaluator: lesions found without given boxes (:mod:`.detect`), scored
against a split's finding boxes (:mod:`.detection_metrics`).

Each finding class of the dataset is a phrase (its prompt set's class embedding, as zero-shot
classification builds it); the image tower is run on the split's films, and every phrase is
looked for in every film. ``method="boxes"`` scores the box head's proposals (one a patch
cell, models/boxes.py): a softmax over the phrases and the nearest clear region, times their
objectness (:func:`detect.joint_logits`);
``method="windows"`` keeps, per phrase, the best windows after NMS; ``method="grown"`` grows
boxes from the phrase's heatmap over small windows (:func:`detect.grown_boxes`, ``fraction`` of
the peak); ``auto``: ``boxes`` for a model with a box head, else ``grown``. Metrics: mAP at
IoU 0.4 (VinDr-CXR's challenge metric), 0.5 and 0.5:0.95, per finding and macro, and FROC
sensitivity at 0.5, 1, 2 and 4 false positives per image. Boxes of the dataset's "no finding"
class are not findings. With ``lesion_retrieval``, each finding caption of the split also ranks
every film by its best proposal (:mod:`.lesions`): ``lesion/films_R@K`` and ``lesion/box_R@K``.
"""

import jax
import jax.numpy as jnp
import numpy as np

from region_medclip.evaluators import (
    detect,
    detection_metrics,
    finetune,
    lesions,
    plots,
    zero_shot,
)
from region_medclip.models import clip

# The keys of ``config.evals.<name>`` this evaluator reads, with their defaults.
OPTIONS = dict(
    prompts="templates",  # the prompt set whose class embeddings are the phrases
    method="auto",  # auto | boxes | windows | grown
    fraction=0.5,  # grown: cells at or above this fraction of the peak join its box
    nms_iou=0.3,  # windows: suppression threshold
    detections=5,  # boxes a phrase and film
    lesion_retrieval=True,  # each finding caption ranks the films by its best proposal
)
METHODS = ("auto", "boxes", "windows", "grown")
_BATCH = 8


_TOWERS: dict[int, tuple] = {}


def towers(model: clip.RegionCLIP):
    """Jitted ``(params, images) → patch tokens``, ``(params, tokens, boxes) → zroi`` and
    ``(params, tokens) → (proposals, objectness)`` (None without a box head), compiled once a
    model (a module holds dicts, so it cannot be an ``lru_cache`` key)."""
    cached = _TOWERS.get(id(model))
    if cached is not None and cached[0] is model:  # the entry holds the model: no id reuse
        return cached[1]
    image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=clip.RegionCLIP.encode_image))
    regions = jax.jit(
        lambda p, t, b: model.apply(
            {"params": p}, t, b, None, method=clip.RegionCLIP.encode_regions
        )
    )
    propose = None
    if model.has_box_head:
        propose = jax.jit(
            lambda p, t: model.apply({"params": p}, t, method=clip.RegionCLIP.propose_boxes)
        )
    _TOWERS[id(model)] = model, (image, regions, propose)
    return image, regions, propose


def _findings(emb, no_finding: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per film, the finding boxes ``[G, 4]`` (normalised xyxy) and their classes ``[G]``."""
    boxes, classes = [], []
    for i in range(len(emb["roi_mask"])):
        keep = emb["roi_mask"][i].astype(bool) & (emb["box_labels"][i] >= 0)
        keep &= emb["box_labels"][i] != no_finding
        boxes.append(emb["boxes"][i][keep])
        classes.append(emb["box_labels"][i][keep].astype(np.int64))
    return boxes, classes


def find(emb, *, ctx, phrases: np.ndarray, method, fraction, nms_iou, detections) -> list:
    """:class:`detect.Detections` of ``phrases [P, D]`` in each film of ``emb["images"]``."""
    image_fn, regions_fn, propose_fn = towers(ctx.model)
    znormal = ctx.text.encode(list(detect.NORMAL_REGION_PROMPTS))
    areas = emb.get("image_box")
    found = []
    for start in range(0, len(emb["images"]), _BATCH):
        images = finetune.rgb_images(emb["images"][start : start + _BATCH])
        _, tokens = image_fn(ctx.params, jnp.asarray(images))
        found += find_in_tokens(
            np.asarray(tokens),
            phrases,
            znormal,
            encode_regions_fn=lambda t, b: np.asarray(regions_fn(ctx.params, t, jnp.asarray(b))),
            propose_fn=None if propose_fn is None else lambda t: propose_fn(ctx.params, t),
            logit_scale=float(emb["logit_scale"]),
            image_box=areas[start : start + _BATCH] if areas is not None else None,
            method=method,
            fraction=fraction,
            nms_iou=nms_iou,
            detections=detections,
        )
    return found


def find_in_tokens(
    tokens: np.ndarray,
    phrases: np.ndarray,
    znormal: np.ndarray,
    *,
    encode_regions_fn,
    logit_scale: float,
    propose_fn=None,
    image_box=None,
    method: str = "auto",
    fraction: float = 0.5,
    nms_iou: float = 0.3,
    detections: int = 5,
    min_score: float = -np.inf,
) -> list:
    """:class:`detect.Detections` (normalised boxes, log-odds) of ``phrases [P, D]`` in each
    image of ``tokens [B, h, w, width]`` (the image tower's patch tokens); ``encode_regions_fn``
    and ``image_box [B, 4]`` as in :func:`detect.detect`, ``propose_fn`` ``tokens →
    (proposals [B, K, 4], objectness [B, K])`` the box head's (None: none), ``method`` as in
    the module docstring; boxes scored at most ``min_score`` are dropped (``boxes`` and
    ``windows`` only). Shared by the evaluator and ``region_medclip.load(W).detect``.

    Raises:
      ValueError: ``method="boxes"`` without a ``propose_fn``.
    """
    if method == "auto":
        method = "grown" if propose_fn is None else "boxes"
    if method == "boxes":
        if propose_fn is None:
            raise ValueError("method='boxes' needs a model with a box head (model.box_head)")
        proposals, objectness = (np.asarray(x) for x in propose_fn(tokens))
        return detect.detect_proposals(
            tokens,
            phrases,
            znormal,
            np.clip(proposals, 0.0, 1.0),
            objectness,
            encode_regions_fn=encode_regions_fn,
            logit_scale=logit_scale,
            image_box=image_box,
            iou=nms_iou,
            top_k=detections,
            min_score=min_score,
        )
    if method == "windows":
        return detect.detect(
            tokens,
            phrases,
            znormal,
            encode_regions_fn=encode_regions_fn,
            logit_scale=logit_scale,
            proposals=detect.window_proposals(),
            image_box=image_box,
            iou=nms_iou,
            top_k=detections,
            min_score=max(min_score, 0.0),
        )
    grid, (gy, gx) = detect.heat_grid()
    centres = ((grid[:, :2] + grid[:, 2:]) / 2).reshape(gy, gx, 2)
    zroi = np.concatenate(
        [
            encode_regions_fn(tokens, np.broadcast_to(c, (len(tokens), *c.shape)))
            for c in detect._chunks(grid, detect.CHUNK)
        ],
        axis=1,
    )[:, : len(grid)]
    found = []
    for i in range(len(tokens)):
        heat = detect.calibrated_logits(zroi[i], phrases, znormal, logit_scale)
        found.append(_grown(heat.reshape(gy, gx, -1), centres, fraction, detections))
    return found


def _grown(heat: np.ndarray, centres: np.ndarray, fraction: float, top_k: int):
    """:class:`detect.Detections` grown from each phrase's ``heat [gy, gx, P]``."""
    boxes, scores, phrases = [], [], []
    for p in range(heat.shape[-1]):
        b, s = detect.grown_boxes(
            heat[..., p], centres, fraction=fraction, top_k=top_k, half=detect.SIZES[0] / 2
        )
        boxes.append(b)
        scores.append(s)
        phrases.append(np.full(len(s), p, np.int64))
    return detect.Detections(
        np.concatenate(boxes).reshape(-1, 4), np.concatenate(scores), np.concatenate(phrases)
    )


def run(
    emb, *, ctx, prompts, method, fraction, nms_iou, detections, lesion_retrieval
) -> dict[str, float]:
    """The ``detection`` evaluator on the films of ``emb`` (``images [N, S, S]``, ``boxes``,
    ``box_labels``, ``roi_mask``) with the finding classes of ``ctx.dataset``.

    Raises:
      ValueError: an unknown ``method``, or the dataset has no label names.
    """
    if method not in METHODS:
        raise ValueError(f"config.evals.{ctx.name or '*'}.method: {method!r}; one of {METHODS}")
    if method == "boxes" and not ctx.model.has_box_head:
        raise ValueError(
            f"config.evals.{ctx.name or '*'}.method='boxes': the model has no box head "
            "(config.model.box_head.enabled)"
        )
    names = ctx.dataset.class_names()
    classes = [c for c, name in enumerate(names) if not name.startswith("no ")]
    positive, _ = ctx.dataset.prompts(prompts, [names[c] for c in classes])
    phrases = zero_shot.class_embeddings(ctx.text.encode, positive)
    found = find(
        emb,
        ctx=ctx,
        phrases=phrases,
        method=method,
        fraction=fraction,
        nms_iou=nms_iou,
        detections=detections,
    )
    gt_boxes, gt_classes = _findings(emb, ctx.dataset.no_finding_index())
    index = {c: k for k, c in enumerate(classes)}
    gt_classes = [np.array([index[c] for c in g], np.int64) for g in gt_classes]
    kw = dict(
        gt_boxes=gt_boxes,
        gt_classes=gt_classes,
        det_boxes=[f.boxes for f in found],
        det_scores=[f.scores for f in found],
        det_classes=[f.phrases for f in found],
    )
    out = detection_metrics.detection_map(**kw, class_names=[names[c] for c in classes])
    out.update(detection_metrics.froc(**kw))
    if lesion_retrieval:
        options = dict(method=method, fraction=fraction, nms_iou=nms_iou)
        out.update(_lesion_retrieval(emb, ctx, options))
    return out


def _lesion_retrieval(emb, ctx, options) -> dict[str, float]:
    """``lesion/...`` metrics of :mod:`.lesions`: the split's finding captions as phrases."""
    no_finding = ctx.dataset.no_finding_index()
    ids, zcap = lesions.queries(emb, no_finding)
    if not len(ids):  # no finding in the split: nothing to look for
        return {f"lesion/{k}": v for k, v in lesions.no_queries().items()}
    found = find(emb, ctx=ctx, phrases=zcap, detections=1, **options)
    scores, boxes = lesions.best_per_query(found, len(ids))
    valid = emb["roi_mask"].astype(bool) & (emb["box_labels"] != no_finding)
    out = lesions.recalls(scores, boxes, ids, emb["boxes"], emb["cap_ids"], valid)
    return {f"lesion/{k}": v for k, v in out.items()}


def plot(
    emb,
    path: str,
    *,
    ctx,
    prompts,
    method,
    fraction,
    nms_iou,
    detections,
    lesion_retrieval,
    count: int = 6,
) -> None:
    """The first ``count`` films that hold a finding, with their finding boxes (green) and the
    best detection of each of those findings (red, labelled with its log-odds)."""
    del lesion_retrieval  # a metric, not drawn
    names = ctx.dataset.class_names()
    classes = [c for c, name in enumerate(names) if not name.startswith("no ")]
    gt_boxes, gt_classes = _findings(emb, ctx.dataset.no_finding_index())
    picks = [i for i, g in enumerate(gt_classes) if len(g)][:count]
    sub = {k: v[picks] for k, v in emb.items() if k in ("images", "image_box")}
    sub["logit_scale"] = emb["logit_scale"]
    positive, _ = ctx.dataset.prompts(prompts, [names[c] for c in classes])
    phrases = zero_shot.class_embeddings(ctx.text.encode, positive)
    options = dict(method=method, fraction=fraction, nms_iou=nms_iou, detections=detections)
    found = find(sub, ctx=ctx, phrases=phrases, **options)
    size = emb["images"].shape[1]
    shown = []
    for k, i in enumerate(picks):
        boxes = []
        for c in sorted(set(gt_classes[i].tolist())):
            hits = np.flatnonzero(found[k].phrases == classes.index(c))
            if len(hits):
                best = hits[np.argmax(found[k].scores[hits])]
                label = f"{names[c]} {found[k].scores[best]:.1f}"
                boxes.append((found[k].boxes[best] * size, label))
        shown.append(boxes)
    titles = [", ".join(names[c] for c in sorted(set(gt_classes[i].tolist()))) for i in picks]
    truths = [gt_boxes[i] * size for i in picks]
    plots.plot_detections(emb["images"][picks], truths, shown, titles, path)
