"""open_clip checkpoints (ViT image tower + CLIP text tower, e.g. ViT-B-16) → our ``RegionCLIP``.

An open_clip ``.pt``/``.bin``/``.safetensors`` state dict carries no architecture, so the model
config comes beside it: open_clip's model-config JSON (``{"embed_dim", "vision_cfg",
"text_cfg", "quick_gelu"}``, as in ``open_clip/model_configs/ViT-B-16.json``) given as a path, or
a model name looked up in an installed open_clip.
"""

import json
import os

import numpy as np

from region_medclip.weights import hf_bert


def open_clip_config(model_config: str) -> dict:
    """The open_clip model config from a JSON file or, with open_clip installed, a model name."""
    if os.path.isfile(model_config):
        with open(model_config) as f:
            return json.load(f)
    try:
        import open_clip
    except ImportError as err:
        raise FileNotFoundError(
            f"--model_config={model_config}: not a file, and open_clip is not installed to "
            "look the name up"
        ) from err
    found = open_clip.get_model_config(model_config)
    if found is None:
        raise ValueError(f"--model_config={model_config}: open_clip has no such model")
    return found


def model_config(oc: dict) -> dict:
    """``config.model`` fields (image, text, embed_dim) and the image size of an open_clip
    model config."""
    vision, text = oc["vision_cfg"], oc["text_cfg"]
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise ValueError(
            "timm image towers and HF text towers (BiomedCLIP) are not supported by this importer"
        )
    act = "quick_gelu" if oc.get("quick_gelu") else "gelu"
    width = vision["width"]
    head_width = vision.get("head_width", 64)
    text_width = text.get("width", 512)
    image = dict(
        variant="B/16",  # every size below overrides the variant's
        width=width,
        depth=vision["layers"],
        heads=width // head_width,
        mlp_dim=int(width * vision.get("mlp_ratio", 4.0)),
        patch=vision["patch_size"],
        pool="cls",
        act=act,
    )
    text_tower = dict(
        kind="clip",
        variant="B",
        vocab_size=text.get("vocab_size", 49408),
        context_len=text.get("context_length", 77),
        width=text_width,
        depth=text.get("layers", 12),
        heads=text.get("heads", 8),
        mlp_dim=int(text_width * text.get("mlp_ratio", 4.0)),
        act=act,
        eot="argmax",  # open_clip pools at the highest id (the CLIP BPE's end of text)
    )
    return dict(
        image=image, text=text_tower, embed_dim=oc["embed_dim"], image_size=vision["image_size"]
    )


def _encoder(take, prefix: str, depth: int, width: int, heads: int) -> dict:
    head_dim = width // heads

    def norm(name):
        return {"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")}

    def dense(name):
        return {"kernel": take(f"{name}.weight").T, "bias": take(f"{name}.bias")}

    blocks = {}
    for i in range(depth):
        block = f"{prefix}.resblocks.{i}"
        # PyTorch's MultiheadAttention packs q, k and v into one [3W, W] projection.
        qkv_w = np.split(take(f"{block}.attn.in_proj_weight"), 3)
        qkv_b = np.split(take(f"{block}.attn.in_proj_bias"), 3)
        attn = {
            name: {
                "kernel": w.T.reshape(width, heads, head_dim),
                "bias": b.reshape(heads, head_dim),
            }
            for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True)
        }
        attn["out"] = {
            "kernel": take(f"{block}.attn.out_proj.weight").T.reshape(heads, head_dim, width),
            "bias": take(f"{block}.attn.out_proj.bias"),
        }
        blocks[f"block{i}"] = {
            "ln_1": norm(f"{block}.ln_1"),
            "attn": attn,
            "ln_2": norm(f"{block}.ln_2"),
            "mlp": {"fc1": dense(f"{block}.mlp.c_fc"), "fc2": dense(f"{block}.mlp.c_proj")},
        }
    return blocks


def to_params(state: dict[str, np.ndarray], config: dict, source: str = "checkpoint") -> dict:
    """Maps an open_clip ``CLIP`` state dict onto our towers and ``logit_scale``.

    Raises:
      KeyError / ValueError: naming the missing or unused tensor and ``source``.
    """
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    state = {k.removeprefix("module."): v for k, v in state.items()}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise KeyError(f"{source}: tensor {key!r} is missing")
        used.add(key)
        return np.asarray(state[key], np.float32)

    def norm(name):
        return {"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")}

    image, text = config["image"], config["text"]
    params = {
        "image_tower": {
            "patch_embed": {"kernel": take("visual.conv1.weight").transpose(2, 3, 1, 0)},
            "class_embedding": take("visual.class_embedding"),
            "pos_embedding": take("visual.positional_embedding"),
            "ln_pre": norm("visual.ln_pre"),
            "encoder": _encoder(
                take, "visual.transformer", image["depth"], image["width"], image["heads"]
            ),
            "ln_post": norm("visual.ln_post"),
            "proj": {"kernel": take("visual.proj")},  # already [width, embed_dim]
        },
        "text_tower": {
            "token_embedding": {"embedding": take("token_embedding.weight")},
            "pos_embedding": take("positional_embedding"),
            "encoder": _encoder(take, "transformer", text["depth"], text["width"], text["heads"]),
            "ln_final": norm("ln_final"),
            "proj": {"kernel": take("text_projection")},
        },
        "logit_scale": take("logit_scale").reshape(()),
    }
    left = sorted(k for k in state if k not in used and k != "attn_mask")
    if left:
        raise ValueError(f"{source}: tensors not used by this CLIP: {left[:5]}")
    return params


def load(path: str, model_config_arg: str) -> tuple[dict, dict]:
    """``(model config fields, params)`` from an open_clip checkpoint file and its model
    config (JSON path or model name)."""
    file = hf_bert.checkpoint_file(path)
    config = model_config(open_clip_config(model_config_arg))
    return config, to_params(hf_bert.read_state_dict(file), config, source=file)
