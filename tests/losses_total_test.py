"""total_loss: the weighted sum of its terms, skipped terms, and sharded == dense for every
global kind (values, metrics and gradients on 8 devices)."""

import losses_cases as lc
import ml_collections
import numpy as np
import pytest

from region_medclip import losses


@pytest.fixture(scope="module")
def mesh():
    return lc.make_mesh()


_GLORIA_TEMPERATURES = dict(temperature1=4.0, temperature2=5.0, temperature3=10.0)


def _loss_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(
            global_kind="softmax",
            alpha=1.0,
            beta=1.0,
            gamma=1.0,
            lambda_=0.3,
            roi_temperature=0.0,
            sigmoid_impl="ring",
            dhn_nce=dict(temperature=0.6, beta1=0.15, beta2=0.15, reduction="mean"),
            medclip=dict(label_temperature=1.0),
            local_weight=0.0,
            gloria=dict(**_GLORIA_TEMPERATURES, grid=0),
        )
    )
    config.update(overrides)
    return config


def _total_inputs(rng, n):
    """(out, batch, logits) for total_loss: model outputs, batch and ROI-concept logits."""
    region = lc.case_negative_caption(rng, n)[1]
    local = lc.case_gloria_local(rng, n)[1]
    num = n * lc.NUM_DEVICES
    out = dict(
        zimg=lc.unit(rng, num, lc.DIM),
        ztxt=lc.unit(rng, num, lc.DIM),
        zroi=region["zroi"],
        zcap=region["zcap"],
        zneg=region["zneg"],
        zwords=local["zwords"],
        zpatch=local["zpatch"],
        logit_scale=np.float32(np.log(1 / 0.07)),
        logit_bias=np.float32(-10.0),
    )
    batch = dict(
        roi_mask=region["roi_mask"],
        neg_mask=region["neg_mask"],
        cap_ids=rng.integers(0, 6, size=region["roi_mask"].shape).astype(np.int32),
        labels=(rng.random((num, lc.NUM_CLASSES)) > 0.6).astype(np.float32),
        word_mask=local["word_mask"],
    )
    shape = (num, lc.NUM_ROIS, lc.NUM_CONCEPTS)
    logits = dict(
        student_logits=rng.normal(size=shape).astype(np.float32),
        teacher_logits=rng.normal(size=shape).astype(np.float32),
    )
    return out, batch, logits


def test_total_loss_is_the_weighted_sum_of_its_terms():
    out, batch, logits = _total_inputs(np.random.default_rng(21), 1)
    config = _loss_config(
        alpha=0.5, beta=2.0, gamma=3.0, lambda_=0.25, roi_temperature=0.1, local_weight=0.75
    )
    total, metrics = lc.jit(losses.total_loss, loss_config=config)(out=out, batch=batch, **logits)
    t = np.exp(out["logit_scale"])
    roi_args = dict(zroi=out["zroi"], zcap=out["zcap"], roi_mask=batch["roi_mask"])
    global_term = lc.jit(losses.softmax_contrastive_loss)(
        zimg=out["zimg"], ztxt=out["ztxt"], logit_scale=t
    )
    roi_term = lc.jit(losses.roi_contrastive_loss)(
        **roi_args, cap_ids=batch["cap_ids"], logit_scale=10.0
    )
    neg_term = lc.jit(losses.negative_caption_loss)(
        **roi_args, zneg=out["zneg"], neg_mask=batch["neg_mask"], logit_scale=10.0
    )
    distill_term = lc.jit(losses.distillation_loss)(**logits, roi_mask=batch["roi_mask"])
    local_term = lc.jit(losses.gloria_local_loss, **_GLORIA_TEMPERATURES)(
        zwords=out["zwords"], zpatch=out["zpatch"], word_mask=batch["word_mask"]
    )
    terms = [term[0] for term in (global_term, roi_term, neg_term, distill_term, local_term)]
    expected = np.dot([0.5, 2.0, 3.0, 0.25, 0.75], [float(v) for v in terms])
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    for name, value in zip(("global", "roi", "neg", "distill", "local"), terms, strict=True):
        np.testing.assert_allclose(float(metrics[f"{name}/loss"]), float(value), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["logit_scale"]), t, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["roi_temperature"]), 0.1, rtol=1e-6)


def test_total_loss_skips_distillation_without_a_teacher_and_zero_weights():
    out, batch, _ = _total_inputs(np.random.default_rng(22), 1)
    for name in ("zroi", "zcap", "zneg", "zwords", "zpatch"):
        del out[name]
    config = _loss_config(beta=0.0, gamma=0.0)
    total, metrics = lc.jit(losses.total_loss, loss_config=config)(out=out, batch=batch)
    assert float(metrics["distill/weight"]) == 0.0 and float(metrics["roi/loss"]) == 0.0
    np.testing.assert_allclose(float(total), float(metrics["global/loss"]), rtol=1e-6)
    with pytest.raises(ValueError, match="global_kind"):
        losses.total_loss(out=out, batch=batch, loss_config=_loss_config(global_kind="hinge"))


@pytest.mark.parametrize("kind", losses.GLOBAL_KINDS)
def test_total_loss_sharded_equals_dense(mesh, kind):
    out, batch, logits = _total_inputs(np.random.default_rng(23), 2)
    config = _loss_config(global_kind=kind, local_weight=0.5)

    def loss_fn(*, axis_name=None, **arrays):
        parts = {key: {k: arrays[k] for k in group} for key, group in groups.items()}
        return losses.total_loss(
            out=parts["out"],
            batch=parts["batch"],
            loss_config=config,
            axis_name=axis_name,
            **parts["logits"],
        )

    groups = dict(out=tuple(out), batch=tuple(batch), logits=tuple(logits))
    arrays = {**out, **batch, **logits}
    diff = ("zimg", "ztxt", "zroi", "zcap", "zneg", "zwords", "zpatch", "logit_scale")
    diff += ("logit_bias", "student_logits")
    dense = lc.value_and_grad(loss_fn, arrays, {}, diff)
    sharded = lc.value_and_grad(loss_fn, arrays, {}, diff, mesh=mesh)
    lc.assert_close(sharded[0], dense[0], "loss")
    for key in dense[1]:
        lc.assert_close(sharded[1][key], dense[1][key], f"metric {key}")
    for name in diff:
        lc.assert_close(sharded[2][name], dense[2][name], f"d loss / d {name}")
    # The global term is the configured kind: its metrics are there.
    assert ("global/logit_bias" in dense[1]) == (kind == "sigmoid")
