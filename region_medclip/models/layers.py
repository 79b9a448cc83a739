"""Transformer building blocks shared by the towers.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ``joint``)
and activations are constrained with ``("batch", "length", "embed")``; ``sharding.py`` maps those
names to mesh axes with one rules table. Outside a mesh the annotations are no-ops.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from region_medclip import sharding

Dtype = Any

# open_clip / OpenAI CLIP use torch's LayerNorm default; BERT overrides it with 1e-12.
CLIP_LN_EPS = 1e-5


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    """GELU with the erf form, as torch ``nn.GELU()`` and HF BERT compute it."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": exact_gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Looks up an activation by name (``gelu`` | ``gelu_tanh`` | ``quick_gelu``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def logical(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """Wraps an initializer so the parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation under the rules table of
    :mod:`region_medclip.sharding` (a no-op outside a mesh, e.g. applied outside the step)."""
    return sharding.constrain(x, names)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections and biases.

    Attributes:
      heads: number of heads; the width must divide by it.
      implementation: ``xla``, or ``cudnn`` for cuDNN's fused (flash) attention on an NVIDIA
        GPU, which takes bfloat16 or float16 compute and head sizes that are multiples of 8.
    """

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(
        self,
        queries: jax.Array,
        inputs: jax.Array,
        *,
        mask: jax.Array | None = None,
        is_causal: bool = False,
    ) -> jax.Array:
        """Attends ``queries [B, T, W]`` to ``inputs [B, S, W]``.

        ``mask`` is boolean, broadcastable to ``[B, heads, T, S]``, True where attention is allowed.
        Returns ``[B, T, W]``.
        """
        width = queries.shape[-1]
        if width % self.heads:
            raise ValueError(f"width {width} is not divisible by heads {self.heads}")
        head_dim = width // self.heads

        def dense(name, x):
            return nn.DenseGeneral(
                (self.heads, head_dim),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
                bias_init=logical(nn.initializers.zeros, ("heads", "kv")),
                name=name,
            )(x)

        q, k, v = dense("query", queries), dense("key", inputs), dense("value", inputs)
        # JAX picks XLA's implementation unless told otherwise, on every backend; masks and
        # causality go through the op's own arguments, so that the fused kernel can take them.
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, implementation=self.implementation
        )
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out)


class Mlp(nn.Module):
    """Two-layer MLP ``width → mlp_dim → width``."""

    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., W] → [..., W]``."""
        width = x.shape[-1]
        x = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=logical(nn.initializers.normal(1e-6), ("mlp",)),
            name="fc1",
        )(x)
        x = activation(self.act)(x)
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=logical(nn.initializers.normal(1e-6), ("embed",)),
            name="fc2",
        )(x)


def layer_norm(name: str, *, eps: float, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm with logically-named scale and bias."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class PreLNBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    heads: int
    mlp_dim: int
    act: str = "gelu"
    ln_eps: float = CLIP_LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False
    ) -> jax.Array:
        """``x [B, L, W] → [B, L, W]``; ``mask`` as in :class:`Attention`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, ("batch", "length", "embed"))
        y = layer_norm("ln_1", eps=self.ln_eps, **kw)(x)
        y = Attention(self.heads, implementation=self.attention, name="attn", **kw)(
            y, y, mask=mask, is_causal=is_causal
        )
        x = x + y
        y = layer_norm("ln_2", eps=self.ln_eps, **kw)(x)
        y = Mlp(self.mlp_dim, act=self.act, name="mlp", **kw)(y)
        return x + y


class PreLNEncoder(nn.Module):
    """A stack of :class:`PreLNBlock` (optionally rematerialised)."""

    depth: int
    heads: int
    mlp_dim: int
    act: str = "gelu"
    ln_eps: float = CLIP_LN_EPS
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False
    ) -> jax.Array:
        """``x [B, L, W] → [B, L, W]`` (no final norm: each tower applies its own)."""
        # is_causal is a Python bool and must stay static under remat.
        block_cls = nn.remat(PreLNBlock, static_argnums=(3,)) if self.remat else PreLNBlock
        for i in range(self.depth):
            x = block_cls(
                heads=self.heads,
                mlp_dim=self.mlp_dim,
                act=self.act,
                ln_eps=self.ln_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention=self.attention,
                name=f"block{i}",
            )(x, mask, is_causal)
        return x


def projection(features: int, name: str, *, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    """Bias-free linear projection into the joint embedding space (CLIP's ``W_i``/``W_t``)."""
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "joint")),
        name=name,
    )
