"""Region tower: RoIAlign over the patch-token grid → pool → LayerNorm → projection ``W_r``."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from region_medclip.models import layers
from region_medclip.models.roi_align import roi_align

Dtype = Any

# Padded boxes are replaced by the whole image before pooling, so they never feed degenerate
# geometry through RoIAlign; their embeddings are zeroed afterwards.
_FULL_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)


def patch_boxes(grid: int) -> np.ndarray:
    """``[grid², 4]`` normalised xyxy boxes of a ``grid × grid`` tiling, row-major.

    Each cell embedded as a box gives patch-level embeddings of the same kind as the regions'
    (grounding heatmaps, GLoRIA's local loss).
    """
    edges = np.linspace(0.0, 1.0, grid + 1)
    y0, x0 = np.meshgrid(edges[:-1], edges[:-1], indexing="ij")
    y1, x1 = np.meshgrid(edges[1:], edges[1:], indexing="ij")
    return np.stack([x0, y0, x1, y1], -1).reshape(-1, 4).astype(np.float32)


class RegionHead(nn.Module):
    """Embeds boxes from ViT patch tokens.

    Attributes:
      embed_dim: joint embedding size D.
      roi_size: bins per axis of RoIAlign.
      sampling_ratio: bilinear samples per bin axis.
      pool: ``mean`` over the bins, or ``attn`` (one learned query attending over the bins).
      proj: ``own`` (a separate ``W_r``) or ``shared`` (reuse the image tower's ``W_i``, which
        the caller passes as ``shared_kernel``; RegionCLIP-style, regions live in the same space).
    """

    embed_dim: int
    roi_size: int = 4
    sampling_ratio: int = 2
    pool: str = "mean"
    proj: str = "own"
    heads: int = 8
    ln_eps: float = layers.CLIP_LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(
        self,
        patch_tokens: jax.Array,
        boxes: jax.Array,
        roi_mask: jax.Array | None = None,
        shared_kernel: jax.Array | None = None,
    ) -> jax.Array:
        """Embeds regions.

        Args:
          patch_tokens: ``[B, h, w, W]`` final-block ViT tokens.
          boxes: ``[B, R, 4]`` normalised ``xyxy`` in the processed image (0..1).
          roi_mask: ``[B, R]`` bool, True for real boxes; padded ones get zero embeddings.
          shared_kernel: ``[W, D]`` projection to use when ``proj == "shared"``.

        Returns:
          ``[B, R, D]`` unnormalised region embeddings.
        """
        if self.pool not in ("mean", "attn"):
            raise ValueError(f"unknown region pool {self.pool!r}; choose mean or attn")
        if self.proj not in ("own", "shared"):
            raise ValueError(f"unknown region proj {self.proj!r}; choose own or shared")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, grid_h, grid_w, width = patch_tokens.shape
        num_rois = boxes.shape[1]
        if roi_mask is None:
            roi_mask = jnp.ones((batch, num_rois), bool)
        roi_mask = roi_mask.astype(bool)
        boxes = jnp.where(roi_mask[..., None], boxes.astype(jnp.float32), _FULL_BOX)
        # Normalised → feature-map cells; identical to pixel boxes with spatial_scale = 1/patch.
        boxes = boxes * jnp.array([grid_w, grid_h, grid_w, grid_h], jnp.float32)
        bins = roi_align(
            patch_tokens,
            boxes,
            output_size=self.roi_size,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
        ).reshape(batch, num_rois, self.roi_size**2, width)

        if self.pool == "mean":
            pooled = bins.mean(axis=2)
        else:
            query = self.param(
                "query",
                layers.logical(nn.initializers.normal(width**-0.5), (None, None, "embed")),
                (1, 1, width),
                self.param_dtype,
            )
            flat = bins.reshape(batch * num_rois, self.roi_size**2, width)
            query = jnp.broadcast_to(query.astype(flat.dtype), (flat.shape[0], 1, width))
            pooled = layers.Attention(
                self.heads, implementation=self.attention, name="attn_pool", **kw
            )(query, flat)
            pooled = pooled.reshape(batch, num_rois, width)
        pooled = layers.layer_norm("ln", eps=self.ln_eps, **kw)(pooled)
        if self.proj == "shared":
            if shared_kernel is None:
                raise ValueError("proj='shared' needs the image projection as shared_kernel")
            z = jnp.einsum("brw,wd->brd", pooled, shared_kernel.astype(pooled.dtype))
        else:
            z = layers.projection(self.embed_dim, "proj", **kw)(pooled)
        return jnp.where(roi_mask[..., None], z, 0)
