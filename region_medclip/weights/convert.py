"""Converting pretrained checkpoints into checkpoint directories of this project (params + the
config that builds the model); ``python -m region_medclip.convert`` runs it.

A CLIP conversion holds a whole model; a BERT conversion holds a text tower only (and its
tokenizer), marked ``partial`` in its config.
"""

import json
import os
import shutil

import jax
import numpy as np
from flax.core import meta

from region_medclip import checkpointing
from region_medclip import config as config_lib
from region_medclip.data import tokenizers
from region_medclip.models import clip
from region_medclip.weights import hf_bert, hf_clip, open_clip

FORMATS = ("hf_clip", "open_clip", "hf_bert")
# What a tokenizer directory of an HF checkpoint may hold; copied next to a BERT conversion.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def convert_hf_clip(src: str, out: str) -> dict:
    """Converts an HF ``CLIPModel`` at ``src`` into ``out``; returns the stored config."""
    fields, loaded = hf_clip.load(src)
    return _write(fields, loaded, src, out, "hf_clip")


def convert_open_clip(
    src: str, out: str, model_config: str, hf_text_dir: str | None = None
) -> dict:
    """Converts an open_clip checkpoint ``src`` (architecture from ``model_config``, a JSON
    path or a model name) into ``out``; returns the stored config. ``hf_text_dir``: for an HF
    text tower (BiomedCLIP), a local directory with its ``config.json`` and tokenizer when the
    model config's ``hf_model_name`` is not one."""
    fields, loaded = open_clip.load(src, model_config, hf_text_dir)
    return _write(fields, loaded, src, out, "open_clip")


def convert_hf_bert(src: str, out: str, pool: str = "cls") -> dict:
    """Converts an HF BERT-family encoder at ``src`` (a directory with ``config.json``, weights
    and a tokenizer) into a text-tower-only checkpoint at ``out``; returns the stored config.

    The stored config's ``partial`` section lists what the checkpoint provides
    (``text_tower``) and what it leaves to the model's init (``text_tower/proj``, the projection
    into the joint space, which BERT does not have).
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src={src}: hf_bert needs the checkpoint directory")
    kwargs, loaded = hf_bert.load(src)
    tokenizer_dir = _copy_tokenizer(src, out, kwargs["vocab_size"])
    config = config_lib.base_config()
    config.model.text = dict(kind="bert", variant="base", pool=pool, **kwargs)
    config.data.tokenizer = "hf"
    config.data.tokenizer_path = tokenizer_dir
    config.data.text_len = min(int(config.data.text_len), kwargs["context_len"])
    config_json = json.loads(config.to_json_best_effort())
    config_json["partial"] = dict(
        provides=["text_tower"], keeps_init=["text_tower/proj"], format="hf_bert", src=src
    )
    checkpointing.save_params(out, {"text_tower": loaded}, config_json)
    return config_json


def _copy_tokenizer(src: str, out: str, vocab_size: int) -> str:
    """Copies an HF tokenizer directory's files to ``out/tokenizer`` (the conversion then
    stands alone) and checks its ids fit the model; returns the copy's absolute path."""
    tokenizer_dir = os.path.abspath(os.path.join(out, "tokenizer"))
    os.makedirs(tokenizer_dir, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), tokenizer_dir)
    tokenizer = tokenizers.hf(tokenizer_dir)  # fails here if src has no tokenizer
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{src}: tokenizer has {tokenizer.vocab_size} ids, the model {vocab_size}")
    return tokenizer_dir


def _write(fields: dict, loaded: dict, src: str, out: str, source_format: str) -> dict:
    config = config_lib.base_config()
    config.model.image, config.model.text = fields["image"], fields["text"]
    config.model.embed_dim = fields["embed_dim"]
    config.data.image_size = fields["image_size"]
    config.data.text_len = fields.get("text_len", fields["text"]["context_len"])
    if "tokenizer" in fields:  # an HF text tower (BiomedCLIP): its own WordPiece tokenizer
        config.data.tokenizer = "hf"
        config.data.tokenizer_path = _copy_tokenizer(
            fields["tokenizer"], out, fields["text"]["vocab_size"]
        )
    else:
        config.data.tokenizer = "clip_bpe"
    model = clip.from_config(config.model)
    size, length = fields["image_size"], fields["text"]["context_len"]
    # The region head and logit_bias are not in CLIP: they start from this model's own init.
    params = meta.unbox(
        jax.jit(
            lambda: model.init(
                jax.random.PRNGKey(0),
                np.zeros((1, size, size, 3), np.float32),
                np.zeros((1, length), np.int32),
                np.zeros((1, 1, 4), np.float32),
            )
        )()["params"]
    )
    params = _overlay(jax.device_get(params), loaded, src)
    config_json = json.loads(config.to_json_best_effort())
    # Marks an imported model: its region tower is untrained (a teacher then embeds crops).
    config_json["converted"] = dict(format=source_format, src=src)
    checkpointing.save_params(out, params, config_json)
    return config_json


def _overlay(params: dict, loaded: dict, src: str, prefix: str = "") -> dict:
    out = dict(params)
    for key, value in loaded.items():
        if key not in params:
            raise ValueError(f"{src}: {prefix}{key} has no place in the model")
        if isinstance(value, dict):
            out[key] = _overlay(params[key], value, src, f"{prefix}{key}/")
        elif np.shape(params[key]) != np.shape(value):
            raise ValueError(
                f"{src}: {prefix}{key} has shape {np.shape(value)}, the model "
                f"{np.shape(params[key])}"
            )
        else:
            out[key] = np.asarray(value, np.float32)
    return out
