"""Configs that start from a stored checkpoint: its towers, input size and tokenizer.

``init_text_from`` takes a text tower (``convert --format=hf_bert``), ``init_model_from`` a whole
model (a ``convert`` output of a CLIP model, or a workdir of this project).
"""

import ml_collections

from region_medclip import checkpointing


def init_text_from(c: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
    """Starts the text tower of ``c`` from a text-tower checkpoint (``python -m
    region_medclip.convert --format=hf_bert``): takes its tower fields and tokenizer, caps
    ``data.text_len`` / ``data.caption_len`` at its context length and sets
    ``model.init_from``. The image and region towers keep their own config and random init."""
    stored = checkpointing.read_config(path)
    if "partial" not in stored or stored["partial"].get("provides") != ["text_tower"]:
        raise ValueError(f"{path}: not a text-tower checkpoint (convert --format=hf_bert)")
    text = dict(stored["model"]["text"])
    c.model.text = text
    c.data.tokenizer = stored["data"]["tokenizer"]
    c.data.tokenizer_path = stored["data"]["tokenizer_path"]
    c.data.text_len = min(int(c.data.text_len), int(text["context_len"]))
    c.data.caption_len = min(int(c.data.caption_len), int(text["context_len"]))
    c.model.init_from = path
    return c


def init_model_from(c: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
    """Starts every tower of ``c`` from a whole-model checkpoint (a ``convert`` output of a CLIP
    model, or a workdir of this project): takes its image and text towers, joint width, input
    size and tokenizer, and sets ``model.init_from``. The region tower keeps ``c``'s config (a
    converted CLIP has none of its own: it starts from the init)."""
    stored = checkpointing.read_config(path)
    if "partial" in stored:
        raise ValueError(f"{path}: holds only {stored['partial']['provides']}; use init_text_from")
    c.model.image = dict(stored["model"]["image"])
    c.model.text = dict(stored["model"]["text"])
    c.model.embed_dim = int(stored["model"]["embed_dim"])
    for key in ("image_size", "tokenizer", "tokenizer_path", "text_len"):
        c.data[key] = stored["data"][key]
    context = int(c.model.text["context_len"])
    c.data.caption_len = min(int(c.data.caption_len or context), context)
    c.model.init_from = path
    return c


def load_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path``, as ``--config=path:arg`` loads it.

    Config files are experiments, not modules of the library: they are read by path, never
    imported as a package.

    Raises:
      FileNotFoundError: naming the path.
    """
    import importlib.util
    import os

    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
