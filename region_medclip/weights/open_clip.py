"""open_clip checkpoints → our ``RegionCLIP``: the CLIP architecture (open_clip's own ViT image
tower + CLIP text tower, e.g. ViT-B-16) and BiomedCLIP's (a timm ViT image tower + an HF BERT text
tower with an MLP projection, e.g. BiomedCLIP-PubMedBERT_256-vit_base_patch16_224).

An open_clip ``.pt``/``.bin``/``.safetensors`` state dict carries no architecture, so the model
config comes beside it: open_clip's model-config JSON (``{"embed_dim", "vision_cfg",
"text_cfg", "quick_gelu"}``, as in ``open_clip/model_configs/ViT-B-16.json``, or a hub
``open_clip_config.json`` with it under ``model_cfg``) given as a path, or a model name looked up
in an installed open_clip. An HF text tower also needs its BERT ``config.json`` and tokenizer:
the directory ``text_cfg.hf_model_name`` names when it is a local one, or ``hf_text_dir``
(e.g. a local copy of BiomedBERT as ``save_pretrained`` writes it).
"""

import json
import os
import re

import numpy as np

from region_medclip.weights import hf_bert, tensors

# timm ViT names → (width, depth, heads, mlp_dim).
_TIMM_VIT_SIZES = {
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
}
_TIMM_VIT_NAME = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(?:clip_)?(\d+)")


def open_clip_config(model_config: str) -> dict:
    """The open_clip model config from a JSON file or, with open_clip installed, a model name."""
    if os.path.isfile(model_config):
        with open(model_config) as f:
            found = json.load(f)
        # A hub open_clip_config.json wraps the model config with the preprocessing config.
        return found.get("model_cfg", found)
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


def _timm_vision(vision: dict) -> tuple[dict, int]:
    """Our ViT fields and the image size of a timm ViT image tower config."""
    name = vision["timm_model_name"]
    match = _TIMM_VIT_NAME.match(name)
    if not match:
        raise ValueError(
            f"timm image tower {name!r}: only timm's plain ViTs (vit_<size>_patch<P>_<S>)"
        )
    if vision.get("timm_pool", "") not in ("", "token"):
        raise ValueError(
            f"timm image tower {name!r}: timm_pool {vision['timm_pool']!r} (want token)"
        )
    if vision.get("timm_proj", "linear") != "linear" or vision.get("timm_proj_bias"):
        raise ValueError(f"timm image tower {name!r}: only a bias-free linear timm_proj")
    width, depth, heads, mlp_dim = _TIMM_VIT_SIZES[match.group(1)]
    image = dict(
        variant="B/16",  # every size below overrides the variant's
        width=width,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        patch=int(match.group(2)),
        pool="cls",
        act="gelu",
        patch_bias=True,
        ln_pre=False,
        ln_eps=1e-6,
    )
    return image, int(vision.get("image_size", match.group(3)))


def hf_text_dir(text: dict, override: str | None = None) -> str:
    """The directory with an HF text tower's ``config.json`` and tokenizer."""
    path = override or text["hf_model_name"]
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"HF text tower {text['hf_model_name']!r}: no local config.json in {path!r}; pass "
            "--hf_text_dir=DIR, a local copy of that model (its config.json and tokenizer)"
        )
    return path


def _hf_text(text: dict, embed_dim: int, text_dir: str) -> dict:
    """Our BertText fields for an open_clip HF text tower."""
    pool = {"cls_last_hidden_state_pooler": "cls", "mean_pooler": "mean"}.get(
        text.get("hf_pooler_type", "mean_pooler")
    )
    if pool is None:
        raise ValueError(
            f"HF text tower: hf_pooler_type {text['hf_pooler_type']!r} is not supported"
        )
    kind = text.get("hf_proj_type", "mlp")
    if kind not in ("mlp", "linear"):
        raise ValueError(f"HF text tower: hf_proj_type {kind!r} is not supported")
    fields = hf_bert.bert_config(text_dir)
    proj_hidden = (fields["width"] + embed_dim) // 2 if kind == "mlp" else 0
    return dict(kind="bert", variant="base", pool=pool, proj_hidden=proj_hidden, **fields)


def model_config(oc: dict, text_dir: str | None = None) -> dict:
    """``config.model`` fields (image, text, embed_dim), the image size and, for an HF text
    tower, its tokenizer directory (``tokenizer``) of an open_clip model config."""
    vision, text = oc["vision_cfg"], oc["text_cfg"]
    act = "quick_gelu" if oc.get("quick_gelu") else "gelu"
    if vision.get("timm_model_name"):
        image, image_size = _timm_vision(vision)
    else:
        width = vision["width"]
        image = dict(
            variant="B/16",  # every size below overrides the variant's
            width=width,
            depth=vision["layers"],
            heads=width // vision.get("head_width", 64),
            mlp_dim=int(width * vision.get("mlp_ratio", 4.0)),
            patch=vision["patch_size"],
            pool="cls",
            act=act,
        )
        image_size = vision["image_size"]
    out = dict(image=image, embed_dim=oc["embed_dim"], image_size=image_size)
    if text.get("hf_model_name"):
        directory = hf_text_dir(text, text_dir)
        out["text"] = _hf_text(text, oc["embed_dim"], directory)
        # Reports are tokenized to open_clip's context length (BiomedCLIP: 256 of BERT's 512).
        out["text_len"] = min(out["text"]["context_len"], text.get("context_length", 77))
        out["tokenizer"] = directory
        return out
    text_width = text.get("width", 512)
    out["text"] = dict(
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
    return out


def _encoder(reader: tensors.StateReader, prefix: str, depth: int, width: int, heads: int) -> dict:
    """``{prefix}.resblocks.*`` → our ``block{i}`` params."""
    blocks = {}
    for i in range(depth):
        block = f"{prefix}.resblocks.{i}"
        # PyTorch's MultiheadAttention packs q, k and v into one [3W, W] projection.
        qkv = tensors.split_qkv(
            reader.take(f"{block}.attn.in_proj_weight"), reader.take(f"{block}.attn.in_proj_bias")
        )
        out = reader.linear(f"{block}.attn.out_proj")
        blocks[f"block{i}"] = tensors.pre_norm_block(
            reader,
            ln_1=f"{block}.ln_1",
            attn=tensors.attention(qkv, out, width, heads),
            ln_2=f"{block}.ln_2",
            fc1=f"{block}.mlp.c_fc",
            fc2=f"{block}.mlp.c_proj",
        )
    return blocks


def _timm_vit(reader: tensors.StateReader, image: dict) -> dict:
    """A timm ViT (``visual.trunk``, with open_clip's ``visual.head.proj``) → our ViT params."""
    width, heads = image["width"], image["heads"]
    take = reader.take
    blocks = {}
    for i in range(image["depth"]):
        block = f"visual.trunk.blocks.{i}"
        # timm packs q, k and v into one [3W, W] Linear.
        qkv = tensors.split_qkv(*reader.linear(f"{block}.attn.qkv"))
        out = reader.linear(f"{block}.attn.proj")
        blocks[f"block{i}"] = tensors.pre_norm_block(
            reader,
            ln_1=f"{block}.norm1",
            attn=tensors.attention(qkv, out, width, heads),
            ln_2=f"{block}.norm2",
            fc1=f"{block}.mlp.fc1",
            fc2=f"{block}.mlp.fc2",
        )
    return {
        "patch_embed": {
            "kernel": tensors.conv_kernel(take("visual.trunk.patch_embed.proj.weight")),
            "bias": take("visual.trunk.patch_embed.proj.bias"),
        },
        "class_embedding": take("visual.trunk.cls_token").reshape(width),
        "pos_embedding": take("visual.trunk.pos_embed")[0],
        "encoder": blocks,
        "ln_post": reader.norm("visual.trunk.norm"),
        "proj": {"kernel": tensors.linear_kernel(take("visual.head.proj.weight"))},
    }


def _clip_vit(reader: tensors.StateReader, image: dict) -> dict:
    """open_clip's own ViT (``visual.*``) → our ViT params."""
    take = reader.take
    return {
        "patch_embed": {"kernel": tensors.conv_kernel(take("visual.conv1.weight"))},
        "class_embedding": take("visual.class_embedding"),
        "pos_embedding": take("visual.positional_embedding"),
        "ln_pre": reader.norm("visual.ln_pre"),
        "encoder": _encoder(
            reader, "visual.transformer", image["depth"], image["width"], image["heads"]
        ),
        "ln_post": reader.norm("visual.ln_post"),
        "proj": {"kernel": take("visual.proj")},  # already [width, embed_dim]
    }


def _hf_text_tower(reader: tensors.StateReader, text: dict) -> dict:
    """An HF BERT text tower (``text.transformer.*``) with its ``text.proj`` → BertText params."""
    prefix = "text.transformer."
    state = reader.state
    bert_state = {k[len(prefix) :]: state[k] for k in state if k.startswith(prefix)}
    text_tower = hf_bert.to_bert_params(
        bert_state, depth=text["depth"], heads=text["heads"], source=reader.source
    )
    reader.mark_used(prefix + k for k in bert_state)
    if text.get("proj_hidden"):
        # open_clip's MLP projection: Linear (text.proj.0), GELU, Linear (text.proj.2), no biases.
        text_tower["proj_hidden"] = {
            "kernel": tensors.linear_kernel(reader.take("text.proj.0.weight"))
        }
        text_tower["proj"] = {"kernel": tensors.linear_kernel(reader.take("text.proj.2.weight"))}
    else:
        text_tower["proj"] = {"kernel": tensors.linear_kernel(reader.take("text.proj.weight"))}
    return text_tower


def _clip_text_tower(reader: tensors.StateReader, text: dict) -> dict:
    """open_clip's CLIP text tower (top-level ``transformer.*``) → our text tower params."""
    take = reader.take
    return {
        "token_embedding": {"embedding": take("token_embedding.weight")},
        "pos_embedding": take("positional_embedding"),
        "encoder": _encoder(reader, "transformer", text["depth"], text["width"], text["heads"]),
        "ln_final": reader.norm("ln_final"),
        "proj": {"kernel": take("text_projection")},  # already [width, embed_dim]
    }


def to_params(state: dict[str, np.ndarray], config: dict, source: str = "checkpoint") -> dict:
    """Maps an open_clip ``CLIP`` state dict onto our towers and ``logit_scale``.

    Raises:
      KeyError / ValueError: naming the missing or unused tensor and ``source``.
    """
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    state = {k.removeprefix("module."): v for k, v in state.items()}
    reader = tensors.StateReader(state, source)
    image, text = config["image"], config["text"]
    # Our timm-style ViT has no LayerNorm before the encoder (model_config sets ln_pre=False).
    vit = _clip_vit if image.get("ln_pre", True) else _timm_vit
    text_tower = _hf_text_tower if text["kind"] == "bert" else _clip_text_tower
    params = {
        "image_tower": vit(reader, image),
        "text_tower": text_tower(reader, text),
        "logit_scale": reader.take("logit_scale").reshape(()),
    }
    # The text tower's causal mask is a buffer, not a weight.
    reader.check_all_used(lambda k: k == "attn_mask", "this CLIP")
    return params


def load(path: str, model_config_arg: str, text_dir: str | None = None) -> tuple[dict, dict]:
    """``(model config fields, params)`` from an open_clip checkpoint file and its model
    config (JSON path or model name); ``text_dir``: an HF text tower's local directory."""
    file = tensors.checkpoint_file(path)
    config = model_config(open_clip_config(model_config_arg), text_dir)
    return config, to_params(tensors.read_state_dict(file), config, source=file)
