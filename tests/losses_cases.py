"""Inputs of every loss and the checks that every loss passes, shared by tests/losses_*_test.py.

A case is `fn(rng, n) -> (loss_fn, arrays, static kwargs, names to differentiate)` for a local
batch of n rows on each of the 8 simulated devices (conftest.py). Arrays with a batch axis are
sharded over "data", scalars are replicated. The check_* functions hold the assertions that each
test module runs over the cases of its own losses (CASE_GROUPS).
"""

import functools

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from losses_reference import REFERENCES

from conftest import require_peer
from region_medclip import losses

NUM_DEVICES = 8
DIM = 8
NUM_ROIS = 3
NUM_NEGATIVES = 4
NUM_CONCEPTS = 5
NUM_CLASSES = 4
NUM_WORDS = 5
NUM_PATCHES = 4
LOCAL_BATCHES = (1, 3, 16)
EXTREME_SCALES = (1e-6, 1.0, 100.0, 1e4)


def make_mesh():
    assert jax.device_count() == NUM_DEVICES, "conftest.py must force 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("data",))


def unit(rng, *shape):
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


def _contrastive_inputs(rng, n):
    num = n * NUM_DEVICES
    return dict(zimg=unit(rng, num, DIM), ztxt=unit(rng, num, DIM))


def _region_inputs(rng, n):
    num = n * NUM_DEVICES
    mask = _roi_mask(rng, num, n)
    return dict(
        zroi=_with_garbage(unit(rng, num, NUM_ROIS, DIM), mask, rng),
        zcap=_with_garbage(unit(rng, num, NUM_ROIS, DIM), mask, rng),
        roi_mask=mask,
    )


def case_softmax(rng, n):
    arrays = dict(_contrastive_inputs(rng, n), logit_scale=np.float32(7.0))
    return losses.softmax_contrastive_loss, arrays, {}, ("zimg", "ztxt", "logit_scale")


def case_softmax_hard_negatives(rng, n):
    """NegCLIP: each image's own hard-negative reports, some masked (garbage behind the mask),
    image 0 with none at all."""
    arrays = dict(_contrastive_inputs(rng, n), logit_scale=np.float32(7.0))
    num = arrays["zimg"].shape[0]
    neg_mask = rng.random((num, NUM_NEGATIVES)) > 0.3
    neg_mask[0] = False
    arrays.update(
        zneg=_with_garbage(unit(rng, num, NUM_NEGATIVES, DIM), neg_mask, rng), neg_mask=neg_mask
    )
    return losses.softmax_contrastive_loss, arrays, {}, ("zimg", "ztxt", "zneg", "logit_scale")


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
        zimg=unit(rng, num_img, DIM),
        ztxt=unit(rng, num_txt, DIM),
        img_labels=img_labels,
        txt_labels=(rng.random((num_txt, NUM_CLASSES)) > 0.6).astype(np.float32),
        logit_scale=np.float32(5.0),
    )
    static = dict(label_temperature=0.5)
    return losses.medclip_loss, arrays, static, ("zimg", "ztxt", "logit_scale")


def case_medclip_unpaired(rng, n):
    """Rows of a mixed batch: some without an image, some without a report (garbage behind each
    mask, one device's rows all image-only)."""
    loss_fn, arrays, static, diff = case_medclip(rng, n)
    num = arrays["zimg"].shape[0]
    arrays["ztxt"], arrays["txt_labels"] = arrays["ztxt"][:num], arrays["txt_labels"][:num]
    img_mask, txt_mask = rng.random(num) > 0.3, rng.random(num) > 0.3
    img_mask[:n], txt_mask[:n] = True, False
    img_mask[n], txt_mask[n] = True, True
    arrays.update(
        zimg=_with_garbage(arrays["zimg"], img_mask, rng),
        ztxt=_with_garbage(arrays["ztxt"], txt_mask, rng),
        img_mask=img_mask,
        txt_mask=txt_mask,
    )
    return loss_fn, arrays, static, diff


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
        zneg=_with_garbage(unit(rng, num, NUM_ROIS, NUM_NEGATIVES, DIM), neg_mask, rng),
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


def case_gloria_local(rng, n):
    """Reports of 1 to NUM_WORDS valid words anywhere in the sequence, garbage behind the mask."""
    num = n * NUM_DEVICES
    word_mask = rng.random((num, NUM_WORDS)) > 0.4
    word_mask[np.arange(num), rng.integers(0, NUM_WORDS, num)] = True  # at least one word each
    arrays = dict(
        zwords=_with_garbage(unit(rng, num, NUM_WORDS, DIM), word_mask, rng),
        word_mask=word_mask,
        zpatch=unit(rng, num, NUM_PATCHES, DIM),
    )
    static = dict(temperature1=4.0, temperature2=5.0, temperature3=10.0)  # GLoRIA's
    return losses.gloria_local_loss, arrays, static, ("zwords", "zpatch")


def _random_boxes(rng, *shape):
    """``[*shape, 4]`` xyxy boxes with positive extents inside the unit square."""
    low = rng.uniform(0.0, 0.6, (*shape, 2))
    return np.concatenate([low, low + rng.uniform(0.05, 0.4, (*shape, 2))], -1).astype(np.float32)


def case_box(rng, n):
    """The box head's proposals against assigned targets; cells without one hold garbage."""
    num = n * NUM_DEVICES
    positive = rng.random((num, NUM_PATCHES)) < 0.4
    positive[0, 0] = True  # at least one assigned cell in the batch
    targets = _random_boxes(rng, num, NUM_PATCHES)
    targets[~positive] = np.nan  # never read where no box is assigned
    arrays = dict(
        boxes=_random_boxes(rng, num, NUM_PATCHES),
        objectness=rng.normal(0.0, 2.0, (num, NUM_PATCHES)).astype(np.float32),
        targets=targets,
        positive=positive,
    )
    static = dict(l1=5.0, giou=2.0, objectness_weight=1.0)  # DETR's weights
    return losses.box_loss, arrays, static, ("boxes", "objectness")


CASES = {
    "softmax": case_softmax,
    "softmax_hard_negatives": case_softmax_hard_negatives,
    "sigmoid_ring": functools.partial(_case_sigmoid, impl="ring"),
    "sigmoid_gather": functools.partial(_case_sigmoid, impl="gather"),
    "medclip": case_medclip,
    "medclip_unpaired": case_medclip_unpaired,
    "dhn_nce_mean": functools.partial(_case_dhn_nce, reduction="mean"),
    "dhn_nce_sum": functools.partial(_case_dhn_nce, reduction="sum"),
    "roi": case_roi,
    "roi_without_ids": case_roi_without_ids,
    "negative_caption": case_negative_caption,
    "distillation": case_distillation,
    "gloria_local": case_gloria_local,
    "box": case_box,
}
# The cases each test module runs, by the module of region_medclip.losses they test.
CASE_GROUPS = {
    "contrastive": (
        "dhn_nce_mean",
        "dhn_nce_sum",
        "medclip",
        "medclip_unpaired",
        "softmax",
        "softmax_hard_negatives",
    ),
    "sigmoid": ("sigmoid_gather", "sigmoid_ring"),
    "region": ("distillation", "negative_caption", "roi", "roi_without_ids"),
    "local": ("gloria_local",),
    "boxes": ("box",),
}
assert sorted(sum(CASE_GROUPS.values(), ())) == sorted(CASES), "every case belongs to one group"


def with_reference(group):
    """The cases of `group` that have a NumPy reference."""
    return tuple(case for case in CASE_GROUPS[group] if case in REFERENCES)


def value_and_grad(loss_fn, arrays, static, diff, *, mesh=None):
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


def jit(loss_fn, **static):
    """loss_fn jitted with `static` bound (strings, configs); see _compiled for the option."""
    return jax.jit(
        functools.partial(loss_fn, **static),
        compiler_options={"xla_backend_optimization_level": 0},
    )


def assert_close(actual, expected, name, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol, err_msg=name
    )


def assert_finite(tree, name):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), f"{name}: non-finite {path}"


def check_sharded_equals_dense(mesh, case, local_batch):
    """Loss, every metric and every gradient on 8 devices equal the dense ones."""
    rng = np.random.default_rng(local_batch)
    loss_fn, arrays, static, diff = CASES[case](rng, local_batch)
    dense = value_and_grad(loss_fn, arrays, static, diff)
    sharded = value_and_grad(loss_fn, arrays, static, diff, mesh=mesh)
    assert_close(sharded[0], dense[0], "loss")
    assert sharded[1].keys() == dense[1].keys(), (sharded[1].keys(), dense[1].keys())
    for key in dense[1]:
        assert_close(sharded[1][key], dense[1][key], f"metric {key}")
    for name in diff:
        assert np.all(np.isfinite(dense[2][name])), name
        assert_close(sharded[2][name], dense[2][name], f"d loss / d {name}")
    assert float(dense[0]) != 0.0, f"{case}: the dense loss is 0, the check is vacuous"


def check_dense_equals_reference(case):
    loss_fn, arrays, static, diff = CASES[case](np.random.default_rng(7), 2)
    loss, _, _ = value_and_grad(loss_fn, arrays, static, diff)
    np.testing.assert_allclose(float(loss), REFERENCES[case](arrays, static), rtol=1e-5)


def check_no_nan_with_identical_embeddings(case):
    rng = np.random.default_rng(11)
    loss_fn, arrays, static, diff = CASES[case](rng, 2)
    for name in ("zimg", "ztxt", "zroi", "zcap", "zneg", "zwords", "zpatch"):
        if name in arrays:
            arrays[name] = np.broadcast_to(arrays[name].reshape(-1, DIM)[-1], arrays[name].shape)
    assert_finite(value_and_grad(loss_fn, arrays, static, diff), case)


def check_no_nan_at_extreme_logit_scale(case, scale):
    loss_fn, arrays, static, diff = CASES[case](np.random.default_rng(12), 2)
    if "logit_scale" in arrays:
        arrays["logit_scale"] = np.float32(scale)
    elif "temperature" in arrays:
        arrays["temperature"] = np.float32(1.0 / scale)
    elif "temperature3" in static:  # GLoRIA's local loss: its three multipliers, all at once
        static = dict.fromkeys(static, float(scale))
    else:  # distillation: logits already divided by a temperature
        arrays = {k: v * scale if k.endswith("logits") else v for k, v in arrays.items()}
    if "logit_bias" in arrays:
        arrays["logit_bias"] = np.float32(-scale)
    assert_finite(value_and_grad(loss_fn, arrays, static, diff), f"{case} at {scale}")


# --------------------------------------------------------------------------------------------------
# Parity with open_clip (tests marked `parity`): its losses take the multiplier t = exp(t') as
# their logit_scale, as ours do.


def parity_inputs(seed, batch, dim=32):
    """Two [batch, dim] float32 arrays of unit rows: image and text embeddings."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(2, batch, dim))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return z[0].astype(np.float32), z[1].astype(np.float32)


def torch_value_and_grads(loss_module, *arrays):
    """(loss, [gradient w.r.t. each array]) of a torch loss module, as NumPy."""
    torch = require_peer("torch")
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    loss = loss_module(*tensors)
    loss.backward()
    return loss.item(), [t.grad.numpy() for t in tensors]


def assert_parity(ours, theirs):
    """Equal (loss, grads) pairs in float32: rtol 1e-5."""
    (our_loss, our_grads), (their_loss, their_grads) = ours, theirs
    np.testing.assert_allclose(float(our_loss), their_loss, rtol=1e-5)
    for ours_grad, theirs_grad in zip(our_grads, their_grads, strict=True):
        # atol for entries that nearly cancel; gradients here are of order 0.1 to 1.
        np.testing.assert_allclose(np.asarray(ours_grad), theirs_grad, rtol=1e-5, atol=1e-6)
