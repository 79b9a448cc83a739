"""Pieces shared by the losses: global-batch collectives, masks and masked reductions.

Each takes the `axis_name` of the loss that calls it: None for the dense loss, in which case the
collective is the identity (or the plain local reduction); else the mesh axis the batch is
sharded over, inside `jax.shard_map`. Reductions marked "global" return the same value on every
device.
"""

import jax
import jax.numpy as jnp
from jax import lax

Metrics = dict[str, jax.Array]


def f32(*arrays):
    """The arrays as float32, in a tuple."""
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def gather_rows(x, axis_name):
    """[n, ...] local shard -> [N, ...] global batch, in device order; identity when dense."""
    if axis_name is None:
        return x
    return lax.all_gather(x, axis_name, axis=0, tiled=True)


def global_sum(x, axis_name):
    """Sum of `x` over the global batch; the psum makes it identical on every device."""
    total = jnp.sum(x)
    return total if axis_name is None else lax.psum(total, axis_name)


def global_mean(values, mask, axis_name):
    """Mean of `values` over the True entries of `mask` in the global batch; 0 if there are none.

    Returns (mean [], number of True entries in the global batch []).
    """
    total = global_sum(jnp.where(mask, values, 0.0), axis_name)
    count = global_sum(mask.astype(jnp.float32), axis_name)
    return total / jnp.maximum(count, 1.0), count


def row_offset(num_local, axis_name):
    """Global index of this shard's first row (tiled all_gather puts shard k at k * n)."""
    return 0 if axis_name is None else lax.axis_index(axis_name) * num_local


def diagonal_mask(num_rows, num_cols, offset):
    """[n, N] bool, True at column `offset + i` of row i: the positive pair of each local row."""
    return jnp.arange(num_cols)[None, :] == (offset + jnp.arange(num_rows))[:, None]


def masked_rows(x, mask):
    """Zeroes padded entries: garbage (even NaN) in them reaches neither loss nor gradient.

    x: [..., D]; mask: [...] bool, False for padded entries. Returns float32 [..., D].
    """
    return jnp.where(mask[..., None], jnp.asarray(x, jnp.float32), 0.0)


def masked_logsumexp(logits, mask):
    """logsumexp over the last axis of the entries where `mask` is True.

    A row with no valid entry would give log(0) and a NaN gradient, so such rows are computed over
    all their entries instead; callers drop those rows from the loss.
    """
    any_valid = jnp.any(mask, axis=-1, keepdims=True)
    return jax.nn.logsumexp(jnp.where(mask | ~any_valid, logits, -jnp.inf), axis=-1)


def top1_hits(logits, positive, valid=None):
    """1.0 where a row's best positive column scores above every other valid column.

    logits, positive, valid: [n, N] (valid defaults to all True). Returns float32 [n].
    """
    valid = jnp.ones_like(positive) if valid is None else valid
    best_positive = jnp.max(jnp.where(positive & valid, logits, -jnp.inf), axis=-1)
    best_negative = jnp.max(jnp.where(~positive & valid, logits, -jnp.inf), axis=-1)
    return (best_positive > best_negative).astype(jnp.float32)


def _varying_axes(x) -> frozenset:
    """The mesh axes over which `x` is typed as per-device inside shard_map.

    JAX has no public accessor for this: jax 0.10 and 0.11 keep it in the `mat.varying` field of
    the abstract value, jax 0.6–0.9 in its `vma` field. It is read here and nowhere else.

    Raises:
      RuntimeError: this JAX keeps it in neither place (the message names the version).
    """
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    raise RuntimeError(
        f"jax {jax.__version__}: cannot read which mesh axes a value varies over "
        f"(neither {type(aval).__name__}.mat.varying nor .vma exists)"
    )


def as_varying(x, axis_name):
    """Marks a replicated value as per-device before it enters a custom_vjp inside shard_map.

    The custom_vjp returns per-device cotangents; typing the input as per-device makes the
    transpose of this cast (a psum) add them up into the gradient of the replicated value.
    """
    x = jnp.asarray(x, jnp.float32)
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    # Only the axes it is not yet per-device over.
    missing = tuple(a for a in names if a not in _varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x


def per_device_zeros(shape, axis_name, fill=0.0):
    """A loop carry that will hold per-device values must start out typed as per-device."""
    return as_varying(jnp.full(shape, fill, jnp.float32), axis_name)


def ring_permutation(axis_name):
    """ppermute pairs that send each device's value to the next device along `axis_name`."""
    size = lax.axis_size(axis_name)
    return [(source, (source + 1) % size) for source in range(size)]
