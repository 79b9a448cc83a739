"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022): learned
context vectors in the text tower's input, trained on k labelled images a class with both
towers frozen.

- The prompts are ``[V]1 … [V]M [CLASS].`` (:mod:`region_medclip.evaluators.coop`); only the
  context ``[S, G, M, width]`` is learned: ``jax.grad`` is taken with respect to it alone, the
  towers' params enter the loss as constants and never reach the optimiser.
- The image embeddings are computed once (``embed_split``): a step runs the text tower over
  the S × C prompts only, on the whole k-shot set at once.
- Multi-class (every training image has one label): CoOp's cross-entropy of the softmax over
  the classes. Multi-label: each finding's binary cross-entropy of the two-way softmax of its
  positive prompt against its negative one, as ``zero_shot.positive_probability`` scores it;
  the negative prompt has a context of its own (``negatives="learned"``, DualCoOp's pair: Sun et
  al., NeurIPS 2022) or is the fixed normal-study prompt set (``"normal"``).
- The k-shot set is ``fewshot.shot_subset``'s: k positives of each finding and k normal
  studies (multi-label), or k images of each class (multi-class), drawn with the seed.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from region_medclip.evaluators import coop as coop_lib
from region_medclip.evaluators import embeddings, fewshot, probe, zero_shot
from region_medclip.models import clip

__all__ = ["Options", "PromptLearner", "coop_loss", "init_context", "phrase_context", "shot_set"]

OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class Options:
    """How the context is learned.

    Attributes:
      n_ctx: M, CoOp's 16 (it used 4 only with the 4-word init "a photo of a"); on the
        default run 16 scored at least as well as 8 and 4 at 1, 4 and 16 shots
        (docs/design.md §7).
      class_specific: one context a class (CoOp's CSC) instead of one shared by all.
      position: ``end`` (``[V]… [CLASS].``) or ``middle`` (half the context on each side).
      init: a phrase whose token embeddings start the context (M becomes its token count, as
        in CoOp); "": CoOp's N(0, 0.02²).
      negatives: multi-label: ``learned`` or ``normal`` (see the module docstring).
      task: ``auto`` (multi-class when every training image has one label), ``multilabel`` or
        ``multiclass``.
      steps: full-batch steps.
      optimizer: ``adam`` or ``sgd`` (CoOp's, with momentum 0.9); the learning rate follows a
        cosine decay to 0 over ``steps``.
      learning_rate: CoOp's 0.002. Full-batch Adam at it for 200 steps fits the default run's
        prompts in seconds on a CPU; 100 steps, or 0.01, scored lower.
    """

    n_ctx: int = 16
    class_specific: bool = False
    position: str = "end"
    init: str = ""
    negatives: str = "learned"
    task: str = "auto"
    steps: int = 200
    optimizer: str = "adam"
    learning_rate: float = 2e-3

    def check(self) -> None:
        """Raises ValueError naming the first option out of its range."""
        choices = dict(
            position=coop_lib.POSITIONS,
            negatives=coop_lib.NEGATIVES,
            task=probe.TASKS,
            optimizer=OPTIMIZERS,
        )
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"coop {key}: {getattr(self, key)!r} is not one of {allowed}")
        if self.n_ctx < 1 or self.steps < 1 or self.learning_rate <= 0:
            raise ValueError(f"coop: n_ctx, steps and learning_rate must be positive: {self}")


def token_table(params) -> np.ndarray:
    """``[vocab, width]`` the text tower's token (word) embeddings."""
    tower = params["text_tower"]
    table = tower["token_embedding" if "token_embedding" in tower else "word_embeddings"]
    return np.asarray(nn.meta.unbox(table["embedding"]))


def phrase_context(params, tokenizer, phrase: str) -> np.ndarray:
    """``[M, width]``: the token embeddings of ``phrase`` (CoOp's init from "a photo of a").

    Raises:
      ValueError: the phrase has no tokens.
    """
    ids = coop_lib.word_ids(tokenizer, phrase, space=False)
    if not ids:
        raise ValueError(f"coop init: {phrase!r} has no tokens")
    return token_table(params)[np.asarray(ids)]


def init_context(key, *, sets: int, groups: int, n_ctx: int, width: int, phrase=None):
    """``[sets, groups, n_ctx, width]`` float32: ``phrase [n_ctx, width]`` in every set and
    group, or CoOp's N(0, 0.02²) draws."""
    if phrase is not None:
        return jnp.broadcast_to(jnp.asarray(phrase, jnp.float32), (sets, groups, n_ctx, width))
    return 0.02 * jax.random.normal(key, (sets, groups, n_ctx, width), jnp.float32)


def coop_loss(context, *, encode_fn, zimg, targets, weights, logit_scale, task, zneg=None):
    """The CoOp loss of the context ``[S, G, M, width]``.

    Args:
      encode_fn: ``context → z [S, C, D]`` the prompts' embeddings (the frozen text tower).
      zimg: ``[n, D]`` L2-normalised image embeddings (the frozen image tower's).
      targets: multi-class ``[n]`` int classes; multi-label ``[n, C]`` 1 / 0 (others ignored).
      weights: ``[n]`` 1 for an image of the set, 0 for padding.
      logit_scale: the temperature ``t``.
      task: ``multiclass`` or ``multilabel``.
      zneg: ``[C, D]`` fixed negative embeddings (``negatives="normal"``); None: ``z[1]``.

    Returns:
      The scalar mean cross-entropy over the images (multi-class) or the known entries.
    """
    scores = coop_lib.logits(encode_fn(context), zimg, logit_scale, task=task, zneg=zneg)
    if task == "multiclass":
        loss = optax.softmax_cross_entropy_with_integer_labels(scores, targets)
        return (loss * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    known = ((targets == 0) | (targets == 1)) * weights[:, None]
    loss = optax.sigmoid_binary_cross_entropy(scores, jnp.where(targets == 1, 1.0, 0.0))
    return (loss * known).sum() / jnp.maximum(known.sum(), 1.0)


def shot_set(labels, class_names, *, shots: int, seed: int, task: str):
    """The k-shot set of ``labels [N, C]`` (``class_names [C]``) drawn with ``seed``.

    Returns ``(rows [n] into labels, targets, names, task)``: ``targets`` are ``[n]`` int
    classes among ``names`` (multi-class: every class) or ``[n, F]`` over ``names`` (the
    findings).
    """
    targets_ = probe.targets(labels, labels[:0], list(class_names), task)
    subset = fewshot.shot_subset(targets_, shots, seed)
    rows = targets_.train_rows[subset]
    return rows, targets_.train[subset], targets_.names, targets_.task


def _optimizer(options: Options) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(options.learning_rate, options.steps)
    if options.optimizer == "sgd":
        return optax.sgd(schedule, momentum=0.9)
    return optax.adam(schedule)


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    """Rows of ``x`` padded with zeros to ``size``."""
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def _batch(tokens, slots, zimg, targets, logit_scale, zneg) -> dict:
    """The step's inputs, the k-shot set padded (weight 0) to at least 256 rows, a power of
    two: every set of up to 16 shots of up to 15 classes shares one compiled step, and the
    images cost nothing beside the text tower."""
    n = len(zimg)
    size = max(256, 1 << max(0, (n - 1).bit_length()))
    batch = dict(
        tokens=tokens,
        slots=slots,
        zimg=_padded(np.asarray(zimg, np.float32), size),
        targets=_padded(np.asarray(targets), size),
        weights=_padded(np.ones(n, np.float32), size),
        logit_scale=np.float32(logit_scale),
    )
    if zneg is not None:
        batch["zneg"] = np.asarray(zneg, np.float32)
    return batch


class PromptLearner:
    """Learns CoOp prompts for one frozen model: ``train`` once per k-shot set, its compiled
    step reused across sets.

    Args:
      module, params: the model; ``params`` are only read (no optimiser sees them).
      tokenizer: ``config.data``'s tokenizer; prompts are ``text_len`` tokens long.
      options: :class:`Options`.
    """

    def __init__(self, module: clip.RegionCLIP, params, tokenizer, *, text_len, options):
        options.check()
        self.module, self.params, self.tokenizer = module, params, tokenizer
        self.text_len, self.options = text_len, options
        self.optimizer = _optimizer(options)
        self._steps = {task: self._make_step(task) for task in coop_lib.TASKS}

    def _make_step(self, task: str):
        module, optimizer = self.module, self.optimizer

        @jax.jit
        def step(context, opt_state, params, batch):
            def encode_fn(c):
                return coop_lib.encode(module, params, c, batch["tokens"], batch["slots"])

            def loss_fn(c):
                inputs = {k: batch[k] for k in ("zimg", "targets", "weights", "logit_scale")}
                zneg = batch.get("zneg")
                return coop_loss(c, encode_fn=encode_fn, task=task, zneg=zneg, **inputs)

            # The gradient of the context alone: the towers' params are constants here.
            loss, grads = jax.value_and_grad(loss_fn)(context)
            updates, opt_state = optimizer.update(grads, opt_state, context)
            return optax.apply_updates(context, updates), opt_state, loss

        return step

    def _start(self, names, negatives: str, seed: int):
        """``(context [S, G, M, width], tokens [C, L], slots [C, M], zneg [C, D] or None)``."""
        options = self.options
        phrase = None
        if options.init:
            phrase = phrase_context(self.params, self.tokenizer, options.init)
        n_ctx = options.n_ctx if phrase is None else len(phrase)
        tokens, slots = coop_lib.prompt_tokens(
            self.tokenizer, names, n_ctx=n_ctx, position=options.position, length=self.text_len
        )
        zneg = None
        if negatives == "normal":  # the fixed reference: encoded once
            encode = embeddings.text_encoder(
                self.module, self.params, self.tokenizer, self.text_len
            )
            zneg = zero_shot.normal_embeddings(encode, len(names))
        context = init_context(
            jax.random.key(seed),
            sets=2 if negatives == "learned" else 1,
            groups=len(names) if options.class_specific else 1,
            n_ctx=n_ctx,
            width=token_table(self.params).shape[1],
            phrase=phrase,
        )
        return context, tokens, slots, zneg

    def train(
        self, *, zimg, labels, class_names, logit_scale: float, shots: int, seed: int, dataset=""
    ) -> tuple[coop_lib.LearnedPrompts, list[float]]:
        """Learns prompts on the ``shots``-shot set of ``seed`` from a train split's image
        embeddings ``zimg [N, D]`` and ``labels [N, C]`` (named by ``class_names [C]``), at
        the model's temperature ``logit_scale`` (``exp`` of the parameter).

        Returns:
          The learned prompts and the loss at every step.
        """
        options = self.options
        rows, targets, names, task = shot_set(
            np.asarray(labels), class_names, shots=shots, seed=seed, task=options.task
        )
        negatives = "" if task == "multiclass" else options.negatives
        context, tokens, slots, zneg = self._start(names, negatives, seed)
        opt_state = self.optimizer.init(context)
        batch = _batch(tokens, slots, np.asarray(zimg)[rows], targets, logit_scale, zneg)
        losses = []
        for _ in range(options.steps):
            context, opt_state, loss = self._steps[task](context, opt_state, self.params, batch)
            losses.append(float(loss))
        record = dict(
            init=options.init,
            steps=options.steps,
            optimizer=options.optimizer,
            learning_rate=options.learning_rate,
            final_loss=losses[-1],
            train_examples=len(rows),
        )
        learned = coop_lib.LearnedPrompts(
            context=np.asarray(context),
            class_names=tuple(names),
            position=options.position,
            task=task,
            negatives=negatives,
            dataset=dataset,
            shots=shots,
            seed=seed,
            options=record,
        )
        return learned, losses
