"""Box head: every patch token proposes one box and how likely it is to hold a finding.

The region tower embeds boxes someone drew; a new film has none. Window proposals (every scale
at sub-patch strides) are scored well by the region head only at the lesion's centre, not at
its extent: a window inside a lesion reads as much like the lesion as the lesion's own box. So,
as RegionCLIP borrows a class-agnostic region proposal network and OWL-ViT gives every output
token a box, each patch token here regresses the box of the finding it lies in (FCOS's
assignment, Tian et al. 2019, with DETR's L1 + generalised-IoU box loss) and a logit that it
lies in one at all. What the box shows is still the region head's to say, against any phrase.

Boxes are parametrised from the patch: centre ``(j + ½ + dx, i + ½ + dy) / g`` and size
``(e^dw, e^dh) / g``, so a zero output (the last layer starts at zero) is the patch's own cell.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from region_medclip.models import layers

Dtype = Any


class BoxHead(nn.Module):
    """An MLP on each patch token → ``[dx, dy, dw, dh, objectness]``.

    Attributes:
      depth: hidden layers (GELU, the token's width) before the output layer.
      detach: read the tokens without steering them: the box loss's gradient stops at the head,
        so every other metric of a recipe is what it was without the head.
    """

    depth: int = 2
    detach: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patch_tokens: jax.Array) -> jax.Array:
        """``patch_tokens [B, h, w, W]`` → raw outputs ``[B, h, w, 5]`` (float32)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jax.lax.stop_gradient(patch_tokens) if self.detach else patch_tokens
        x = layers.layer_norm("ln", eps=layers.CLIP_LN_EPS, **kw)(x)
        for i in range(self.depth):
            x = nn.Dense(
                x.shape[-1],
                kernel_init=layers.logical(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                name=f"hidden{i}",
                **kw,
            )(x)
            x = nn.gelu(x)
        # Zero at the start: every cell proposes itself, with objectness ½.
        out = nn.Dense(
            5,
            kernel_init=layers.logical(nn.initializers.zeros, ("mlp", None)),
            bias_init=layers.logical(nn.initializers.zeros, (None,)),
            name="out",
            **kw,
        )(x)
        return out.astype(jnp.float32)


def cell_centres(grid_h: int, grid_w: int) -> jax.Array:
    """``[h, w, 2]`` normalised (x, y) centres of the patch cells."""
    ys = (jnp.arange(grid_h, dtype=jnp.float32) + 0.5) / grid_h
    xs = (jnp.arange(grid_w, dtype=jnp.float32) + 0.5) / grid_w
    y, x = jnp.meshgrid(ys, xs, indexing="ij")
    return jnp.stack([x, y], -1)


def decode(raw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``raw [B, h, w, 5]`` (:class:`BoxHead`) → ``boxes [B, h·w, 4]`` normalised xyxy (not
    clipped) and ``objectness [B, h·w]`` logits, row-major over the cells."""
    batch, grid_h, grid_w, _ = raw.shape
    cell = jnp.array([1.0 / grid_w, 1.0 / grid_h], jnp.float32)
    # The exponent is bounded so a diverging output cannot overflow (e^4 cells covers any box).
    centre = cell_centres(grid_h, grid_w) + raw[..., :2] * cell
    size = jnp.exp(jnp.clip(raw[..., 2:4], -6.0, 4.0)) * cell
    boxes = jnp.concatenate([centre - size / 2, centre + size / 2], -1)
    return boxes.reshape(batch, grid_h * grid_w, 4), raw[..., 4].reshape(batch, grid_h * grid_w)


def assign(
    boxes: jax.Array, finding: jax.Array, grid_h: int, grid_w: int
) -> tuple[jax.Array, jax.Array]:
    """FCOS's assignment of finding boxes to patch cells.

    A cell is assigned the smallest finding box that holds its centre; a box smaller than a
    cell that holds no centre gets the cell its own centre falls in (a nodule covers a third
    of a 16-px patch), so every finding has a cell.

    Args:
      boxes: ``[B, R, 4]`` normalised xyxy.
      finding: ``[B, R]`` bool, the boxes that are findings (not padding, not a clear region).

    Returns:
      ``targets [B, h·w, 4]`` each cell's box (zeros where none) and ``positive [B, h·w]``.
    """
    centres = cell_centres(grid_h, grid_w).reshape(-1, 2)  # [K, 2]
    boxes = jnp.asarray(boxes, jnp.float32)
    low, high = boxes[:, None, :, :2], boxes[:, None, :, 2:]  # [B, 1, R, 2]
    point = centres[None, :, None, :]  # [1, K, 1, 2]
    holds = jnp.all((point >= low) & (point <= high), -1)  # [B, K, R]
    mid = (boxes[..., :2] + boxes[..., 2:]) / 2
    col = jnp.clip(jnp.floor(mid[..., 0] * grid_w), 0, grid_w - 1)
    row = jnp.clip(jnp.floor(mid[..., 1] * grid_h), 0, grid_h - 1)
    own = (row * grid_w + col).astype(jnp.int32)  # [B, R]
    holds |= jnp.arange(grid_h * grid_w)[None, :, None] == own[:, None, :]
    holds &= jnp.asarray(finding, bool)[:, None, :]
    area = jnp.prod(jnp.clip(boxes[..., 2:] - boxes[..., :2], 0.0, None), -1)  # [B, R]
    cost = jnp.where(holds, area[:, None, :], jnp.inf)
    pick = jnp.argmin(cost, -1)  # [B, K]
    positive = jnp.any(holds, -1)
    targets = jnp.take_along_axis(boxes, pick[..., None], axis=1)
    return jnp.where(positive[..., None], targets, 0.0), positive
