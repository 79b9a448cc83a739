"""The box head's loss: sharded == dense (values and gradients on 8 devices), the NumPy
reference, generalised IoU against torchvision and by hand, and what the total loss adds."""

import jax.numpy as jnp
import losses_cases as lc
import ml_collections
import numpy as np
import pytest

from conftest import require_peer
from region_medclip import losses
from region_medclip.losses.boxes import generalized_iou

CASES = lc.CASE_GROUPS["boxes"]


@pytest.fixture(scope="module")
def mesh():
    return lc.make_mesh()


@pytest.mark.parametrize("local_batch", lc.LOCAL_BATCHES)
@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_dense(mesh, case, local_batch):
    lc.check_sharded_equals_dense(mesh, case, local_batch)


@pytest.mark.parametrize("case", lc.with_reference("boxes"))
def test_dense_equals_numpy_reference(case):
    lc.check_dense_equals_reference(case)


def test_generalized_iou_by_hand():
    """Identical boxes: 1; a box inside one twice its side: IoU ¼ and nothing outside both;
    two unit squares a unit apart: IoU 0 and ⅓ of the hull empty."""
    a = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    b = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 3.0, 1.0]])
    giou, iou = generalized_iou(a, b)
    np.testing.assert_allclose(iou, [1.0, 0.25, 0.0], atol=1e-6)
    np.testing.assert_allclose(giou, [1.0, 0.25, -1.0 / 3.0], atol=1e-6)


def test_generalized_iou_equals_torchvision():
    torch = require_peer("torch")
    ops = require_peer("torchvision.ops")
    rng = np.random.default_rng(3)
    a, b = lc._random_boxes(rng, 64), lc._random_boxes(rng, 64)
    ours, _ = generalized_iou(jnp.asarray(a), jnp.asarray(b))
    theirs = ops.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b)).diagonal()
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-6)


def test_perfect_boxes_leave_only_objectness():
    """Boxes equal to their targets cost nothing; confident, right objectness costs ~0."""
    rng = np.random.default_rng(0)
    boxes = lc._random_boxes(rng, 2, 4)
    positive = np.array([[True, False, True, False], [False, False, False, True]])
    loss, metrics = losses.box_loss(
        boxes=boxes,
        objectness=np.where(positive, 30.0, -30.0),
        targets=boxes,
        positive=positive,
    )
    assert float(loss) < 1e-6
    assert float(metrics["iou"]) == pytest.approx(1.0)
    assert float(metrics["positives"]) == 3


def test_no_finding_in_the_batch_leaves_the_objectness_term():
    rng = np.random.default_rng(1)
    objectness = rng.normal(size=(2, 4)).astype(np.float32)
    loss, metrics = losses.box_loss(
        boxes=lc._random_boxes(rng, 2, 4),
        objectness=objectness,
        targets=np.full((2, 4, 4), np.nan, np.float32),
        positive=np.zeros((2, 4), bool),
        objectness_weight=0.5,
    )
    expected = 0.5 * np.mean(np.log1p(np.exp(objectness.astype(np.float64))))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["positives"]) == 0


def _loss_config(box_weight):
    return ml_collections.ConfigDict(
        dict(
            global_kind="softmax",
            alpha=1.0,
            beta=0.0,
            gamma=0.0,
            lambda_=0.0,
            roi_temperature=0.0,
            local_weight=0.0,
            box_weight=box_weight,
            box=dict(l1=5.0, giou=2.0, objectness=1.0),
        )
    )


def test_total_loss_adds_nu_times_the_box_loss():
    """L_total gains ν L_box; with ν = 0 the box inputs may be absent."""
    rng = np.random.default_rng(2)
    _, arrays, static, _ = lc.case_box(rng, 1)
    out = dict(
        zimg=lc.unit(rng, 8, lc.DIM),
        ztxt=lc.unit(rng, 8, lc.DIM),
        logit_scale=np.float32(np.log(10.0)),
        proposals=arrays["boxes"],
        objectness=arrays["objectness"],
    )
    batch = dict(box_targets=arrays["targets"], box_positive=arrays["positive"])
    without, _ = losses.total_loss(out=out, batch={}, loss_config=_loss_config(0.0))
    with_box, metrics = losses.total_loss(out=out, batch=batch, loss_config=_loss_config(0.5))
    box, _ = losses.box_loss(**arrays, **static)
    np.testing.assert_allclose(float(with_box), float(without) + 0.5 * float(box), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["box/loss"]), float(box), rtol=1e-6)
