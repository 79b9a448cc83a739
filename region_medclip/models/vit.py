"""Vision Transformer image tower (CLIP layout) returning pooled embedding and patch tokens."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from region_medclip.models import layers

Dtype = Any

# name → (width, depth, mlp_dim, heads); the patch size comes from the "/16" suffix.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 256, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}


def decode_variant(variant: str) -> dict[str, int]:
    """``"B/16"`` → ``dict(width=768, depth=12, mlp_dim=3072, heads=12, patch=16)``."""
    try:
        name, patch = variant.split("/")
        width, depth, mlp_dim, heads = VARIANTS[name]
        return dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads, patch=int(patch))
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"unknown ViT variant {variant!r}; expected NAME/PATCH with NAME in {sorted(VARIANTS)}"
        ) from err


class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP): one learned probe attends over the tokens."""

    heads: int
    mlp_dim: int
    act: str = "gelu"
    ln_eps: float = layers.CLIP_LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, L, W] → [B, W]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = tokens.shape[-1]
        probe = self.param(
            "probe",
            layers.logical(nn.initializers.xavier_uniform(), (None, None, "embed")),
            (1, 1, width),
            self.param_dtype,
        )
        probe = jnp.broadcast_to(probe.astype(tokens.dtype), (tokens.shape[0], 1, width))
        x = layers.Attention(self.heads, implementation=self.attention, name="attn", **kw)(
            probe, tokens
        )
        y = layers.layer_norm("ln", eps=self.ln_eps, **kw)(x)
        x = x + layers.Mlp(self.mlp_dim, act=self.act, name="mlp", **kw)(y)
        return x[:, 0]


def space_to_depth(x: jax.Array, k: int) -> jax.Array:
    """``[B, H, W, C]`` → ``[B, H/k, W/k, k·k·C]``: each k×k cell's pixels, row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // k, w // k, k * k * c)


class HMLPStem(nn.Module):
    """Hierarchical MLP patch embedding (Touvron et al. 2022, "Three things everyone should know
    about vision transformers"): 4×4 pixel cells → ``width/4``, then 2×2 groups of those →
    ``width/2`` → ``width`` (for patch 16), with GELU between. Cells never mix across patch
    borders, so a token still sees only its own patch, but through a nonlinear map: CLIP's
    linear projection of a 16×16 patch must learn a small bright blob separately at every
    position inside it, where the 4×4 stage detects it wherever it falls.
    """

    width: int
    patch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """``images [B, H, W, C]`` → ``[B, H / patch, W / patch, width]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stages = (self.patch // 4).bit_length() - 1
        if self.patch < 4 or 4 << stages != self.patch or self.width % (1 << (stages + 1)):
            raise ValueError(
                f"stem='hmlp' needs a patch of 4·2^k and a width divisible by 2^(k+1), "
                f"got patch {self.patch}, width {self.width}"
            )
        x = nn.Dense(self.width >> (stages + 1), use_bias=False, name="cell", **kw)(
            space_to_depth(images, 4)
        )
        for i in range(stages):
            # The tanh form of GELU: the exact (erf) one cost as much as all these matmuls.
            x = nn.gelu(x, approximate=True)
            x = nn.Dense(self.width >> (stages - 1 - i), use_bias=False, name=f"merge{i}", **kw)(
                space_to_depth(x, 2)
            )
        return nn.Dense(
            self.width,
            kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, "embed")),
            name="proj",
            **kw,
        )(nn.gelu(x, approximate=True))


class ViT(nn.Module):
    """ViT image tower.

    Patch embedding (conv without bias), optional class token, learned positional embedding,
    ``ln_pre``, pre-LN blocks, ``ln_post`` and a bias-free projection ``W_i [width, embed_dim]``.
    ``patch_bias=True, ln_pre=False, ln_eps=1e-6`` is timm's ViT (BiomedCLIP's image tower).

    Attributes:
      embed_dim: joint embedding size D.
      pool: ``cls`` (class token), ``gap`` (mean of patch tokens) or ``map`` (attention pooling).
      class_token: whether to prepend a class token (required for ``pool="cls"``).
      patch_bias: a bias in the patch embedding (timm has one, CLIP does not).
      ln_pre: the LayerNorm after the positional embedding (CLIP has one, timm does not).
      stem: ``patch`` (CLIP's linear patch projection) or ``hmlp`` (:class:`HMLPStem`; in no
        CLIP or timm checkpoint).
    """

    width: int
    depth: int
    mlp_dim: int
    heads: int
    patch: int
    embed_dim: int
    pool: str = "cls"
    class_token: bool = True
    patch_bias: bool = False
    ln_pre: bool = True
    stem: str = "patch"
    act: str = "gelu"
    ln_eps: float = layers.CLIP_LN_EPS
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes images.

        Args:
          images: ``[B, H, W, C]`` float, already normalised; H and W divisible by ``patch``.

        Returns:
          ``pooled [B, embed_dim]`` (unnormalised) and ``patch_tokens [B, h, w, width]``
          (final-block tokens before ``ln_post``, class token removed).
        """
        self._check(images)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _patch_tokens(self, images.astype(self.dtype), kw)
        batch, grid_h, grid_w = x.shape[:3]
        x = x.reshape(batch, grid_h * grid_w, self.width)
        x, num_prefix = _prefix_and_positions(self, x)
        if self.ln_pre:
            x = layers.layer_norm("ln_pre", eps=self.ln_eps, **kw)(x)
        x = layers.PreLNEncoder(
            depth=self.depth,
            heads=self.heads,
            mlp_dim=self.mlp_dim,
            act=self.act,
            ln_eps=self.ln_eps,
            remat=self.remat,
            attention=self.attention,
            name="encoder",
            **kw,
        )(x)
        patch_tokens = x[:, num_prefix:].reshape(batch, grid_h, grid_w, self.width)
        x = layers.layer_norm("ln_post", eps=self.ln_eps, **kw)(x)
        pooled = _pool(self, x, num_prefix, kw)
        return layers.projection(self.embed_dim, "proj", **kw)(pooled), patch_tokens

    def _check(self, images: jax.Array) -> None:
        if self.pool not in ("cls", "gap", "map"):
            raise ValueError(f"unknown pool {self.pool!r}; choose cls, gap or map")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True")
        height, width_px = images.shape[1:3]
        if height % self.patch or width_px % self.patch:
            raise ValueError(f"image {height}x{width_px} is not divisible by patch {self.patch}")
        if self.stem not in ("patch", "hmlp"):
            raise ValueError(f"unknown stem {self.stem!r}; choose patch or hmlp")


# The parts of ViT.__call__, as functions of the module: their submodules and params are the
# module's own (created inside its compact call), named as before.


def _patch_tokens(vit: ViT, images: jax.Array, kw) -> jax.Array:
    """``[B, H, W, C] → [B, h, w, width]`` through the stem (linear patches or the hMLP)."""
    if vit.stem == "hmlp":
        return HMLPStem(vit.width, vit.patch, name="stem", **kw)(images)
    return nn.Conv(
        vit.width,
        (vit.patch, vit.patch),
        strides=(vit.patch, vit.patch),
        padding="VALID",
        use_bias=vit.patch_bias,
        kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        name="patch_embed",
        **kw,
    )(images)


def _prefix_and_positions(vit: ViT, x: jax.Array) -> tuple[jax.Array, int]:
    """``[B, N, width]`` → the class token prepended (if any) and the learned positions added;
    returns the tokens and the number of prefix tokens."""
    batch = x.shape[0]
    num_prefix = 0
    if vit.class_token:
        cls = vit.param(
            "class_embedding",
            layers.logical(nn.initializers.normal(vit.width**-0.5), ("embed",)),
            (vit.width,),
            vit.param_dtype,
        )
        cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, vit.width))
        x = jnp.concatenate([cls, x], axis=1)
        num_prefix = 1
    pos = vit.param(
        "pos_embedding",
        layers.logical(nn.initializers.normal(vit.width**-0.5), (None, "embed")),
        (x.shape[1], vit.width),
        vit.param_dtype,
    )
    return x + pos.astype(x.dtype)[None], num_prefix


def _pool(vit: ViT, x: jax.Array, num_prefix: int, kw) -> jax.Array:
    """``[B, N, width]`` → ``[B, width]``: class token, mean of patch tokens, or MAP head."""
    if vit.pool == "cls":
        return x[:, 0]
    if vit.pool == "gap":
        return x[:, num_prefix:].mean(axis=1)
    return MAPHead(
        heads=vit.heads,
        mlp_dim=vit.mlp_dim,
        act=vit.act,
        ln_eps=vit.ln_eps,
        attention=vit.attention,
        name="map_head",
        **kw,
    )(x[:, num_prefix:])


def vit_from_variant(variant: str, **kwargs) -> ViT:
    """Builds a :class:`ViT` from a variant string such as ``"B/16"`` plus overrides."""
    return ViT(**{**decode_variant(variant), **kwargs})


ViT_Ti16 = functools.partial(ViT, **decode_variant("Ti/16"))
ViT_Ti32 = functools.partial(ViT, **decode_variant("Ti/32"))
ViT_S16 = functools.partial(ViT, **decode_variant("S/16"))
ViT_S32 = functools.partial(ViT, **decode_variant("S/32"))
ViT_B16 = functools.partial(ViT, **decode_variant("B/16"))
ViT_B32 = functools.partial(ViT, **decode_variant("B/32"))
ViT_L16 = functools.partial(ViT, **decode_variant("L/16"))
ViT_L32 = functools.partial(ViT, **decode_variant("L/32"))
