"""Imports pretrained weights from local files:
``python -m region_medclip.convert --format=hf_clip --src=DIR --out=DIR``, or
``--format=open_clip --src=FILE.pt --model_config=ViT-B-16 --out=DIR``.

The output is a checkpoint directory of this project (params + the config that builds the model)
that ``config.model.init_from``, ``config.teacher.init_from`` and ``region_medclip.load`` accept.
Nothing is downloaded: ``--src`` is a directory with ``config.json`` and ``model.safetensors``
(or ``pytorch_model.bin``), e.g. what ``CLIPModel.save_pretrained`` writes.
"""

import json

from absl import app, flags

FORMATS = ("hf_clip", "open_clip")


def _define_flags() -> None:
    # Defined only when run as a program: tests import this module beside other CLIs.
    flags.DEFINE_enum("format", None, list(FORMATS), "Checkpoint format of --src.")
    flags.DEFINE_string("src", None, "Checkpoint directory or file.")
    flags.DEFINE_string("out", None, "Output directory (a checkpoint of this project).")
    flags.DEFINE_string(
        "model_config", None, "open_clip: its model-config JSON, or a model name (e.g. ViT-B-16)."
    )


def convert_hf_clip(src: str, out: str) -> dict:
    """Converts an HF ``CLIPModel`` at ``src`` into ``out``; returns the stored config."""
    from region_medclip.weights import hf_clip

    fields, loaded = hf_clip.load(src)
    return _write(fields, loaded, src, out)


def convert_open_clip(src: str, out: str, model_config: str) -> dict:
    """Converts an open_clip checkpoint ``src`` (architecture from ``model_config``, a JSON
    path or a model name) into ``out``; returns the stored config."""
    from region_medclip.weights import open_clip

    fields, loaded = open_clip.load(src, model_config)
    return _write(fields, loaded, src, out)


def _write(fields: dict, loaded: dict, src: str, out: str) -> dict:
    import jax
    import numpy as np
    from flax.core import meta

    from configs import common
    from region_medclip import checkpointing
    from region_medclip.models import clip

    config = common.base_config()
    config.model.image, config.model.text = fields["image"], fields["text"]
    config.model.embed_dim = fields["embed_dim"]
    config.data.image_size = fields["image_size"]
    config.data.text_len = fields["text"]["context_len"]
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
    checkpointing.save_params(out, params, config_json)
    return config_json


def _overlay(params: dict, loaded: dict, src: str, prefix: str = "") -> dict:
    import numpy as np

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


def main(argv):
    del argv
    args = flags.FLAGS
    if args.format == "hf_clip":
        convert_hf_clip(args.src, args.out)
    else:
        if not args.model_config:
            raise app.UsageError("--format=open_clip needs --model_config (JSON path or name)")
        convert_open_clip(args.src, args.out, args.model_config)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["format", "src", "out"])
    app.run(main)
