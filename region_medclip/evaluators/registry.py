"""The evaluator registry: ``config.evals.<name>.kind`` → the one evaluator that runs it.

An evaluator is a pair of functions over one embedded split ``emb`` (the arrays of
:func:`embeddings.embed_split`: ``zimg, ztxt [N, D]``, ``zroi, zcap [N, R, D]``, ``zpatch
[N, grid², D]``, ...):

- ``run(emb, *, ctx, **options) → {metric: float}``;
- ``plot(emb, path, *, ctx, **options)``: its figure, saved as a PNG.

``options`` are the kind's own keys of ``config.evals.<name>`` (:attr:`Evaluator.options`, with
their defaults); ``ctx`` (:class:`Context`) is what the evaluators of a split share. The keys
every kind has (:data:`COMMON`) choose the split and when it is evaluated; the caller
(``run.evaluate``) reads them.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from region_medclip.data import registry as data_registry
from region_medclip.data import tokenizers as tokenizers_lib
from region_medclip.evaluators import (
    detection,
    fewshot,
    grounding,
    multiclass,
    phrase_grounding,
    probe,
    retrieval,
    zero_shot,
)
from region_medclip.evaluators import embeddings as embeddings_lib

# The keys of every ``config.evals.<name>``, with their defaults.
COMMON = dict(
    every=None,  # None: config.train.eval_every; 0: only from `python -m region_medclip.evaluate`
    dataset=None,  # a registered or prepared dataset; None: config.data.eval
    split="test",
    max_examples=0,
    batch_size=64,
)


class TextTower:
    """A model's text tower as the evaluators use it, each part built on first use.

    Attributes:
      tokenizer: the tokenizer of ``config.data``.
      encode: ``list[str] → [n, D]`` L2-normalised text embeddings (numpy), jitted once.
    """

    def __init__(self, model, params, data_config):
        self._model, self._params, self._data_config = model, params, data_config

    @functools.cached_property
    def tokenizer(self):
        return tokenizers_lib.from_config(self._data_config)

    @functools.cached_property
    def encode(self) -> Callable[[list[str]], np.ndarray]:
        # Prompts are encoded at the report length: sentence prompts are report sentences, longer
        # than box captions (the towers pool over the real tokens, so padding changes nothing).
        length = self._data_config.text_len
        return embeddings_lib.text_encoder(self._model, self._params, self.tokenizer, length)


@dataclasses.dataclass(frozen=True)
class Context:
    """What the evaluators of one embedded split share.

    Attributes:
      dataset: the registry entry of the evaluated dataset (``config.evals.<name>.dataset``,
        default ``config.data.eval``): its label names (``labels [N, C]``), "no finding" class
        and zero-shot prompt sets.
      text: the text tower (``encode``, ``tokenizer``), e.g. a :class:`TextTower`.
      grid: side of the image tower's patch grid (``emb["zpatch"]`` is ``[N, grid², D]``).
      split: the name of the split ``emb`` holds.
      name: the evaluator's name in ``config.evals`` (for errors naming its keys).
      embed: ``(split, max_examples) → emb`` of another split of the same dataset (cached by
        the caller), for evaluators that train on one split and score another (probes).
      model, params, data_config: the model, its params and ``config.data`` with ``eval`` set
        to this dataset, for evaluators that run the towers themselves (fine-tuning).
    """

    dataset: data_registry.Dataset
    text: Any
    grid: int
    split: str = "test"
    name: str = ""
    embed: Callable[[str, int], dict] | None = None
    model: Any = None
    params: Any = None
    data_config: Any = None


class Evaluator(NamedTuple):
    """One kind's evaluator: ``run`` and ``plot`` (see the module docstring) and ``options``,
    the keys of ``config.evals.<name>`` they take, with their defaults."""

    run: Callable[..., dict[str, float]]
    plot: Callable[..., None]
    options: Mapping[str, Any]


KINDS: dict[str, Evaluator] = {
    "zero_shot": Evaluator(zero_shot.run, zero_shot.plot, zero_shot.OPTIONS),
    "retrieval": Evaluator(retrieval.run_retrieval, retrieval.plot_retrieval, {}),
    "regions": Evaluator(retrieval.run_regions, retrieval.plot_regions, {}),
    "grounding": Evaluator(grounding.run, grounding.plot, grounding.OPTIONS),
    "modality_gap": Evaluator(retrieval.run_modality_gap, retrieval.plot_modality_gap, {}),
    "multiclass": Evaluator(multiclass.run, multiclass.plot, multiclass.OPTIONS),
    "linear_probe": Evaluator(probe.run, probe.plot, probe.OPTIONS),
    "fewshot": Evaluator(fewshot.run, fewshot.plot, fewshot.OPTIONS),
    "phrase_grounding": Evaluator(
        phrase_grounding.run, phrase_grounding.plot, phrase_grounding.OPTIONS
    ),
    "detection": Evaluator(detection.run, detection.plot, detection.OPTIONS),
}


def _known_keys() -> set[str]:
    """Every key some evaluator reads: one ``config.evals`` line may set a key (e.g.
    ``bootstrap``) for every evaluator, and those of other kinds ignore it."""
    return {"kind", *COMMON}.union(*(e.options for e in KINDS.values()))


def eval_config(config, name: str) -> dict[str, Any]:
    """``config.evals.<name>`` with the defaults of :data:`COMMON` and of its kind.

    Raises:
      ValueError: naming ``config.evals.<name>.kind`` for a kind not in :data:`KINDS`, or the
        keys no evaluator reads.
    """
    given = dict(config.evals[name])
    kind = given.get("kind")
    if kind not in KINDS:
        raise ValueError(f"config.evals.{name}.kind: {kind!r} is not one of {tuple(KINDS)}")
    unknown = set(given) - _known_keys()
    if unknown:
        raise ValueError(f"config.evals.{name}: unknown keys {sorted(unknown)}")
    cfg = {**COMMON, **KINDS[kind].options, **given}
    if cfg["every"] is None:
        cfg["every"] = int(config.train.eval_every)
    return cfg


def options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of :func:`eval_config`'s ``cfg`` that its kind's evaluator takes."""
    return {key: cfg[key] for key in KINDS[cfg["kind"]].options}
