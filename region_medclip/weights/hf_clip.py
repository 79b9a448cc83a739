"""HF ``CLIPModel`` checkpoints (safetensors or .bin + ``config.json``) → our ``RegionCLIP``.

The image and text towers, both projections and the temperature come from the checkpoint; the
region head (which CLIP does not have) keeps its initial values: an identity LayerNorm in front of
the shared projection ``W_i``, so region embeddings start as CLIP's projected patch features.
"""

import json
import os

import numpy as np

from region_medclip.weights import tensors

_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh"}


def model_config(path: str) -> dict:
    """``config.model`` fields (image, text, embed_dim) of the checkpoint's ``config.json``,
    and the ``eos_token_id`` the text tower pools at."""
    file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    with open(file) as f:
        hf = json.load(f)
    vision, text = hf["vision_config"], hf["text_config"]
    for name, tower in (("vision_config", vision), ("text_config", text)):
        if tower.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
            raise ValueError(f"{file}: {name}.hidden_act {tower['hidden_act']!r} not supported")
    eos = text.get("eos_token_id", 2)
    image = dict(
        variant="B/16",  # every size below overrides the variant's
        width=vision["hidden_size"],
        depth=vision["num_hidden_layers"],
        heads=vision["num_attention_heads"],
        mlp_dim=vision["intermediate_size"],
        patch=vision["patch_size"],
        pool="cls",
        act=_ACTIVATIONS[vision.get("hidden_act", "quick_gelu")],
        ln_eps=vision.get("layer_norm_eps", 1e-5),
    )
    text_tower = dict(
        kind="clip",
        variant="B",
        vocab_size=text["vocab_size"],
        context_len=text["max_position_embeddings"],
        width=text["hidden_size"],
        depth=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        mlp_dim=text["intermediate_size"],
        act=_ACTIVATIONS[text.get("hidden_act", "quick_gelu")],
        ln_eps=text.get("layer_norm_eps", 1e-5),
        # transformers pools the original OpenAI checkpoints (eos id 2 in their config) at the
        # highest id, and all others at the first eos token.
        eot="argmax" if eos == 2 else int(eos),
    )
    return dict(
        image=image,
        text=text_tower,
        embed_dim=hf["projection_dim"],
        image_size=vision["image_size"],
    )


def _encoder(reader: tensors.StateReader, prefix: str, depth: int, width: int, heads: int) -> dict:
    """``{prefix}.encoder.layers.*`` → our ``block{i}`` params (separate q/k/v Linears)."""
    blocks = {}
    for i in range(depth):
        layer = f"{prefix}.encoder.layers.{i}"
        attn = f"{layer}.self_attn"
        blocks[f"block{i}"] = tensors.pre_norm_block(
            reader,
            ln_1=f"{layer}.layer_norm1",
            attn=tensors.attention(
                [reader.linear(f"{attn}.{n}_proj") for n in ("q", "k", "v")],
                reader.linear(f"{attn}.out_proj"),
                width,
                heads,
            ),
            ln_2=f"{layer}.layer_norm2",
            fc1=f"{layer}.mlp.fc1",
            fc2=f"{layer}.mlp.fc2",
        )
    return blocks


def to_params(state: dict[str, np.ndarray], config: dict, source: str = "checkpoint") -> dict:
    """Maps a ``CLIPModel`` state dict onto our image tower, text tower and ``logit_scale``.

    Raises:
      KeyError / ValueError: naming the missing or unused tensor and ``source``.
    """
    reader = tensors.StateReader(state, source)
    take = reader.take
    image, text = config["image"], config["text"]
    vision = "vision_model"
    # The vision LayerNorm before the encoder is spelled "pre_layrnorm" in transformers.
    pre = (
        f"{vision}.pre_layrnorm"
        if f"{vision}.pre_layrnorm.weight" in state
        else f"{vision}.pre_layernorm"
    )
    image_tower = {
        "patch_embed": {
            "kernel": tensors.conv_kernel(take(f"{vision}.embeddings.patch_embedding.weight"))
        },
        "class_embedding": take(f"{vision}.embeddings.class_embedding"),
        "pos_embedding": take(f"{vision}.embeddings.position_embedding.weight"),
        "ln_pre": reader.norm(pre),
        "encoder": _encoder(reader, vision, image["depth"], image["width"], image["heads"]),
        "ln_post": reader.norm(f"{vision}.post_layernorm"),
        "proj": {"kernel": tensors.linear_kernel(take("visual_projection.weight"))},
    }
    text_tower = {
        "token_embedding": {"embedding": take("text_model.embeddings.token_embedding.weight")},
        "pos_embedding": take("text_model.embeddings.position_embedding.weight"),
        "encoder": _encoder(reader, "text_model", text["depth"], text["width"], text["heads"]),
        "ln_final": reader.norm("text_model.final_layer_norm"),
        "proj": {"kernel": tensors.linear_kernel(take("text_projection.weight"))},
    }
    params = {
        "image_tower": image_tower,
        "text_tower": text_tower,
        "logit_scale": take("logit_scale").reshape(()),
    }
    # Buffers (position ids) are not weights.
    reader.check_all_used(lambda k: k.endswith("position_ids"), "this CLIP")
    return params


def load(path: str) -> tuple[dict, dict]:
    """``(model config fields, params of the towers and logit_scale)`` from a checkpoint."""
    file = tensors.checkpoint_file(path)
    config = model_config(path)
    return config, to_params(tensors.read_state_dict(file), config, source=file)
