"""GLoRIA's local (word–patch) loss: each report word attends over an image's patches.

Equation: docs/design.md §4.6 (Huang et al., ICCV 2021, §3.3; their code's `local_loss`).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from region_medclip.losses.collectives import (
    Metrics,
    diagonal_mask,
    gather_rows,
    global_sum,
    masked_logsumexp,
    masked_rows,
    row_offset,
    top1_hits,
)

# Squared-norm floor of an attention context before it is normalised: a context of patches that
# cancel out would otherwise divide by zero (and give a NaN gradient).
_EPS = 1e-12


def local_similarity(*, zpatch, zwords, word_mask, temperature1, temperature2) -> jax.Array:
    """GLoRIA's local image–report similarity Z of every image with every report.

    Z_kl = log Σ_i exp(τ2 · cos(w_li, c_kli)) over the valid words i of report l, where
    c_kli = Σ_j a_klij v_kj and a_klij = softmax_j(τ1 · w_li·v_kj): word i of report l attends
    over the patches j of image k.

    Args:
      zpatch: [m, P, D] L2-normalised patch embeddings v of m images.
      zwords: [n, L, D] L2-normalised word embeddings w of n reports.
      word_mask: [n, L] bool, True for the words that count (padding and special tokens False).
      temperature1: τ1, the sharpness of each word's attention over the patches.
      temperature2: τ2, how much the best-matching words dominate the sum over words.

    Returns:
      [m, n] float32 Z (image k, report l). A report without any valid word scores log L against
      every image: finite, and none of its words gets a gradient.
    """
    zpatch = jnp.asarray(zpatch, jnp.float32)
    zwords = masked_rows(zwords, jnp.asarray(word_mask, bool))
    # a_klij: each word of report l attends over the patches of image k. One softmax, as in the
    # paper: GLoRIA's code first normalises over the report's words (AttnGAN), which on unit
    # vectors leaves an attention close to uniform (docs/design.md §4.6).
    dots = jnp.einsum("nld,mpd->mnlp", zwords, zpatch)
    attention = jax.nn.softmax(temperature1 * dots, axis=-1)
    context = jnp.einsum("mnlp,mpd->mnld", attention, zpatch)  # c_kli: [m, n, L, D]
    # R(c, w) = cos(c, w). w is a unit vector (zero where masked), c a convex combination of unit
    # vectors, so only c needs normalising.
    inverse_norm = lax.rsqrt(jnp.maximum(jnp.sum(context * context, axis=-1), _EPS))
    relevance = jnp.sum(context * zwords[None], axis=-1) * inverse_norm  # [m, n, L]
    valid = jnp.broadcast_to(jnp.asarray(word_mask, bool)[None], relevance.shape)
    # No 1/τ2 exponent outside the log, as in GLoRIA's code (the paper's has one; τ3 absorbs it).
    return masked_logsumexp(temperature2 * relevance, valid)


def gloria_local_loss(
    *,
    zwords,
    word_mask,
    zpatch,
    temperature1=4.0,
    temperature2=5.0,
    temperature3=10.0,
    axis_name=None,
) -> tuple[jax.Array, Metrics]:
    """GLoRIA's local loss: symmetric cross-entropy over the batch of τ3 · Z (local_similarity).

    Image i and report i are the positive pair; every other report (image) of the global batch
    is a negative of image (report) i. Memory: [n, N, L, P] attention weights and [n, N, L, D]
    contexts a direction (N the global batch), not just [n, N] logits.

    Args:
      zwords: [n, L, D] L2-normalised word embeddings of the n reports (local shard when
        `axis_name` is set); masked slots may hold anything, NaN included.
      word_mask: [n, L] bool, True for the words that count.
      zpatch: [n, P, D] L2-normalised patch embeddings of the n images; row i pairs with report i.
      temperature1: τ1 of the word→patch attention (GLoRIA: 4).
      temperature2: τ2 of the aggregation over words (GLoRIA: 5).
      temperature3: τ3, the multiplier of Z in the cross-entropy (GLoRIA: 10).
      axis_name: None for the dense loss, else the mesh axis the batch is sharded over.

    Returns:
      loss: [] ½ (L_i→t + L_t→i), each a mean over the global batch.
      metrics: loss_i2t, loss_t2i, i2t_accuracy, t2i_accuracy (top-1 over the global batch),
        words (mean number of valid words a report).
    """
    word_mask = jnp.asarray(word_mask, bool)
    zwords = masked_rows(zwords, word_mask)
    zpatch = jnp.asarray(zpatch, jnp.float32)
    n = zpatch.shape[0]
    similarity = functools.partial(
        local_similarity, temperature1=temperature1, temperature2=temperature2
    )
    # Local images against every report of the global batch: [n, N].
    all_words, all_mask = gather_rows(zwords, axis_name), gather_rows(word_mask, axis_name)
    logits_i2t = temperature3 * similarity(zpatch=zpatch, zwords=all_words, word_mask=all_mask)
    # Local reports against every image: these rows are a column block of Z, whose images sit on
    # every device, so the patches are gathered too. The gradient of each all_gather (a
    # reduce-scatter) sends the column terms back to the devices that own those rows.
    if axis_name is None:
        logits_t2i = logits_i2t.T
    else:
        all_patches = gather_rows(zpatch, axis_name)
        logits_t2i = (
            temperature3 * similarity(zpatch=all_patches, zwords=zwords, word_mask=word_mask).T
        )
    num_global = all_words.shape[0]
    positive = diagonal_mask(n, num_global, row_offset(n, axis_name))

    def cross_entropy(logits):
        return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(positive, logits, 0), -1)

    loss_i2t = global_sum(cross_entropy(logits_i2t), axis_name) / num_global
    loss_t2i = global_sum(cross_entropy(logits_t2i), axis_name) / num_global
    loss = 0.5 * (loss_i2t + loss_t2i)
    metrics = dict(
        loss=loss,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        i2t_accuracy=global_sum(top1_hits(logits_i2t, positive), axis_name) / num_global,
        t2i_accuracy=global_sum(top1_hits(logits_t2i, positive), axis_name) / num_global,
        words=global_sum(word_mask.astype(jnp.float32), axis_name) / num_global,
    )
    return loss, metrics
