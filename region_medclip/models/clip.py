"""The composite model: image, text and region towers with the learned temperature and bias."""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from region_medclip.config import ConfigError
from region_medclip.config.validate import check_type
from region_medclip.models import boxes as boxes_lib
from region_medclip.models import layers
from region_medclip.models import region as region_lib
from region_medclip.models import text as text_lib
from region_medclip.models import vit as vit_lib


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """L2-normalises in float32; an all-zero vector (a padded ROI) stays zero, with finite grads."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


class RegionCLIP(nn.Module):
    """CLIP-style two towers plus a region tower on the image tower's patch tokens.

    The tower configs are plain mappings so that ``config.model`` goes straight in:

    - ``image``: ``variant`` (e.g. ``"B/16"``) plus :class:`~region_medclip.models.vit.ViT` fields
      (``pool``, ``class_token``, ``act``, ...).
    - ``text``: ``kind`` (``clip`` | ``bert``), ``variant`` plus the tower's fields
      (``vocab_size``, ``context_len``, ``eot``, ``pool``, ...).
    - ``region``: :class:`~region_medclip.models.region.RegionHead` fields.
    - ``box_head``: ``enabled`` plus :class:`~region_medclip.models.boxes.BoxHead` fields; None
      or not enabled: no box head.

    Attributes:
      embed_dim: joint embedding size D.
      logit_scale_init: initial ``t'`` (the temperature is ``exp(t')``): ``log(1/0.07)`` for the
        softmax loss, ``log(10)`` for the sigmoid loss.
      logit_bias_init: initial sigmoid bias ``b``.
      dtype, param_dtype: compute and parameter dtypes (names or dtypes).
      remat: rematerialise transformer blocks in the backward pass.
      attention: ``xla``, or ``cudnn`` for cuDNN's fused attention in every tower (an NVIDIA
        GPU with bfloat16 or float16 compute).
    """

    image: Mapping[str, Any]
    text: Mapping[str, Any]
    region: Mapping[str, Any]
    box_head: Mapping[str, Any] | None = None
    embed_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float = -10.0
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: bool = False
    attention: str = "xla"

    def setup(self):
        kw = dict(
            embed_dim=self.embed_dim,
            dtype=jnp.dtype(self.dtype),
            param_dtype=jnp.dtype(self.param_dtype),
            attention=self.attention,
        )
        image = dict(self.image)
        self.image_tower = vit_lib.vit_from_variant(
            image.pop("variant"), remat=self.remat, **image, **kw
        )
        text = dict(self.text)
        self.text_tower = text_lib.text_tower(
            text.pop("kind"), text.pop("variant"), remat=self.remat, **text, **kw
        )
        self.region_tower = region_lib.RegionHead(**dict(self.region), **kw)
        if self.has_box_head:
            fields = {k: v for k, v in dict(self.box_head).items() if k != "enabled"}
            self.box_tower = boxes_lib.BoxHead(
                **fields, dtype=kw["dtype"], param_dtype=kw["param_dtype"]
            )
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32
        )
        self.logit_bias = self.param(
            "logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32
        )

    @property
    def has_box_head(self) -> bool:
        """Whether ``box_head`` is configured and enabled."""
        return bool(self.box_head) and bool(dict(self.box_head).get("enabled", False))

    def propose_boxes(self, patch_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``patch_tokens [B, h, w, width]`` → the box head's ``boxes [B, h·w, 4]`` (normalised
        xyxy, unclipped) and ``objectness [B, h·w]`` logits (:mod:`.boxes`)."""
        if not self.has_box_head:
            raise ValueError("this model has no box head (config.model.box_head.enabled)")
        return boxes_lib.decode(self.box_tower(patch_tokens))

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``images [B, H, W, C]`` → ``zimg [B, D]`` (L2-normalised, float32) and
        ``patch_tokens [B, h, w, width]``."""
        pooled, patch_tokens = self.image_tower(images)
        return l2_normalize(pooled), patch_tokens

    def encode_text(self, tokens: jax.Array, context=None) -> jax.Array:
        """``tokens [..., L]`` int → ``ztxt [..., D]`` (L2-normalised, float32). ``context``:
        ``(mask [..., L] bool, values [..., L, width])`` token embeddings to put in place of
        the masked tokens' (CoOp's learned context); None: none."""
        lead, length = tokens.shape[:-1], tokens.shape[-1]
        if context is not None:
            mask, values = context
            context = (mask.reshape(-1, length), values.reshape(-1, length, values.shape[-1]))
        pooled, _ = self.text_tower(tokens.reshape(-1, length), context=context)
        return l2_normalize(pooled).reshape(*lead, -1)

    def encode_words(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, L]`` → ``zwords [B, L, D]``: each token's final state through the text
        tower's own projection, L2-normalised (GLoRIA's word features, in the joint space the
        pooled report lives in). Padding positions hold the projection of padding states: the
        caller masks them."""
        _, states = self.text_tower(tokens)
        params = self.text_tower.variables["params"]
        x = states
        if "proj_hidden" in params:  # BERT's MLP projection (BiomedCLIP)
            kernel = nn.meta.unbox(params["proj_hidden"]["kernel"])
            x = layers.activation("gelu")(x @ kernel.astype(x.dtype))
        x = x @ nn.meta.unbox(params["proj"]["kernel"]).astype(x.dtype)
        return l2_normalize(x)

    def encode_regions(
        self, patch_tokens: jax.Array, boxes: jax.Array, roi_mask: jax.Array | None = None
    ) -> jax.Array:
        """``patch_tokens [B, h, w, width]``, ``boxes [B, R, 4]`` normalised xyxy,
        ``roi_mask [B, R]`` → ``zroi [B, R, D]`` (L2-normalised; padded ROIs are zero)."""
        shared = None
        if self.region_tower.proj == "shared":
            shared = nn.meta.unbox(self.image_tower.variables["params"]["proj"]["kernel"])
        return l2_normalize(self.region_tower(patch_tokens, boxes, roi_mask, shared))

    def __call__(
        self,
        images: jax.Array,
        texts: jax.Array,
        boxes: jax.Array,
        roi_mask: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Runs the three towers.

        Args:
          images: ``[B, H, W, C]`` preprocessed images.
          texts: ``[B, L]`` report token ids (any leading shape works for ``encode_text``).
          boxes: ``[B, R, 4]`` normalised ``xyxy`` boxes.
          roi_mask: ``[B, R]`` bool.

        Returns:
          dict with ``zimg [B, D]``, ``ztxt [B, D]``, ``zroi [B, R, D]``, ``logit_scale`` (the
          parameter ``t'``; the temperature is ``exp(t')``), ``logit_bias`` and
          ``patch_tokens [B, h, w, width]``; with a box head also ``proposals [B, h·w, 4]``
          and ``objectness [B, h·w]`` (:meth:`propose_boxes`).
        """
        zimg, patch_tokens = self.encode_image(images)
        out = dict(
            zimg=zimg,
            ztxt=self.encode_text(texts),
            zroi=self.encode_regions(patch_tokens, boxes, roi_mask),
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
            patch_tokens=patch_tokens,
        )
        if self.has_box_head:
            out["proposals"], out["objectness"] = self.propose_boxes(patch_tokens)
        return out


def example_inputs(data_config, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract model inputs at ``config.data``'s sizes: ``images [B, S, S, 3]``, ``texts [B, L]``,
    ``boxes [B, R, 4]``, ``roi_mask [B, R]`` as ``jax.ShapeDtypeStruct``."""
    size, rois = data_config.image_size, data_config.max_rois
    return dict(
        images=jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
        texts=jax.ShapeDtypeStruct((batch_size, data_config.text_len), jnp.int32),
        boxes=jax.ShapeDtypeStruct((batch_size, rois, 4), jnp.float32),
        roi_mask=jax.ShapeDtypeStruct((batch_size, rois), jnp.bool_),
    )


def from_config(model_config: Mapping[str, Any]) -> RegionCLIP:
    """Builds :class:`RegionCLIP` from ``config.model`` (keys that are not module fields, such as
    ``init_from``, are ignored here and handled by the trainer)."""
    fields = {
        "image",
        "text",
        "region",
        "box_head",
        "embed_dim",
        "logit_scale_init",
        "logit_bias_init",
        "dtype",
        "param_dtype",
        "remat",
        "attention",
    }
    check_towers(model_config)
    kwargs = {k: v for k, v in dict(model_config).items() if k in fields}
    for tower in ("image", "text", "region"):
        kwargs[tower] = dict(kwargs[tower])
    if kwargs.get("box_head") is not None:
        kwargs["box_head"] = dict(kwargs["box_head"])
    return RegionCLIP(**kwargs)


# Fields the composite supplies to every tower from the model section itself.
_OWNED_FIELDS = {"embed_dim", "dtype", "param_dtype", "remat", "attention", "parent", "name"}


def _tower_module(name: str, tower: Mapping[str, Any]) -> tuple[type, set[str]]:
    """The module class that ``config.model.<name>`` goes into, and its extra keys."""
    if name == "image":
        return vit_lib.ViT, {"variant"}
    if name == "text":
        kind = tower.get("kind")
        if kind not in ("clip", "bert"):
            raise ConfigError(f"config.model.text.kind: {kind!r} is not one of ['clip', 'bert']")
        return (text_lib.CLIPText if kind == "clip" else text_lib.BertText), {"kind", "variant"}
    if name == "box_head":
        return boxes_lib.BoxHead, {"enabled"}
    return region_lib.RegionHead, set()


def check_towers(model_config: Mapping[str, Any]) -> None:
    """Checks the keys of ``config.model.{image,text,region,box_head}`` against the fields of
    the modules they go into, so that a misspelt field fails before anything is built, naming
    the key.

    Raises:
      ConfigError: ``config.model.image.depht: unknown key; known here: [...]``.
    """
    for name in ("image", "text", "region", "box_head"):
        path = f"model.{name}"
        if model_config.get(name) is None:
            if name == "box_head":  # optional: configs saved before it existed have none
                continue
            raise ConfigError(f"config.{path}: missing")
        tower = dict(model_config[name])
        module, extra = _tower_module(name, tower)
        fields = {f.name: f.type for f in dataclasses.fields(module)}
        allowed = set(fields) - _OWNED_FIELDS | extra
        for key, value in tower.items():
            if key not in allowed:
                raise ConfigError(
                    f"config.{path}.{key}: unknown key; known here: {sorted(allowed)}"
                )
            if fields.get(key) in (int, float, str, bool):
                check_type(f"{path}.{key}", value, fields[key]())
        if "variant" in extra and "variant" not in tower:
            raise ConfigError(f"config.{path}.variant: missing")
