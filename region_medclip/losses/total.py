"""The weighted training loss: L_total = α L_global + β L_ROI + γ L_neg + λ L_distill + μ L_local
+ ν L_box.

Equations: docs/design.md §4.5 (L_local: §4.6, L_box: §4.7). `config.loss.global_kind` picks
L_global among GLOBAL_KINDS.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from region_medclip.losses.boxes import box_loss
from region_medclip.losses.collectives import Metrics
from region_medclip.losses.contrastive import dhn_nce_loss, medclip_loss, softmax_contrastive_loss
from region_medclip.losses.local import gloria_local_loss
from region_medclip.losses.region import (
    distillation_loss,
    negative_caption_loss,
    roi_contrastive_loss,
)
from region_medclip.losses.sigmoid import sigmoid_contrastive_loss

GLOBAL_KINDS = ("softmax", "sigmoid", "medclip", "dhn_nce")


def _global_term(kind, out, batch, loss_config, logit_scale, axis_name):
    """L_global of `kind` (one of GLOBAL_KINDS) on the image and text embeddings of `out`."""
    if kind == "softmax":
        return softmax_contrastive_loss(
            zimg=out["zimg"],
            ztxt=out["ztxt"],
            logit_scale=logit_scale,
            axis_name=axis_name,
            zneg=out.get("zrneg"),
            neg_mask=batch.get("report_neg_mask"),
        )
    if kind == "sigmoid":
        return sigmoid_contrastive_loss(
            zimg=out["zimg"],
            ztxt=out["ztxt"],
            logit_scale=logit_scale,
            logit_bias=out["logit_bias"],
            axis_name=axis_name,
            impl=loss_config.sigmoid_impl,
        )
    if kind == "medclip":
        return medclip_loss(
            zimg=out["zimg"],
            ztxt=out["ztxt"],
            img_labels=batch["labels"],
            txt_labels=batch.get("txt_labels", batch["labels"]),
            logit_scale=logit_scale,
            label_temperature=loss_config.medclip.label_temperature,
            axis_name=axis_name,
            img_mask=batch.get("has_image"),
            txt_mask=batch.get("has_text"),
        )
    if kind == "dhn_nce":
        cfg = loss_config.dhn_nce
        return dhn_nce_loss(
            zimg=out["zimg"],
            ztxt=out["ztxt"],
            temperature=cfg.temperature,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            axis_name=axis_name,
            reduction=cfg.reduction,
        )
    raise ValueError(f"config.loss.global_kind must be one of {GLOBAL_KINDS}, got {kind!r}")


def _roi_scale(roi_temperature, logit_scale):
    """Region losses use a fixed τ when one is configured (> 0), else the learned global scale."""
    if roi_temperature is None or roi_temperature <= 0:
        return logit_scale
    return jnp.float32(1.0 / roi_temperature)


def _region_terms(out, batch, roi_scale, student_logits, teacher_logits, axis_name):
    """Zero-argument callables of the region terms, so that a term of weight 0 is never built."""
    return {
        "roi": lambda: roi_contrastive_loss(
            zroi=out["zroi"],
            zcap=out["zcap"],
            cap_ids=batch.get("cap_ids"),
            logit_scale=roi_scale,
            roi_mask=batch["roi_mask"],
            axis_name=axis_name,
        ),
        "neg": lambda: negative_caption_loss(
            zroi=out["zroi"],
            zcap=out["zcap"],
            zneg=out["zneg"],
            neg_mask=batch["neg_mask"],
            logit_scale=roi_scale,
            roi_mask=batch["roi_mask"],
            axis_name=axis_name,
        ),
        "distill": lambda: distillation_loss(
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            roi_mask=batch["roi_mask"],
            axis_name=axis_name,
        ),
    }


def _local_term(out, batch, loss_config, axis_name):
    """GLoRIA's word–patch loss with the temperatures of ``config.loss.gloria``."""
    cfg = loss_config.gloria
    return gloria_local_loss(
        zwords=out["zwords"],
        word_mask=batch["word_mask"],
        zpatch=out["zpatch"],
        temperature1=cfg.temperature1,
        temperature2=cfg.temperature2,
        temperature3=cfg.temperature3,
        axis_name=axis_name,
    )


def _box_term(out, batch, loss_config, axis_name):
    """The box head's loss with the weights of ``config.loss.box``."""
    cfg = loss_config.box
    return box_loss(
        boxes=out["proposals"],
        objectness=out["objectness"],
        targets=batch["box_targets"],
        positive=batch["box_positive"],
        l1=cfg.l1,
        giou=cfg.giou,
        objectness_weight=cfg.objectness,
        axis_name=axis_name,
    )


def _weighted_sum(weights: Mapping[str, float], term_fns: Mapping[str, Callable]):
    """Σ weight × term over `weights` in order, skipping (and reporting 0 for) zero weights.

    Returns (total [], metrics with `<term>/weight`, `<term>/loss` and `<term>/<metric>`).
    """
    total = jnp.float32(0.0)
    metrics = {}
    for name, weight in weights.items():
        metrics[f"{name}/weight"] = jnp.float32(weight)
        if weight == 0:
            metrics[f"{name}/loss"] = jnp.float32(0.0)
            continue
        value, term_metrics = term_fns[name]()
        total = total + weight * value
        metrics.update({f"{name}/{key}": v for key, v in term_metrics.items()})
    return total, metrics


def total_loss(
    *,
    out: Mapping[str, Any],
    batch: Mapping[str, Any],
    loss_config,
    student_logits=None,
    teacher_logits=None,
    axis_name=None,
) -> tuple[jax.Array, Metrics]:
    """L_total = α L_global + β L_ROI + γ L_neg + λ L_distill + μ L_local + ν L_box
    (docs/design.md §4.5).

    A term whose weight is 0 is not computed (its inputs may be absent) and reports 0.

    Args:
      out: model outputs. Always `zimg [n, D]`, `ztxt [n, D]` and `logit_scale []` — the log-scale
        t' parameter, exponentiated here. Also `logit_bias []` for the sigmoid loss; `zroi
        [n, R, D]` and `zcap [n, R, D]` (embeddings of the ROI captions) when β > 0 or γ > 0;
        `zneg [n, R, K, D]` (hard-negative captions) when γ > 0; optional `zrneg [n, Kr, D]`
        (hard-negative reports of the softmax global loss, masked by `report_neg_mask`); `zwords
        [n, L, D]` (report words) and `zpatch [n, P, D]` (patch cells) when μ > 0;
        `proposals [n, K, 4]` and `objectness [n, K]` (the box head's) when ν > 0.
      batch: `roi_mask [n, R]` when β, γ or λ > 0; optional `cap_ids [n, R]` (duplicates are ROI
        positives); `neg_mask [n, R, K]` when γ > 0; `labels [n, C]` for global_kind "medclip"
        (also the text labels unless `txt_labels [n, C]` is given), with optional `has_image`,
        `has_text [n]` (rows of unpaired sources: the side a row lacks is masked out); `word_mask
        [n, L]` (the words of L_local) when μ > 0; `box_targets [n, K, 4]` and `box_positive
        [n, K]` (models.boxes.assign) when ν > 0.
      loss_config: `config.loss`: global_kind ("softmax" | "sigmoid" | "medclip" | "dhn_nce"),
        alpha, beta, gamma, lambda_, roi_temperature (τ of the region losses; 0 or None: the
        learned t), sigmoid_impl ("ring" | "gather"), dhn_nce.{temperature, beta1, beta2,
        reduction}, medclip.label_temperature, local_weight (μ; absent: 0),
        gloria.{temperature1, temperature2, temperature3}, box_weight (ν; absent: 0),
        box.{l1, giou, objectness}.
      student_logits, teacher_logits: [n, R, C] ROI-concept logits divided by their temperatures;
        without teacher logits the distillation term is skipped (λ treated as 0).
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.

    Returns:
      loss: [] the weighted total.
      metrics: `loss`, `<term>/loss` and every metric of each term (`global/`, `roi/`, `neg/`,
        `distill/`, `local/`, `box/`), the weights, `logit_scale` (t) and `temperature` (1 / t).
    """
    cfg = loss_config
    logit_scale = jnp.exp(jnp.asarray(out["logit_scale"], jnp.float32))
    roi_scale = _roi_scale(cfg.get("roi_temperature"), logit_scale)
    if teacher_logits is not None and student_logits is None:
        raise ValueError("total_loss got teacher_logits but no student_logits to distil into")
    lambda_ = cfg.lambda_ if teacher_logits is not None else 0.0
    weights = {"global": cfg.alpha, "roi": cfg.beta, "neg": cfg.gamma, "distill": lambda_}
    weights["local"] = cfg.get("local_weight", 0.0)
    weights["box"] = cfg.get("box_weight", 0.0)
    term_fns = {
        "global": lambda: _global_term(cfg.global_kind, out, batch, cfg, logit_scale, axis_name),
        "local": lambda: _local_term(out, batch, cfg, axis_name),
        "box": lambda: _box_term(out, batch, cfg, axis_name),
        **_region_terms(out, batch, roi_scale, student_logits, teacher_logits, axis_name),
    }
    total, metrics = _weighted_sum(weights, term_fns)
    metrics.update(loss=total, logit_scale=logit_scale, temperature=1.0 / logit_scale)
    metrics["roi_temperature"] = 1.0 / roi_scale
    return total, metrics
