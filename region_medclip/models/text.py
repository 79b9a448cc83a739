"""Text towers: the CLIP causal transformer (EOT pooling) and a BERT encoder (cls or mean pool)."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from region_medclip.models import layers

Dtype = Any


def eot_positions(tokens: jax.Array, eot: str | int, pad_id: int = 0) -> jax.Array:
    """Index of the pooling token of each sequence.

    Args:
      tokens: ``[B, L]`` int token ids.
      eot: ``"argmax"`` — the highest id (CLIP BPE puts ``<end_of_text>`` last in its vocabulary) —
        or an int ``eos_token_id``, in which case the first occurrence is used; a sequence without
        one pools at its last non-padding token.
      pad_id: padding id, used only for the fallback.

    Returns:
      ``[B]`` int32 positions.
    """
    if eot == "argmax":
        return jnp.argmax(tokens, axis=-1).astype(jnp.int32)
    is_eot = tokens == eot
    length = tokens.shape[-1]
    last_real = length - 1 - jnp.argmax((tokens != pad_id)[:, ::-1], axis=-1)
    return jnp.where(is_eot.any(-1), jnp.argmax(is_eot, axis=-1), last_real).astype(jnp.int32)


def word_mask(tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """``tokens [B, L]`` → ``[B, L]`` bool: the words of each sequence, i.e. its non-padding
    tokens after the first (``<start_of_text>`` / ``[CLS]``) and before the last one
    (``<end_of_text>`` / ``[SEP]``), where every tokenizer of ``data/tokenizers.py`` puts them."""
    real = tokens != pad_id
    length = tokens.shape[-1]
    last_real = length - 1 - jnp.argmax(real[:, ::-1], axis=-1)
    position = jnp.arange(length)[None, :]
    return real & (position > 0) & (position < last_real[:, None])


def with_context(embeddings: jax.Array, context) -> jax.Array:
    """``embeddings [B, L, width]`` with the positions of ``context = (mask [B, L], values
    [B, L, width])`` replaced by its values (None: unchanged). Gradients reach ``values`` only
    where ``mask`` holds, and the token embeddings only elsewhere."""
    if context is None:
        return embeddings
    mask, values = context
    return jnp.where(mask[..., None], values.astype(embeddings.dtype), embeddings)


class CLIPText(nn.Module):
    """CLIP text transformer: token + positional embedding, causal pre-LN blocks, ``ln_final``,
    pooling at the EOT token and a bias-free projection ``W_t [width, embed_dim]``."""

    embed_dim: int
    vocab_size: int = 49408
    context_len: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    eot: str | int = "argmax"
    pad_id: int = 0
    act: str = "gelu"
    ln_eps: float = layers.CLIP_LN_EPS
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, tokens: jax.Array, context=None) -> tuple[jax.Array, jax.Array]:
        """Encodes token ids.

        Args:
          tokens: ``[B, L]`` int, ``L <= context_len``.
          context: ``(mask [B, L] bool, values [B, L, width])``: token embeddings replaced by
            ``values`` where ``mask`` (CoOp's learned context vectors); None: none.

        Returns:
          ``pooled [B, embed_dim]`` (unnormalised) and ``token_states [B, L, width]``
          (after ``ln_final``).
        """
        if tokens.shape[-1] > self.context_len:
            raise ValueError(f"text length {tokens.shape[-1]} > context_len {self.context_len}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=layers.logical(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embedding",
            **kw,
        )(tokens)
        x = with_context(x, context)
        pos = self.param(
            "pos_embedding",
            layers.logical(nn.initializers.normal(0.01), (None, "embed")),
            (self.context_len, self.width),
            self.param_dtype,
        )
        x = x + pos[: tokens.shape[-1]].astype(x.dtype)[None]
        # Causal attention alone: padding sits after EOT, so it can never reach the pooled token.
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
        )(x, None, True)
        x = layers.layer_norm("ln_final", eps=self.ln_eps, **kw)(x)
        pooled = x[jnp.arange(x.shape[0]), eot_positions(tokens, self.eot, self.pad_id)]
        pooled = layers.projection(self.embed_dim, "proj", **kw)(pooled)
        return pooled, x


class PostLNBlock(nn.Module):
    """BERT layer: ``ln(x + attn(x))`` then ``ln(x + mlp(x))``."""

    heads: int
    mlp_dim: int
    act: str = "gelu"
    ln_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``x [B, L, W]``, ``mask [B, 1, 1, L]`` bool (True = real token) → ``[B, L, W]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.constrain(x, ("batch", "length", "embed"))
        y = layers.Attention(self.heads, implementation=self.attention, name="attn", **kw)(
            x, x, mask=mask
        )
        x = layers.layer_norm("ln_attn", eps=self.ln_eps, **kw)(x + y)
        y = layers.Mlp(self.mlp_dim, act=self.act, name="mlp", **kw)(x)
        return layers.layer_norm("ln_mlp", eps=self.ln_eps, **kw)(x + y)


class BertText(nn.Module):
    """BERT encoder (post-LN; word + position + token-type embeddings; padding mask) with
    ``cls`` or ``mean`` pooling and a bias-free projection into the joint space, so that
    PubMedBERT / BioClinicalBERT / CXR-BERT checkpoints can serve as the text tower."""

    embed_dim: int
    vocab_size: int = 30522
    context_len: int = 512
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    type_vocab_size: int = 2
    pool: str = "cls"
    pad_id: int = 0
    act: str = "gelu"
    ln_eps: float = 1e-12
    # > 0: the projection is an MLP, Dense(proj_hidden) → GELU → Dense(embed_dim), both bias-free
    # (open_clip's hf_proj_type="mlp", BiomedCLIP's); 0: one bias-free Dense.
    proj_hidden: int = 0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        context=None,
    ) -> tuple[jax.Array, jax.Array]:
        """Encodes token ids.

        Args:
          tokens: ``[B, L]`` int; position 0 holds ``[CLS]``.
          attention_mask: ``[B, L]`` (1 = real token); defaults to ``tokens != pad_id``.
          token_type_ids: ``[B, L]`` int; defaults to zeros.
          context: ``(mask [B, L] bool, values [B, L, width])``: word embeddings replaced by
            ``values`` where ``mask`` (CoOp's learned context vectors); None: none.

        Returns:
          ``pooled [B, embed_dim]`` (unnormalised) and ``token_states [B, L, width]``.
        """
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"unknown BERT pool {self.pool!r}; choose cls or mean")
        if tokens.shape[-1] > self.context_len:
            raise ValueError(f"text length {tokens.shape[-1]} > context_len {self.context_len}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if attention_mask is None:
            attention_mask = tokens != self.pad_id
        attention_mask = attention_mask.astype(bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)

        x = _bert_embeddings(self, tokens, token_type_ids, kw, context)
        block_cls = nn.remat(PostLNBlock) if self.remat else PostLNBlock
        mask = attention_mask[:, None, None, :]
        for i in range(self.depth):
            x = block_cls(
                heads=self.heads,
                mlp_dim=self.mlp_dim,
                act=self.act,
                ln_eps=self.ln_eps,
                attention=self.attention,
                name=f"block{i}",
                **kw,
            )(x, mask)
        return _bert_pool(self, x, attention_mask, kw), x


def _bert_embeddings(bert: BertText, tokens, token_type_ids, kw, context=None) -> jax.Array:
    """Word + position + token-type embeddings, LayerNormed: ``[B, L] → [B, L, width]``
    (submodules of ``bert``, created inside its compact call)."""

    def embed(name, num, ids):
        return nn.Embed(
            num,
            bert.width,
            embedding_init=layers.logical(nn.initializers.normal(0.02), ("vocab", "embed")),
            name=name,
            **kw,
        )(ids)

    positions = jnp.arange(tokens.shape[-1])[None]
    x = with_context(embed("word_embeddings", bert.vocab_size, tokens), context)
    x = x + embed("position_embeddings", bert.context_len, positions)
    x = x + embed("token_type_embeddings", bert.type_vocab_size, token_type_ids)
    return layers.layer_norm("ln_embed", eps=bert.ln_eps, **kw)(x)


def _bert_pool(bert: BertText, x, attention_mask, kw) -> jax.Array:
    """``[B, L, width]`` token states → ``[B, embed_dim]``: the ``[CLS]`` state or the mean of
    the real tokens, through the (MLP) projection."""
    if bert.pool == "cls":
        pooled = x[:, 0]
    else:
        weights = attention_mask.astype(x.dtype)[..., None]
        # max(·, 1) keeps an all-padding row finite (it pools to zero).
        pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
    if bert.proj_hidden:
        pooled = layers.projection(bert.proj_hidden, "proj_hidden", **kw)(pooled)
        pooled = layers.activation("gelu")(pooled)
    return layers.projection(bert.embed_dim, "proj", **kw)(pooled)


# name → (width, depth, mlp_dim, heads) of the CLIP text transformer.
CLIP_TEXT_VARIANTS = {
    "mu": (64, 2, 256, 2),
    "Ti": (192, 4, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (512, 12, 2048, 8),
    "L": (768, 12, 3072, 12),
}

# name → (width, depth, mlp_dim, heads) of BERT-family encoders.
BERT_VARIANTS = {
    "mu": (64, 2, 256, 2),
    "mini": (384, 6, 1536, 12),  # all-MiniLM-L6
    "base": (768, 12, 3072, 12),  # BERT-base, PubMedBERT, BioClinicalBERT, CXR-BERT
}


def _sizes(table: dict, variant: str, kind: str) -> dict[str, int]:
    if variant not in table:
        raise ValueError(f"unknown {kind} text variant {variant!r}; choose one of {sorted(table)}")
    width, depth, mlp_dim, heads = table[variant]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads)


def text_tower(kind: str, variant: str, **kwargs) -> nn.Module:
    """Builds a text tower: ``kind`` is ``clip`` or ``bert``; ``variant`` a size name."""
    if kind == "clip":
        return CLIPText(**{**_sizes(CLIP_TEXT_VARIANTS, variant, "clip"), **kwargs})
    if kind == "bert":
        return BertText(**{**_sizes(BERT_VARIANTS, variant, "bert"), **kwargs})
    raise ValueError(f"unknown text tower kind {kind!r}; choose clip or bert")


CLIPText_B = functools.partial(CLIPText, **_sizes(CLIP_TEXT_VARIANTS, "B", "clip"))
CLIPText_L = functools.partial(CLIPText, **_sizes(CLIP_TEXT_VARIANTS, "L", "clip"))
BertBase = functools.partial(BertText, **_sizes(BERT_VARIANTS, "base", "bert"))
