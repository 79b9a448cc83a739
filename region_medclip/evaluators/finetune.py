"""Fine-tuning probe: the image tower and a linear head trained together on a labelled subset.

The ``finetune=True`` option of the linear probe (:mod:`probe`). The head is a dense layer on
the image embedding ``zimg`` (zero-initialised, so the first steps move the tower only as far as
the head's gradient asks); Adam updates the head and the parameters of the image tower, every
other parameter (text and region towers, temperature) stays as it is. A step sees
``batch_size`` images drawn at random from the subset (with replacement when the subset is
smaller); the loss is the binary cross-entropy per finding with uncertain entries masked
(multilabel) or the softmax cross-entropy (multiclass). No augmentation: the images are those
:func:`embeddings.embed_split` stored, the first channel of the normalised evaluation inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from region_medclip.data.transforms import MEAN, STD
from region_medclip.models import clip

__all__ = [
    "IMAGE_TOWER",
    "finetune",
    "head_logits",
    "make_step_fn",
    "multiclass_loss",
    "multilabel_loss",
    "predict",
    "rgb_images",
    "score_fn",
    "tuned_params",
]

# The params subtree of RegionCLIP's image tower (its attribute name in `setup`).
IMAGE_TOWER = "image_tower"


def rgb_images(first_channel: np.ndarray) -> np.ndarray:
    """``[N, S, S]`` first channel of normalised films → ``[N, S, S, 3]`` model inputs.

    The films are grey, but each channel is normalised with its own mean and std: the grey
    level is recovered from the first channel and normalised again for all three.
    """
    grey = np.asarray(first_channel, np.float32) * STD[0] + MEAN[0]
    return ((grey[..., None] - MEAN) / STD).astype(np.float32)


def head_logits(model: clip.RegionCLIP, params, trainable, images: jax.Array) -> jax.Array:
    """``images [B, S, S, 3]`` → ``[B, K]`` logits of the head on the image embedding, with
    the image tower of ``trainable`` (``{IMAGE_TOWER: ..., "head": {kernel [D, K], bias
    [K]}}``) in place of the one in ``params``."""
    zimg, _ = model.apply(
        {"params": tuned_params(params, trainable)}, images, method=clip.RegionCLIP.encode_image
    )
    return zimg @ trainable["head"]["kernel"] + trainable["head"]["bias"]


def tuned_params(params, trainable):
    """The model's ``params`` with the image tower of ``trainable`` (the rest shared)."""
    return {**params, IMAGE_TOWER: trainable[IMAGE_TOWER]}


def multilabel_loss(*, logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of ``logits [B, K]`` against ``targets [B, K]`` over the
    entries that are 0 or 1 (uncertain −1 entries are masked)."""
    known = (targets == 0) | (targets == 1)
    losses = optax.sigmoid_binary_cross_entropy(logits, jnp.clip(targets, 0, 1))
    return jnp.sum(jnp.where(known, losses, 0.0)) / jnp.maximum(known.sum(), 1)


def multiclass_loss(*, logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits [B, K]`` against int ``targets [B]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_step_fn(model: clip.RegionCLIP, optimizer, loss_fn):
    """A jitted step ``(trainable, opt_state, params, images [B, S, S, 3], targets) →
    (trainable, opt_state, loss)``: one ``optimizer`` update of ``loss_fn(logits=, targets=)``.

    Nothing is donated: the first ``trainable`` holds the caller's image-tower arrays.
    """

    def step(trainable, opt_state, params, images, targets):
        def objective(t):
            return loss_fn(logits=head_logits(model, params, t, images), targets=targets)

        loss, grads = jax.value_and_grad(objective)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step)


def finetune(
    model: clip.RegionCLIP,
    params,
    first_channel: np.ndarray,
    targets: np.ndarray,
    *,
    num_outputs: int,
    step_fn,
    optimizer,
    steps: int,
    batch_size: int,
    seed: int,
):
    """Trains the image tower and a fresh head on ``first_channel [n, S, S]`` films (as
    :func:`rgb_images` takes them) with ``targets`` (``[n, K]`` or ``[n]``) for ``steps``
    steps of ``step_fn`` (from :func:`make_step_fn` with ``optimizer``).

    Returns ``{IMAGE_TOWER: params, "head": {kernel [D, K], bias [K]}}``.
    """
    size = first_channel.shape[1]
    shape = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    zimg, _ = jax.eval_shape(
        lambda x: model.apply({"params": params}, x, method=clip.RegionCLIP.encode_image), shape
    )
    head = dict(
        kernel=jnp.zeros((zimg.shape[-1], num_outputs), jnp.float32),
        bias=jnp.zeros((num_outputs,), jnp.float32),
    )
    trainable = {IMAGE_TOWER: params[IMAGE_TOWER], "head": head}
    opt_state = optimizer.init(trainable)
    rng = np.random.default_rng(seed)
    n = len(first_channel)
    for _ in range(steps):
        rows = np.sort(rng.choice(n, batch_size, replace=n < batch_size))
        images = rgb_images(first_channel[rows])
        trainable, opt_state, _ = step_fn(trainable, opt_state, params, images, targets[rows])
    return trainable


def predict(
    predict_fn, params, trainable, first_channel: np.ndarray, batch_size: int
) -> np.ndarray:
    """``[M, K]`` head logits of ``first_channel [M, S, S]`` films in batches of
    ``batch_size`` (the last one padded: one compiled shape); ``predict_fn(params, trainable,
    images)`` is :func:`head_logits` with the model bound."""
    out = []
    for start in range(0, len(first_channel), batch_size):
        chunk = rgb_images(first_channel[start : start + batch_size])
        padded = np.zeros((batch_size, *chunk.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        out.append(np.asarray(predict_fn(params, trainable, padded))[: len(chunk)])
    return np.concatenate(out).astype(np.float64)


def score_fn(
    model: clip.RegionCLIP,
    params,
    train_images: np.ndarray,
    eval_images: np.ndarray,
    targets_,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
):
    """The fine-tuning probe as :data:`probe.ScoreFn`: ``(subset, trainable, seed) → [M, K]``.

    Args:
      model, params: the model and its (untouched) params.
      train_images, eval_images: ``[N, S, S]`` the ``images`` of the two splits' embeddings.
      targets_: a :class:`probe.Targets` (its rows index the two image arrays).
      steps, learning_rate, batch_size: Adam steps, their rate and images per step.
    """
    multiclass = targets_.task == "multiclass"
    optimizer = optax.adam(learning_rate)
    loss_fn = multiclass_loss if multiclass else multilabel_loss
    # Compiled once for every fraction and seed.
    step_fn = make_step_fn(model, optimizer, loss_fn)
    # The params go in as arguments: arrays a jitted function closes over become constants.
    predict_fn = jax.jit(functools.partial(head_logits, model))
    train = np.asarray(train_images)[targets_.train_rows]
    evaluation = np.asarray(eval_images)[targets_.eval_rows]
    y = targets_.train.astype(np.int32 if multiclass else np.float32)

    def score(subset, can_train, seed):
        del can_train  # every column trains; the caller leaves out those it cannot score
        trainable = finetune(
            model,
            params,
            train[subset],
            y[subset],
            num_outputs=len(targets_.names),
            step_fn=step_fn,
            optimizer=optimizer,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
        )
        return predict(predict_fn, params, trainable, evaluation, batch_size)

    return score
