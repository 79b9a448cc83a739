"""The frozen distillation teacher: region logits over a concept vocabulary (docs/design.md
§3, §4.5).

A teacher is a ``RegionCLIP`` restored from a checkpoint of this project or from a ``convert``
output of a CLIP model. It embeds the concept vocabulary once (every concept in every prompt
template, averaged and renormalised: prompt ensembling) and then, each step, the ROIs of the
batch. How it embeds a ROI depends on what the checkpoint knows:

- ``head``: its own region tower (RoIAlign over its patch tokens), for a checkpoint trained with
  region losses;
- ``crops``: the box cropped out of the image (RoIAlign on the pixels, resampled to the teacher's
  input size) and encoded as a whole image, as RegionCLIP's CLIP teacher does. An imported CLIP
  has no trained region tower, so this is the only meaningful choice for it.

``config.teacher.regions = "auto"`` takes ``crops`` for a ``convert`` output of a CLIP model and
``head`` otherwise. Its params are never updated and never in the optimizer state.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from region_medclip import checkpointing
from region_medclip import sharding as sharding_lib
from region_medclip.data import registry
from region_medclip.data import tokenizers as tokenizers_lib
from region_medclip.models import clip
from region_medclip.models.teacher import (
    concept_embeddings,
    encode_regions_from_crops,
    encode_regions_from_head,
)

_log = logging.getLogger("region_medclip.teacher")

# Prompt templates averaged into each distillation concept's embedding (prompt ensembling).
CONCEPT_TEMPLATES = ("{}", "there is {}", "findings of {}", "a chest x-ray showing {}")
REGION_SOURCES = ("auto", "head", "crops")


def concept_vocabulary(dataset: str, data_dir: str | None = None) -> list[str]:
    """The distillation concepts of a dataset (its registry entry's: finding × location phrases
    for ``synth_cxr``, the label names in lower case for the labelled readers; a user's
    dataset is found in ``data_dir``).

    Raises:
      ValueError: naming ``config.data.train`` when the dataset has none.
    """
    try:
        return registry.get(dataset, data_dir).concept_vocabulary()
    except ValueError as err:
        raise ValueError(f"config.data.train={dataset!r}: {err}") from err


def concept_tokens(tokenizer, concepts: list[str], length: int) -> np.ndarray:
    """``[C, T, L]`` tokens of every concept in every template of :data:`CONCEPT_TEMPLATES`."""
    texts = [t.format(c) for c in concepts for t in CONCEPT_TEMPLATES]
    return tokenizer(texts, length).reshape(len(concepts), len(CONCEPT_TEMPLATES), length)


class Teacher:
    """A frozen model for ROI-concept distillation: its module, how it embeds ROIs
    (``region_source``), the concept tokens in the student's tokenizer (``concept_tokens``,
    ``[C, T, L]``) and ``params = {"params": ..., "concepts": [C, D]}``, kept outside the
    ``TrainState`` so the optimizer never sees them.

    Args:
      path: a workdir or ``convert`` output (its latest checkpoint).
      student_data_config: the student's ``config.data`` (its tokenizer and caption length).
      concepts: the concept vocabulary.
      mesh: params are replicated over it.
      regions: ``auto`` | ``head`` | ``crops`` (``config.teacher.regions``).
    """

    def __init__(
        self,
        path: str,
        student_data_config,
        concepts: list[str],
        mesh: Mesh,
        regions: str = "auto",
    ):
        if regions not in REGION_SOURCES:
            raise ValueError(f"config.teacher.regions={regions!r}: choose one of {REGION_SOURCES}")
        params, cfg, step = checkpointing.restore_params(path)
        if "partial" in cfg:
            raise ValueError(
                f"config.teacher.init_from={path}: holds only {cfg['partial']['provides']}, "
                "a teacher needs a whole model"
            )
        teacher_config = ml_collections.ConfigDict(cfg)
        if regions == "auto":
            regions = "crops" if cfg.get("converted") else "head"
        self.region_source = regions
        self.image_size = int(teacher_config.data.image_size)
        if regions == "head" and self.image_size != int(student_data_config.image_size):
            raise ValueError(
                f"config.teacher.init_from={path}: its region tower needs {self.image_size} px "
                f"images, config.data.image_size is {student_data_config.image_size} "
                "(config.teacher.regions=crops resamples each box to the teacher's size)"
            )
        self.model = clip.from_config(teacher_config.model)
        self.step = step
        teacher_tok = tokenizers_lib.from_config(teacher_config.data)
        student_tok = tokenizers_lib.from_config(student_data_config)
        length = teacher_config.data.get("caption_len", 0) or teacher_config.data.text_len
        teacher_tokens = concept_tokens(teacher_tok, concepts, length)
        student_len = student_data_config.get("caption_len", 0) or student_data_config.text_len
        self.concept_tokens = jnp.asarray(concept_tokens(student_tok, concepts, student_len))
        params = jax.device_put(params, sharding_lib.replicated(mesh))
        # Computed once: the teacher is frozen, so its concept embeddings never change.
        concepts_z = jax.jit(functools.partial(concept_embeddings, self.model))(
            params, teacher_tokens
        )
        self.params = {"params": params, "concepts": concepts_z}
        _log.info(
            "teacher: step %d of %s, %d concepts, regions from %s",
            step,
            path,
            len(concepts),
            regions,
        )

    def region_embeddings(self, params, images, boxes, roi_mask) -> jax.Array:
        """``zroi [B, R, D]`` of the teacher (``params`` = ``self.params["params"]``)."""
        if self.region_source == "crops":
            method = functools.partial(encode_regions_from_crops, size=self.image_size)
        else:
            method = encode_regions_from_head
        return self.model.apply({"params": params}, images, boxes, roi_mask, method=method)

    def logits(self, params, images, boxes, roi_mask, temperature: float) -> jax.Array:
        """``[B, R, C]`` teacher ROI-concept logits divided by ``temperature``, without gradient
        (``params`` = ``self.params``)."""
        zroi = self.region_embeddings(params["params"], images, boxes, roi_mask)
        logits = jnp.einsum("nrd,cd->nrc", zroi, params["concepts"]) / temperature
        return jax.lax.stop_gradient(logits)
