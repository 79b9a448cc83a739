"""RoIAlign against an independent NumPy implementation of torchvision's algorithm."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_peer
from region_medclip.models.roi_align import roi_align


def _bilinear(fmap, y, x):
    """torchvision's bilinear_interpolate for one sample of a [H, W, C] map."""
    height, width = fmap.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(fmap.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(math.floor(y)), int(math.floor(x))
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * fmap[y_low, x_low]
        + hy * lx * fmap[y_low, x_high]
        + ly * hx * fmap[y_high, x_low]
        + ly * lx * fmap[y_high, x_high]
    )


def numpy_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    """Loop-by-loop RoIAlign: features [B, H, W, C], boxes [B, R, 4] → [B, R, S, S, C]."""
    batch, num_rois = boxes.shape[:2]
    out = np.zeros((batch, num_rois, output_size, output_size, features.shape[-1]))
    offset = 0.5 if aligned else 0.0
    for b in range(batch):
        for r in range(num_rois):
            x1, y1, x2, y2 = (float(v) * spatial_scale - offset for v in boxes[b, r])
            roi_w, roi_h = x2 - x1, y2 - y1
            if not aligned:
                roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
            bin_h, bin_w = roi_h / output_size, roi_w / output_size
            for ph in range(output_size):
                for pw in range(output_size):
                    acc = np.zeros(features.shape[-1])
                    for iy in range(sampling_ratio):
                        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                        for ix in range(sampling_ratio):
                            x = x1 + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                            acc += _bilinear(features[b], y, x)
                    out[b, r, ph, pw] = acc / sampling_ratio**2
    return out


def _random_case(seed, batch=2, num_rois=6, height=7, width=9, channels=3, scale=16.0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    # Boxes in pixel coordinates of a (height*scale) x (width*scale) image, some reaching past
    # the border, some tiny (smaller than one bin), one degenerate (zero width).
    lo = rng.uniform(-0.3, 0.9, size=(batch, num_rois, 2)) * [width * scale, height * scale]
    size = rng.uniform(0.02, 0.8, size=(batch, num_rois, 2)) * [width * scale, height * scale]
    boxes = np.concatenate([lo, lo + size], axis=-1)
    boxes[0, 0] = [-20.0, -30.0, width * scale + 25.0, 40.0]  # partly outside on three sides
    boxes[0, 1] = [50.0, 60.0, 52.0, 61.0]  # much smaller than a bin
    boxes[1, 0] = [30.0, 30.0, 30.0, 30.0]  # degenerate point box
    boxes[1, 1] = [width * scale + 40.0, 0.0, width * scale + 90.0, 20.0]  # fully outside
    return features, boxes.astype(np.float32), 1.0 / scale


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("output_size,sampling_ratio", [(2, 2), (3, 1), (4, 3)])
def test_matches_numpy_reference(aligned, output_size, sampling_ratio):
    features, boxes, scale = _random_case(seed=output_size * 10 + sampling_ratio)
    expected = numpy_roi_align(features, boxes, output_size, scale, sampling_ratio, aligned)
    got = roi_align(
        jnp.asarray(features),
        jnp.asarray(boxes),
        output_size=output_size,
        spatial_scale=scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    # The fully outside box pools to exactly zero.
    np.testing.assert_array_equal(np.asarray(got)[1, 1], 0.0)


def test_constant_map_inside_box_is_constant():
    features = jnp.full((1, 8, 8, 2), 3.0)
    boxes = jnp.array([[[1.0, 1.0, 6.0, 5.0]]])
    out = roi_align(features, boxes, output_size=3, sampling_ratio=2)
    np.testing.assert_allclose(np.asarray(out), 3.0, rtol=1e-6)


def test_gradients_are_finite_and_jit_works():
    features, boxes, scale = _random_case(seed=3)
    fn = jax.jit(lambda f: roi_align(f, boxes, output_size=2, spatial_scale=scale).sum())
    grad = jax.grad(fn)(jnp.asarray(features))
    assert np.isfinite(np.asarray(grad)).all()


def test_rejects_adaptive_sampling_ratio():
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 4)), output_size=2, sampling_ratio=-1)


@pytest.mark.parity
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_torchvision(aligned):
    torch = require_peer("torch")
    ops = require_peer("torchvision.ops")
    features, boxes, scale = _random_case(seed=11)
    batch, num_rois = boxes.shape[:2]
    index = np.repeat(np.arange(batch, dtype=np.float32), num_rois)[:, None]
    rois = torch.from_numpy(np.concatenate([index, boxes.reshape(-1, 4)], axis=1))
    expected = ops.roi_align(
        torch.from_numpy(features).permute(0, 3, 1, 2),
        rois,
        output_size=3,
        spatial_scale=scale,
        sampling_ratio=2,
        aligned=aligned,
    )
    expected = expected.permute(0, 2, 3, 1).numpy().reshape(batch, num_rois, 3, 3, -1)
    got = roi_align(
        jnp.asarray(features),
        jnp.asarray(boxes),
        output_size=3,
        spatial_scale=scale,
        sampling_ratio=2,
        aligned=aligned,
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
