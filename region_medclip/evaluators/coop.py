"""Learned prompt context (CoOp; Zhou et al., IJCV 2022): what a learned prompt is, how its
class embeddings are computed, and how it is saved beside a run.

A learned prompt replaces the words of a hand prompt by M context vectors in the text tower's
input, ``[V]1 … [V]M [CLASS].`` (``position="end"``) or ``[V]1 … [V]M/2 [CLASS] [V]M/2+1 … [V]M.``
(``"middle"``). Its token ids are built directly, ``BOS, M placeholders, the class name's ids,
".", EOS`` padded to the text length; the tower reads the context vectors at the placeholder
positions in place of their token embeddings (``RegionCLIP.encode_text(tokens, context)``).

The context is ``[S, G, M, width]``: S sets (multi-label with learned negatives: the positive
and the negative prompt of every finding, DualCoOp's pair; otherwise one), G = 1 (unified: one
context shared by every class) or the number of classes (class-specific). ``train/coop.py``
learns it; the zero-shot evaluator (``coop=``) and ``Model.zero_shot(prompts="coop")`` score
with it. Saved as ``<workdir>/coop/<dataset>/<name>.npz``.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from region_medclip.models import clip

POSITIONS = ("end", "middle")
TASKS = ("multilabel", "multiclass")
# What each finding's positive prompt is weighed against (multi-label): a second learned
# context before the same class name, or the fixed normal-study prompts.
NEGATIVES = ("learned", "normal")
_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class LearnedPrompts:
    """Learned context vectors and what they prompt.

    Attributes:
      context: ``[S, G, M, width]`` float32 (see the module docstring).
      class_names: ``[C]`` the classes prompted, in the order of G when class-specific
        (multi-label: the findings; multi-class: every class).
      position: ``end`` or ``middle``: where the class name sits among the context.
      task: ``multilabel`` (each finding against its negative) or ``multiclass`` (a softmax
        over ``class_names``).
      negatives: multi-label: ``learned`` (S = 2) or ``normal`` (S = 1); multi-class: "".
      dataset: the dataset whose train split taught it.
      shots, seed: the k images a class it was trained on and the seed that drew them.
      options: how it was trained (``init``, ``steps``, ``optimizer``, ``learning_rate``,
        ``final_loss``, ``train_examples``); kept for the record.
    """

    context: np.ndarray
    class_names: tuple[str, ...]
    position: str = "end"
    task: str = "multilabel"
    negatives: str = "learned"
    dataset: str = ""
    shots: int = 0
    seed: int = 0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_ctx(self) -> int:
        """M, the number of context vectors in each prompt."""
        return int(self.context.shape[2])

    @property
    def class_specific(self) -> bool:
        """Whether each class has its own context (G = C > 1)."""
        return self.context.shape[1] > 1


def word_ids(tokenizer, text: str, space: bool = True) -> list[int]:
    """The ids of ``text`` without BOS/EOS; ``space``: as it reads after a space, mid-sentence
    (byte-level BPEs mark a word that follows one; a full stop follows none)."""
    return list(tokenizer.tokenizer.encode(tokenizer.clean_fn(" " * space + text)).ids)


def prompt_tokens(
    tokenizer, class_names: Sequence[str], *, n_ctx: int, position: str, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``[V]1 … [V]M [CLASS].`` for each class, and where the context goes.

    The placeholder id is the tokenizer's BOS: never padding (BERT attends to it), below EOS
    (CLIP pools at the highest id), and its embedding is replaced anyway.

    Returns:
      ``tokens [C, length]`` int32 and ``slots [C, M]`` int32, the positions of the context
      vectors, first to last.

    Raises:
      ValueError: ``position`` is unknown, or a prompt does not fit ``length``.
    """
    if position not in POSITIONS:
        raise ValueError(f"coop position: {position!r} is not one of {POSITIONS}")
    before = n_ctx // 2 if position == "middle" else n_ctx
    dot, place = word_ids(tokenizer, ".", space=False), tokenizer.bos_id
    tokens = np.full((len(class_names), length), tokenizer.pad_id, np.int32)
    slots = np.zeros((len(class_names), n_ctx), np.int32)
    for row, name in enumerate(class_names):
        name_ids = word_ids(tokenizer, name)
        ids = [tokenizer.bos_id, *[place] * before, *name_ids, *[place] * (n_ctx - before)]
        ids += [*dot, tokenizer.eos_id]
        if len(ids) > length:
            raise ValueError(
                f"coop: the prompt of {name!r} is {len(ids)} tokens with n_ctx={n_ctx}, longer "
                f"than the text length {length}; use a smaller n_ctx"
            )
        tokens[row, : len(ids)] = ids
        after = 1 + before + len(name_ids)
        slots[row] = [*range(1, 1 + before), *range(after, after + n_ctx - before)]
    return tokens, slots


def place_context(context: jax.Array, slots: jax.Array, length: int):
    """``context [S, G, M, width]`` (G = 1 or C), ``slots [C, M]`` → ``(mask [C, length] bool,
    values [S, C, length, width])``, the ``context`` argument of ``encode_text``."""
    num_sets, _, n_ctx, width = context.shape
    per_class = jnp.broadcast_to(context, (num_sets, slots.shape[0], n_ctx, width))
    place = jax.nn.one_hot(slots, length, dtype=context.dtype)  # [C, M, L]
    # A one-hot product rather than a scatter: the gradient is its transpose, no scatter-add.
    values = jnp.einsum("cml,scmw->sclw", place, per_class)
    return place.sum(1) > 0, values


def encode(module: clip.RegionCLIP, params, context, tokens, slots) -> jax.Array:
    """``[S, C, D]`` L2-normalised embeddings of the prompts ``tokens [C, L]`` with ``context
    [S, G, M, width]`` at ``slots [C, M]``; differentiable in ``context``."""
    mask, values = place_context(context, slots, tokens.shape[-1])
    shape = (context.shape[0], *tokens.shape)
    return module.apply(
        {"params": params},
        jnp.broadcast_to(tokens, shape),
        (jnp.broadcast_to(mask, shape), values),
        method=clip.RegionCLIP.encode_text,
    )


def logits(z, zimg, logit_scale, *, task: str, zneg=None) -> jax.Array:
    """``[N, C]`` logits of images ``zimg [N, D]`` against learned prompts ``z [S, C, D]``.

    Multi-class: ``t · zimg · z[0]ᵀ``, a softmax's. Multi-label: the logit of the two-way
    softmax of each finding's positive against its negative (``z[1]``, or ``zneg [C, D]`` when
    given), ``t · zimg · (z_pos − z_neg)ᵀ``: its sigmoid is ``zero_shot.positive_probability``.
    """
    positive = logit_scale * zimg @ z[0].T
    if task == "multiclass":
        return positive
    negative = z[1] if zneg is None else zneg
    return positive - logit_scale * zimg @ negative.T


class Encoder:
    """A model's text tower as learned prompts need it: ``prompts → [S, C, D]`` numpy, the
    class embeddings of every class of ``prompts`` (jitted once per prompt shape)."""

    def __init__(self, module: clip.RegionCLIP, params, tokenizer, length: int):
        self.params, self.tokenizer, self.length = params, tokenizer, length
        self._encode = jax.jit(functools.partial(encode, module))

    def __call__(self, prompts: LearnedPrompts) -> np.ndarray:
        tokens, slots = prompt_tokens(
            self.tokenizer,
            prompts.class_names,
            n_ctx=prompts.n_ctx,
            position=prompts.position,
            length=self.length,
        )
        context = jnp.asarray(prompts.context, jnp.float32)
        return np.asarray(self._encode(self.params, context, tokens, slots))


def path(workdir: str, dataset: str, name: str) -> str:
    """``<workdir>/coop/<dataset>/<name>.npz``: where learned prompts ``name`` live."""
    return os.path.join(workdir, "coop", dataset, f"{name}.npz")


def save(where: str, prompts: LearnedPrompts) -> None:
    """Writes ``prompts`` to the ``.npz`` file ``where`` (its folders made): the context as an
    array, everything else as JSON beside it."""
    meta = {k: v for k, v in dataclasses.asdict(prompts).items() if k != "context"}
    meta = dict(meta, class_names=list(prompts.class_names), options=dict(prompts.options))
    target = epath.Path(where)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
        context = np.asarray(prompts.context, np.float32)
        np.savez(f, context=context, meta=np.array(json.dumps(dict(meta, format=_FORMAT))))


def load(where: str) -> LearnedPrompts:
    """The learned prompts saved at ``where`` by :func:`save`.

    Raises:
      FileNotFoundError: naming ``where`` and the command that writes such files.
      ValueError: ``where`` is not a file of learned prompts.
    """
    source = epath.Path(where)
    if not source.exists():
        raise FileNotFoundError(
            f"{where}: no learned prompts; python -m region_medclip.coop --workdir=W writes "
            "them to W/coop/<dataset>/<shots>shot_seed<seed>.npz"
        )
    with source.open("rb") as f, np.load(f) as data:
        if "context" not in data or "meta" not in data:
            raise ValueError(f"{where}: not a file of learned prompts (no context and meta)")
        context, meta = np.asarray(data["context"]), json.loads(str(data["meta"]))
    meta.pop("format", None)
    meta["class_names"] = tuple(meta["class_names"])
    return LearnedPrompts(context=context, **meta)


def saved(workdir: str, dataset: str) -> list[LearnedPrompts]:
    """Every set of learned prompts saved for ``dataset`` in ``workdir``, most shots first
    (lowest seed first among equal shots)."""
    folder = epath.Path(workdir) / "coop" / dataset
    found = [load(str(p)) for p in folder.glob("*.npz")] if folder.is_dir() else []
    return sorted(found, key=lambda p: (-p.shots, p.seed))
