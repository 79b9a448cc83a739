"""What the frozen distillation teacher computes (docs/design.md §3, §4.5): concept embeddings
from prompt-ensembled concept tokens, and region embeddings either through the region tower
(``head``) or from each box cropped out of the image and encoded as a whole image (``crops``, as
RegionCLIP's CLIP teacher does). Restoring the teacher and tokenizing its concepts is the
trainer's (``train/distillation.py``).
"""

import jax
import jax.numpy as jnp

from region_medclip.models import clip
from region_medclip.models.roi_align import roi_align

# Bilinear samples per crop pixel and axis: a box larger than the crop is averaged, not aliased.
CROP_SAMPLING_RATIO = 2


def concept_embeddings(model: clip.RegionCLIP, params, tokens: jax.Array) -> jax.Array:
    """``tokens [C, T, L]`` (concepts × prompt templates) → ``[C, D]`` prompt-ensembled,
    renormalised concept embeddings."""
    z = model.apply({"params": params}, tokens, method=clip.RegionCLIP.encode_text)
    return clip.l2_normalize(jnp.mean(z, axis=1))


def crop_regions(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Crops every box out of its image and resamples it to ``size × size`` (RoIAlign on the
    pixels, pixel-centre aligned, 2 × 2 bilinear samples per output pixel).

    Args:
      images: ``[B, H, W, C]``.
      boxes: ``[B, R, 4]`` normalised ``xyxy`` in the image.
      size: output side.

    Returns:
      ``[B, R, size, size, C]``.
    """
    _, height, width, _ = images.shape
    scale = jnp.array([width, height, width, height], jnp.float32)
    return roi_align(
        images,
        boxes.astype(jnp.float32) * scale,
        output_size=size,
        sampling_ratio=CROP_SAMPLING_RATIO,
        aligned=True,
    )


def encode_regions_from_head(module: clip.RegionCLIP, images, boxes, roi_mask) -> jax.Array:
    """``images [B, H, W, C]``, ``boxes [B, R, 4]``, ``roi_mask [B, R]`` → ``zroi [B, R, D]``
    through the model's region tower."""
    _, patch_tokens = module.encode_image(images)
    return module.encode_regions(patch_tokens, boxes, roi_mask)


def encode_regions_from_crops(
    module: clip.RegionCLIP, images, boxes, roi_mask, *, size: int
) -> jax.Array:
    """``images [B, H, W, C]``, ``boxes [B, R, 4]``, ``roi_mask [B, R]`` → ``zroi [B, R, D]``:
    each box cropped to ``size`` (the model's input side) and encoded as an image. Masked ROIs
    give zero rows."""
    batch, rois = boxes.shape[:2]
    crops = crop_regions(images, boxes, size)
    zimg, _ = module.encode_image(crops.reshape(batch * rois, *crops.shape[2:]))
    zroi = zimg.reshape(batch, rois, -1)
    return jnp.where(roi_mask[..., None] > 0, zroi, 0.0)
