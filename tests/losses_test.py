"""Losses: sharded == dense (values, metrics, gradients), NumPy references, hand cases, no NaN.

The NumPy references are written from the formulas of DESIGN.md section 4 in float64 and never
call the JAX code.
"""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from region_medclip import losses

NUM_DEVICES = 8
DIM = 8
NUM_ROIS = 3
NUM_NEGATIVES = 4
NUM_CONCEPTS = 5
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == NUM_DEVICES, "conftest.py must force 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("data",))


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _roi_mask(rng, num_images, num_local):
    """~30% padded ROIs; image 0 fully padded, and (with >1 image per device) all of shard 1."""
    mask = rng.random((num_images, NUM_ROIS)) > 0.3
    mask[0] = False
    if num_local > 1:
        mask[num_local : 2 * num_local] = False
    mask[-1, 0] = True  # at least one valid ROI in the global batch
    return mask


def _with_garbage(x, mask, rng):
    """Padded entries hold large finite garbage: the losses must ignore it."""
    x = x.copy()
    x[~mask] = 1e3 * rng.normal(size=x[~mask].shape)
    return x


# --------------------------------------------------------------------------------------------------
# Inputs per loss: (loss_fn, arrays, static kwargs, names to differentiate). Arrays with a batch
# axis are sharded over "data", scalars are replicated.


def _contrastive_inputs(rng, n):
    num = n * NUM_DEVICES
    return dict(zimg=_unit(rng, num, DIM), ztxt=_unit(rng, num, DIM))


def _region_inputs(rng, n):
    num = n * NUM_DEVICES
    mask = _roi_mask(rng, num, n)
    return dict(
        zroi=_with_garbage(_unit(rng, num, NUM_ROIS, DIM), mask, rng),
        zcap=_with_garbage(_unit(rng, num, NUM_ROIS, DIM), mask, rng),
        roi_mask=mask,
    )


def case_softmax(rng, n):
    arrays = dict(_contrastive_inputs(rng, n), logit_scale=np.float32(7.0))
    return losses.softmax_contrastive_loss, arrays, {}, ("zimg", "ztxt", "logit_scale")


def _case_sigmoid(rng, n, impl):
    arrays = dict(
        _contrastive_inputs(rng, n), logit_scale=np.float32(10.0), logit_bias=np.float32(-3.0)
    )
    diff = ("zimg", "ztxt", "logit_scale", "logit_bias")
    return losses.sigmoid_contrastive_loss, arrays, dict(impl=impl), diff


def case_medclip(rng, n):
    num_img, num_txt = n * NUM_DEVICES, (n + 1) * NUM_DEVICES  # unpaired, different sizes
    img_labels = (rng.random((num_img, NUM_CLASSES)) > 0.6).astype(np.float32)
    img_labels[0] = 0  # "no finding"
    arrays = dict(
        zimg=_unit(rng, num_img, DIM),
        ztxt=_unit(rng, num_txt, DIM),
        img_labels=img_labels,
        txt_labels=(rng.random((num_txt, NUM_CLASSES)) > 0.6).astype(np.float32),
        logit_scale=np.float32(5.0),
    )
    static = dict(label_temperature=0.5)
    return losses.medclip_loss, arrays, static, ("zimg", "ztxt", "logit_scale")


def _case_dhn_nce(rng, n, reduction):
    arrays = dict(_contrastive_inputs(rng, n), temperature=np.float32(0.3))
    static = dict(beta1=0.15, beta2=0.25, reduction=reduction)
    return losses.dhn_nce_loss, arrays, static, ("zimg", "ztxt")


def case_roi(rng, n):
    arrays = _region_inputs(rng, n)
    arrays.update(
        cap_ids=rng.integers(0, 6, size=arrays["roi_mask"].shape).astype(np.int32),
        logit_scale=np.float32(4.0),
    )
    return losses.roi_contrastive_loss, arrays, {}, ("zroi", "zcap", "logit_scale")


def case_roi_without_ids(rng, n):
    arrays = dict(_region_inputs(rng, n), logit_scale=np.float32(4.0))
    return losses.roi_contrastive_loss, arrays, {}, ("zroi", "zcap", "logit_scale")


def case_negative_caption(rng, n):
    arrays = _region_inputs(rng, n)
    num = arrays["roi_mask"].shape[0]
    neg_mask = rng.random((num, NUM_ROIS, NUM_NEGATIVES)) > 0.3
    neg_mask[-1, 0] = False  # a valid ROI without any negative
    arrays.update(
        zneg=_with_garbage(_unit(rng, num, NUM_ROIS, NUM_NEGATIVES, DIM), neg_mask, rng),
        neg_mask=neg_mask,
        logit_scale=np.float32(6.0),
    )
    diff = ("zroi", "zcap", "zneg", "logit_scale")
    return losses.negative_caption_loss, arrays, {}, diff


def case_distillation(rng, n):
    mask = _roi_mask(rng, n * NUM_DEVICES, n)
    shape = (n * NUM_DEVICES, NUM_ROIS, NUM_CONCEPTS)
    arrays = dict(
        student_logits=_with_garbage((3 * rng.normal(size=shape)).astype(np.float32), mask, rng),
        teacher_logits=(3 * rng.normal(size=shape)).astype(np.float32),
        roi_mask=mask,
    )
    return losses.distillation_loss, arrays, {}, ("student_logits", "teacher_logits")


CASES = {
    "softmax": case_softmax,
    "sigmoid_ring": functools.partial(_case_sigmoid, impl="ring"),
    "sigmoid_gather": functools.partial(_case_sigmoid, impl="gather"),
    "medclip": case_medclip,
    "dhn_nce_mean": functools.partial(_case_dhn_nce, reduction="mean"),
    "dhn_nce_sum": functools.partial(_case_dhn_nce, reduction="sum"),
    "roi": case_roi,
    "roi_without_ids": case_roi_without_ids,
    "negative_caption": case_negative_caption,
    "distillation": case_distillation,
}


def _value_and_grad(loss_fn, arrays, static, diff, *, mesh=None):
    """(loss, metrics, grads of `diff`) of loss_fn: dense when mesh is None, else sharded."""
    names = tuple(sorted(arrays))
    # Batch-major arrays are sharded over "data", scalars replicated.
    specs = tuple(P() if np.ndim(arrays[name]) == 0 else P("data") for name in names)
    fn = _compiled(loss_fn, names, specs, tuple(sorted(static.items())), tuple(diff), mesh)
    (loss, metrics), grads = fn(*(arrays[name] for name in names))
    return loss, metrics, dict(zip(diff, grads, strict=True))


@functools.cache
def _compiled(loss_fn, names, specs, static, diff, mesh):
    def call(axis_name, *values):
        kwargs = dict(zip(names, values, strict=True))
        return loss_fn(**kwargs, **dict(static), axis_name=axis_name)

    if mesh is None:
        fn = functools.partial(call, None)
    else:
        fn = functools.partial(call, "data")
        fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=(P(), P()))
    argnums = tuple(names.index(name) for name in diff)
    # Compiling, not running, is what these tests spend their time on; LLVM's optimisations do
    # not change what is computed, and skipping them makes compiling 2–4x faster.
    return jax.jit(
        jax.value_and_grad(fn, argnums=argnums, has_aux=True),
        compiler_options={"xla_backend_optimization_level": 0},
    )


def _jit(loss_fn, **static):
    """loss_fn jitted with `static` bound (strings, configs); see _compiled for the option."""
    return jax.jit(
        functools.partial(loss_fn, **static),
        compiler_options={"xla_backend_optimization_level": 0},
    )


def _assert_close(actual, expected, name, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol, err_msg=name
    )


@pytest.mark.parametrize("local_batch", [1, 3, 16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_dense(mesh, case, local_batch):
    rng = np.random.default_rng(local_batch)
    loss_fn, arrays, static, diff = CASES[case](rng, local_batch)
    dense = _value_and_grad(loss_fn, arrays, static, diff)
    sharded = _value_and_grad(loss_fn, arrays, static, diff, mesh=mesh)
    _assert_close(sharded[0], dense[0], "loss")
    assert sharded[1].keys() == dense[1].keys()
    for key in dense[1]:
        _assert_close(sharded[1][key], dense[1][key], f"metric {key}")
    for name in diff:
        assert np.all(np.isfinite(dense[2][name])), name
        _assert_close(sharded[2][name], dense[2][name], f"d loss / d {name}")
    assert float(dense[0]) != 0.0


# --------------------------------------------------------------------------------------------------
# NumPy references, float64, written from the formulas.


def _np_logsumexp(x, axis=-1):
    top = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def _np_log_softmax(x):
    return x - _np_logsumexp(x)[..., None]


def np_softmax_loss(zimg, ztxt, logit_scale):
    logits = logit_scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
    diag = np.arange(len(logits))
    loss_rows = -np.mean(_np_log_softmax(logits)[diag, diag])
    loss_cols = -np.mean(_np_log_softmax(logits.T)[diag, diag])
    return (loss_rows + loss_cols) / 2


def np_sigmoid_loss(zimg, ztxt, logit_scale, logit_bias):
    n = len(zimg)
    logits = logit_scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64) + logit_bias
    labels = 2 * np.eye(n) - 1
    return np.sum(np.logaddexp(0.0, -labels * logits)) / n  # −log σ(x) = log(1 + e^{−x})


def np_medclip_loss(zimg, ztxt, img_labels, txt_labels, logit_scale, label_temperature):
    def with_no_finding(labels):
        extra = np.all(labels == 0, axis=1, keepdims=True).astype(np.float64)
        labels = np.concatenate([labels, extra], axis=1)
        return labels / np.linalg.norm(labels, axis=1, keepdims=True)

    s = with_no_finding(img_labels) @ with_no_finding(txt_labels).T  # [N_img, N_txt]
    logits = logit_scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
    y_v2t = np.exp(_np_log_softmax(s / label_temperature))
    y_t2v = np.exp(_np_log_softmax(s.T / label_temperature))
    loss_v2t = -np.sum(y_v2t * _np_log_softmax(logits)) / len(zimg)
    loss_t2v = -np.sum(y_t2v * _np_log_softmax(logits.T)) / len(ztxt)
    return (loss_v2t + loss_t2v) / 2


def np_dhn_nce_literal(zimg, ztxt, temperature, beta1, beta2, reduction):
    """Eq. 1–5 term by term, with the weight matrix W built explicitly."""
    x, y = zimg.astype(np.float64), ztxt.astype(np.float64)
    batch = len(x)

    def direction(a, b, beta):
        total = 0.0
        for i in range(batch):
            others = [j for j in range(batch) if j != i]
            weights = {
                j: (batch - 1)
                * np.exp(beta * a[i] @ b[j] / temperature)
                / sum(np.exp(beta * a[i] @ b[k] / temperature) for k in others)
                for j in others
            }
            inner = sum(np.exp(a[i] @ b[j] / temperature) * weights[j] for j in others)
            total += -a[i] @ b[i] / temperature + np.log(inner)
        return total

    loss = direction(x, y, beta1) + direction(y, x, beta2)
    return loss / batch if reduction == "mean" else loss


def np_roi_loss(zroi, zcap, roi_mask, cap_ids, logit_scale):
    valid = roi_mask.reshape(-1)
    rois = zroi.reshape(-1, zroi.shape[-1])[valid].astype(np.float64)
    caps = zcap.reshape(-1, zcap.shape[-1])[valid].astype(np.float64)
    ids = None if cap_ids is None else cap_ids.reshape(-1)[valid]
    logits = logit_scale * rois @ caps.T

    def direction(logits):
        total = 0.0
        for i in range(len(logits)):
            positives = [
                j for j in range(len(logits)) if j == i or (ids is not None and ids[j] == ids[i])
            ]
            log_probs = _np_log_softmax(logits[i])
            total += -np.mean(log_probs[positives])
        return total / len(logits)

    return (direction(logits) + direction(logits.T)) / 2


def np_negative_caption_loss(zroi, zcap, zneg, roi_mask, neg_mask, logit_scale):
    total, count = 0.0, 0
    for b, r in zip(*np.nonzero(roi_mask), strict=True):
        positive = logit_scale * zroi[b, r].astype(np.float64) @ zcap[b, r]
        negatives = [
            logit_scale * zroi[b, r].astype(np.float64) @ zneg[b, r, k]
            for k in range(zneg.shape[2])
            if neg_mask[b, r, k]
        ]
        denominator = np.exp(positive) + sum(np.exp(v) for v in negatives)
        total += -np.log(np.exp(positive) / denominator)
        count += 1
    return total / count


def np_distillation_loss(student_logits, teacher_logits, roi_mask):
    log_s = _np_log_softmax(student_logits.astype(np.float64))[roi_mask]
    log_t = _np_log_softmax(teacher_logits.astype(np.float64))[roi_mask]
    return np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=-1))


REFERENCES = {
    "softmax": lambda a, s: np_softmax_loss(a["zimg"], a["ztxt"], a["logit_scale"]),
    "sigmoid_ring": lambda a, s: np_sigmoid_loss(
        a["zimg"], a["ztxt"], a["logit_scale"], a["logit_bias"]
    ),
    "medclip": lambda a, s: np_medclip_loss(
        a["zimg"],
        a["ztxt"],
        a["img_labels"],
        a["txt_labels"],
        a["logit_scale"],
        s["label_temperature"],
    ),
    "dhn_nce_mean": lambda a, s: np_dhn_nce_literal(a["zimg"], a["ztxt"], a["temperature"], **s),
    "dhn_nce_sum": lambda a, s: np_dhn_nce_literal(a["zimg"], a["ztxt"], a["temperature"], **s),
    "roi": lambda a, s: np_roi_loss(
        a["zroi"], a["zcap"], a["roi_mask"], a["cap_ids"], a["logit_scale"]
    ),
    "roi_without_ids": lambda a, s: np_roi_loss(
        a["zroi"], a["zcap"], a["roi_mask"], None, a["logit_scale"]
    ),
    "negative_caption": lambda a, s: np_negative_caption_loss(
        a["zroi"], a["zcap"], a["zneg"], a["roi_mask"], a["neg_mask"], a["logit_scale"]
    ),
    "distillation": lambda a, s: np_distillation_loss(
        a["student_logits"], a["teacher_logits"], a["roi_mask"]
    ),
}


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_dense_equals_numpy_reference(case):
    loss_fn, arrays, static, diff = CASES[case](np.random.default_rng(7), 2)
    loss, _, _ = _value_and_grad(loss_fn, arrays, static, diff)
    np.testing.assert_allclose(float(loss), REFERENCES[case](arrays, static), rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Hand-checkable cases.


def test_softmax_aligned_embeddings_give_zero_loss():
    z = np.eye(6, DIM, dtype=np.float32)  # orthonormal, each image identical to its text
    loss, metrics = _jit(losses.softmax_contrastive_loss)(zimg=z, ztxt=z, logit_scale=100.0)
    assert float(loss) < 1e-6
    assert float(metrics["i2t_accuracy"]) == 1.0 and float(metrics["t2i_accuracy"]) == 1.0
    # ... and at scale 1 the same embeddings give log(e + 5) − 1 in both directions.
    loss, _ = _jit(losses.softmax_contrastive_loss)(zimg=z, ztxt=z, logit_scale=1.0)
    np.testing.assert_allclose(float(loss), np.log(np.e + 5) - 1, rtol=1e-6)


def test_sigmoid_hand_value():
    z = np.eye(2, DIM, dtype=np.float32)
    # logits = [[t + b, b], [b, t + b]] with t = 2, b = −1: every label·logit is 1, so the loss is
    # 4 log(1 + e^{−1}) / 2.
    loss, _ = _jit(losses.sigmoid_contrastive_loss)(
        zimg=z, ztxt=z, logit_scale=2.0, logit_bias=-1.0
    )
    np.testing.assert_allclose(float(loss), 2 * np.log1p(np.exp(-1.0)), rtol=1e-6)


def test_dhn_nce_closed_form_equals_literal_equations():
    rng = np.random.default_rng(3)
    zimg, ztxt = _unit(rng, 7, DIM), _unit(rng, 7, DIM)
    dhn_nce_sum = _jit(losses.dhn_nce_loss, reduction="sum")
    for beta1, beta2 in [(0.15, 0.15), (0.0, 0.5), (1.0, 2.0)]:
        loss, _ = dhn_nce_sum(zimg=zimg, ztxt=ztxt, temperature=0.6, beta1=beta1, beta2=beta2)
        expected = np_dhn_nce_literal(zimg, ztxt, 0.6, beta1, beta2, "sum")
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_dhn_nce_with_zero_beta_is_infonce_without_the_positive():
    # β = 0 makes every W_ij = 1: the loss is Σ_i −s_ii + log Σ_{j≠i} e^{s_ij} in each direction.
    z = np.eye(3, DIM, dtype=np.float32)
    loss, _ = _jit(losses.dhn_nce_loss, reduction="sum")(
        zimg=z, ztxt=z, temperature=0.5, beta1=0.0, beta2=0.0
    )
    np.testing.assert_allclose(float(loss), 2 * 3 * (-2.0 + np.log(2.0)), rtol=1e-6)


def test_roi_duplicate_caption_ids_are_positives():
    # Two ROIs matched to orthonormal captions, but both captions have the same id.
    z = np.eye(2, DIM, dtype=np.float32).reshape(1, 2, DIM)
    common = dict(zroi=z, zcap=z, roi_mask=np.ones((1, 2), bool), logit_scale=1.0)
    # Without ids: CE with one positive, −log(e / (e + 1)) = log(1 + e) − 1 in both directions.
    loss, _ = _jit(losses.roi_contrastive_loss)(**common)
    np.testing.assert_allclose(float(loss), np.log1p(np.e) - 1, rtol=1e-6)
    # With duplicate ids: uniform target over both, −½ (log p_own + log p_other) = log(1 + e) − ½.
    loss, metrics = _jit(losses.roi_contrastive_loss)(**common, cap_ids=np.array([[5, 5]]))
    np.testing.assert_allclose(float(loss), np.log1p(np.e) - 0.5, rtol=1e-6)
    assert float(metrics["r2c_accuracy"]) == 1.0


def test_roi_duplicates_are_not_pushed_apart():
    # ROI 0's caption text appears twice (captions 0 and 1, identical embeddings). With their ids
    # the two copies get the same gradient; without, copy 1 is pushed away from ROI 0.
    rng = np.random.default_rng(4)
    zroi = _unit(rng, 1, 3, DIM)
    zcap = _unit(rng, 1, 3, DIM)
    zcap[0, 1] = zcap[0, 0]
    common = dict(zroi=zroi, roi_mask=np.ones((1, 3), bool), logit_scale=5.0)

    def grad_caps(cap_ids):
        fn = lambda zcap: losses.roi_contrastive_loss(zcap=zcap, cap_ids=cap_ids, **common)[0]
        return np.asarray(jax.jit(jax.grad(fn))(zcap))

    with_ids = grad_caps(np.array([[1, 1, 2]]))
    np.testing.assert_allclose(with_ids[0, 0], with_ids[0, 1], rtol=1e-5, atol=1e-7)
    without_ids = grad_caps(None)
    assert np.abs(without_ids[0, 0] - without_ids[0, 1]).max() > 1e-2


def test_negative_caption_hand_value():
    z = np.eye(3, DIM, dtype=np.float32)
    zroi, zcap = z[None, :1], z[None, :1]  # one ROI, its caption identical: s+ = 1
    zneg = np.stack([z[0], z[1], z[2]])[None, None]  # negatives: s = 1, 0, 0
    neg_mask = np.array([[[True, True, False]]])
    loss, _ = _jit(losses.negative_caption_loss)(
        zroi=zroi,
        zcap=zcap,
        zneg=zneg,
        roi_mask=np.ones((1, 1), bool),
        neg_mask=neg_mask,
        logit_scale=2.0,
    )
    expected = -np.log(np.exp(2) / (np.exp(2) + np.exp(2) + np.exp(0)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    # No negatives at all (data.num_negatives = 0): nothing to push away, loss 0.
    loss, metrics = _jit(losses.negative_caption_loss)(
        zroi=zroi,
        zcap=zcap,
        zneg=zneg[:, :, :0],
        roi_mask=np.ones((1, 1), bool),
        neg_mask=neg_mask[:, :, :0],
        logit_scale=2.0,
    )
    assert float(loss) == 0.0 and float(metrics["accuracy"]) == 1.0


def test_distillation_is_zero_for_equal_logits_and_never_updates_the_teacher():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, NUM_ROIS, NUM_CONCEPTS)).astype(np.float32)
    mask = np.ones((2, NUM_ROIS), bool)
    loss, metrics = _jit(losses.distillation_loss)(
        student_logits=logits, teacher_logits=logits, roi_mask=mask
    )
    assert abs(float(loss)) < 1e-6 and float(metrics["top1_agreement"]) == 1.0
    fn = lambda student, teacher: losses.distillation_loss(
        student_logits=student, teacher_logits=teacher, roi_mask=mask
    )[0]
    d_student, d_teacher = jax.jit(jax.grad(fn, argnums=(0, 1)))(logits, 2 * logits)
    assert np.abs(d_student).max() > 1e-3 and not np.any(np.asarray(d_teacher))


def test_medclip_all_negative_labels_get_a_no_finding_dimension():
    # Two "no finding" images and texts: label similarity 1 within, so targets are uniform, and
    # with equal embeddings the loss is log 2 per direction; without the extra dimension the
    # cosine of zero vectors would be NaN.
    z = np.tile(np.eye(1, DIM, dtype=np.float32), (2, 1))
    labels = np.zeros((2, NUM_CLASSES), np.float32)
    loss, _ = _jit(losses.medclip_loss)(
        zimg=z, ztxt=z, img_labels=labels, txt_labels=labels, logit_scale=3.0
    )
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# No NaN / Inf.


def _assert_finite(tree, name):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), f"{name}: non-finite {path}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_nan_with_identical_embeddings(case):
    rng = np.random.default_rng(11)
    loss_fn, arrays, static, diff = CASES[case](rng, 2)
    for name in ("zimg", "ztxt", "zroi", "zcap", "zneg"):
        if name in arrays:
            arrays[name] = np.broadcast_to(arrays[name].reshape(-1, DIM)[-1], arrays[name].shape)
    _assert_finite(_value_and_grad(loss_fn, arrays, static, diff), case)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 100.0, 1e4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_nan_at_extreme_logit_scale(case, scale):
    loss_fn, arrays, static, diff = CASES[case](np.random.default_rng(12), 2)
    if "logit_scale" in arrays:
        arrays["logit_scale"] = np.float32(scale)
    elif "temperature" in arrays:
        arrays["temperature"] = np.float32(1.0 / scale)
    else:  # distillation: logits already divided by a temperature
        arrays = {k: v * scale if k.endswith("logits") else v for k, v in arrays.items()}
    if "logit_bias" in arrays:
        arrays["logit_bias"] = np.float32(-scale)
    _assert_finite(_value_and_grad(loss_fn, arrays, static, diff), f"{case} at {scale}")


REGION_CASES = ("roi", "roi_without_ids", "negative_caption", "distillation")


@pytest.mark.parametrize("case", REGION_CASES)
def test_no_nan_when_rois_are_masked(mesh, case):
    rng = np.random.default_rng(13)
    loss_fn, arrays, static, diff = CASES[case](rng, 2)
    # Padded slots hold NaN, as an embedding of an all-zero box could.
    for name in ("zroi", "zcap", "zneg", "student_logits"):
        if name in arrays:
            mask = arrays["neg_mask" if name == "zneg" else "roi_mask"]
            arrays[name] = np.where(mask[..., None], arrays[name], np.nan).astype(np.float32)
    # Images 0, 1 (all of device 0's shard) and 5 have every ROI padded.
    arrays["roi_mask"][[0, 1, 5]] = False
    for shard_mesh in (None, mesh):
        loss, metrics, grads = _value_and_grad(loss_fn, arrays, static, diff, mesh=shard_mesh)
        _assert_finite((loss, metrics, grads), case)
        for name in ("zroi", "zcap", "student_logits"):
            if name in grads:  # padded slots get exactly zero gradient
                assert not np.any(np.asarray(grads[name])[~arrays["roi_mask"]])
    # With every ROI of the global batch padded the loss is 0, not NaN.
    arrays["roi_mask"][:] = False
    loss, metrics, grads = _value_and_grad(loss_fn, arrays, static, diff, mesh=mesh)
    _assert_finite((loss, metrics, grads), case)
    assert float(loss) == 0.0 and float(metrics["num_rois"]) == 0.0


# --------------------------------------------------------------------------------------------------
# Total loss.


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
        )
    )
    config.update(overrides)
    return config


def _total_inputs(rng, n):
    region = case_negative_caption(rng, n)[1]
    num = n * NUM_DEVICES
    out = dict(
        zimg=_unit(rng, num, DIM),
        ztxt=_unit(rng, num, DIM),
        zroi=region["zroi"],
        zcap=region["zcap"],
        zneg=region["zneg"],
        logit_scale=np.float32(np.log(1 / 0.07)),
        logit_bias=np.float32(-10.0),
    )
    batch = dict(
        roi_mask=region["roi_mask"],
        neg_mask=region["neg_mask"],
        cap_ids=rng.integers(0, 6, size=region["roi_mask"].shape).astype(np.int32),
        labels=(rng.random((num, NUM_CLASSES)) > 0.6).astype(np.float32),
    )
    shape = (num, NUM_ROIS, NUM_CONCEPTS)
    logits = dict(
        student_logits=rng.normal(size=shape).astype(np.float32),
        teacher_logits=rng.normal(size=shape).astype(np.float32),
    )
    return out, batch, logits


def test_total_loss_is_the_weighted_sum_of_its_terms():
    out, batch, logits = _total_inputs(np.random.default_rng(21), 1)
    config = _loss_config(alpha=0.5, beta=2.0, gamma=3.0, lambda_=0.25, roi_temperature=0.1)
    total, metrics = _jit(losses.total_loss, loss_config=config)(out=out, batch=batch, **logits)
    t = np.exp(out["logit_scale"])
    roi_args = dict(zroi=out["zroi"], zcap=out["zcap"], roi_mask=batch["roi_mask"])
    terms = [
        _jit(losses.softmax_contrastive_loss)(zimg=out["zimg"], ztxt=out["ztxt"], logit_scale=t)[0],
        _jit(losses.roi_contrastive_loss)(**roi_args, cap_ids=batch["cap_ids"], logit_scale=10.0)[
            0
        ],
        _jit(losses.negative_caption_loss)(
            **roi_args, zneg=out["zneg"], neg_mask=batch["neg_mask"], logit_scale=10.0
        )[0],
        _jit(losses.distillation_loss)(**logits, roi_mask=batch["roi_mask"])[0],
    ]
    expected = np.dot([0.5, 2.0, 3.0, 0.25], [float(v) for v in terms])
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    for name, value in zip(("global", "roi", "neg", "distill"), terms, strict=True):
        np.testing.assert_allclose(float(metrics[f"{name}/loss"]), float(value), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["logit_scale"]), t, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["roi_temperature"]), 0.1, rtol=1e-6)


def test_total_loss_skips_distillation_without_a_teacher_and_zero_weights():
    out, batch, _ = _total_inputs(np.random.default_rng(22), 1)
    for name in ("zroi", "zcap", "zneg"):
        del out[name]
    config = _loss_config(beta=0.0, gamma=0.0)
    total, metrics = _jit(losses.total_loss, loss_config=config)(out=out, batch=batch)
    assert float(metrics["distill/weight"]) == 0.0 and float(metrics["roi/loss"]) == 0.0
    np.testing.assert_allclose(float(total), float(metrics["global/loss"]), rtol=1e-6)
    with pytest.raises(ValueError, match="global_kind"):
        losses.total_loss(out=out, batch=batch, loss_config=_loss_config(global_kind="hinge"))


@pytest.mark.parametrize("kind", losses.GLOBAL_KINDS)
def test_total_loss_sharded_equals_dense(mesh, kind):
    out, batch, logits = _total_inputs(np.random.default_rng(23), 2)
    config = _loss_config(global_kind=kind)

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
    diff = ("zimg", "ztxt", "zroi", "zcap", "zneg", "logit_scale", "logit_bias", "student_logits")
    dense = _value_and_grad(loss_fn, arrays, {}, diff)
    sharded = _value_and_grad(loss_fn, arrays, {}, diff, mesh=mesh)
    _assert_close(sharded[0], dense[0], "loss")
    for key in dense[1]:
        _assert_close(sharded[1][key], dense[1][key], f"metric {key}")
    for name in diff:
        _assert_close(sharded[2][name], dense[2][name], f"d loss / d {name}")
    # The global term is the configured kind: its metrics are there.
    assert ("global/logit_bias" in dense[1]) == (kind == "sigmoid")
