"""RoIAlign over a channels-last feature map, with torchvision ``roi_align`` semantics.

Bilinear sampling is separable, and so is the average over a bin's ``sampling_ratio²`` grid of
samples, so every output bin is ``Σ_h Σ_w Wy[bin_y, h] · Wx[bin_x, w] · F[h, w]`` with
per-axis weight matrices. Building those matrices and contracting them with two einsums avoids
gathers entirely (matmuls are what TPUs and GPUs are good at) and is exactly torchvision's
arithmetic: the same sample points, the same clamping at the border, the same "outside → 0" rule.
"""

import jax
import jax.numpy as jnp


def _axis_weights(
    start: jax.Array,
    end: jax.Array,
    *,
    size: int,
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
) -> jax.Array:
    """Interpolation weights along one axis.

    Args:
      start, end: ``[...]`` box edges along this axis, already in feature-map coordinates
        (scaled, and shifted by −0.5 when ``aligned``).
      size: feature-map length along this axis.

    Returns:
      ``[..., output_size, size]``: row ``p`` is the mean over the bin's samples of their
      bilinear weights on the ``size`` grid positions.
    """
    length = end - start
    if not aligned:
        # Legacy (aligned=False) torchvision forces boxes to be at least one cell long.
        length = jnp.maximum(length, 1.0)
    bin_len = length / output_size
    bins = jnp.arange(output_size, dtype=start.dtype)
    samples = (jnp.arange(sampling_ratio, dtype=start.dtype) + 0.5) / sampling_ratio
    # [..., output_size, sampling_ratio] sample coordinates.
    coords = (
        start[..., None, None]
        + bins[:, None] * bin_len[..., None, None]
        + samples[None, :] * bin_len[..., None, None]
    )
    # torchvision: a sample more than one cell outside the map contributes zero.
    inside = (coords >= -1.0) & (coords <= size)
    coords = jnp.maximum(coords, 0.0)
    low = jnp.floor(coords).astype(jnp.int32)
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    high = jnp.where(at_edge, size - 1, low + 1)
    coords = jnp.where(at_edge, low.astype(coords.dtype), coords)
    frac = coords - low
    weights = jax.nn.one_hot(low, size, dtype=coords.dtype) * (1.0 - frac)[..., None]
    weights += jax.nn.one_hot(high, size, dtype=coords.dtype) * frac[..., None]
    weights *= inside[..., None].astype(coords.dtype)
    return weights.mean(axis=-2)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    *,
    output_size: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> jax.Array:
    """Pools a fixed ``output_size × output_size`` grid of bins from each box.

    Equals ``torchvision.ops.roi_align(features.transpose(0,3,1,2), boxes, output_size,
    spatial_scale, sampling_ratio, aligned)`` for a positive ``sampling_ratio``
    (torchvision's adaptive ``-1`` depends on the box size and so cannot have a static shape).

    Args:
      features: ``[B, H, W, C]`` feature map.
      boxes: ``[B, R, 4]`` boxes ``(x1, y1, x2, y2)`` in input coordinates; multiplied by
        ``spatial_scale`` to reach feature-map coordinates (and shifted by −0.5 if ``aligned``).
      output_size: bins per axis.
      spatial_scale: feature-map cells per input unit (1/stride).
      sampling_ratio: bilinear samples per bin along each axis (> 0).
      aligned: pixel-centre alignment (``aligned=True`` in torchvision, as in Detectron2).

    Returns:
      ``[B, R, output_size, output_size, C]``, in the features' dtype.
    """
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be positive, got {sampling_ratio}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, R, 4], got {boxes.shape}")
    _, height, width, _ = features.shape
    boxes = boxes.astype(jnp.float32) * spatial_scale - (0.5 if aligned else 0.0)
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    kw = dict(output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned)
    weights_y = _axis_weights(y1, y2, size=height, **kw).astype(features.dtype)  # [B, R, S, H]
    weights_x = _axis_weights(x1, x2, size=width, **kw).astype(features.dtype)  # [B, R, S, W]
    rows = jnp.einsum("brtw,bhwc->brhtc", weights_x, features)
    return jnp.einsum("brsh,brhtc->brstc", weights_y, rows)
