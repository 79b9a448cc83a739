"""HF BERT-family checkpoints (BERT, PubMedBERT, BioClinicalBERT, CXR-BERT, MiniLM) → the params
of our ``BertText`` tower (``models/text.py``).

Read from disk only: a directory holding ``model.safetensors`` or ``pytorch_model.bin`` (and
``config.json``), or one such file. Every tensor our tower needs must be present with the
expected shape, and every tensor of the checkpoint must be used or known to be unused (the
pooler, buffers): a mismatch is an error naming the tensor and the file.
"""

import json
import os
import re

import numpy as np

# Checkpoint tensors our tower has no use for: BERT's NSP pooler and non-parameter buffers.
_UNUSED = re.compile(r"^(pooler\.|embeddings\.position_ids$)")


def checkpoint_file(path: str) -> str:
    """The weights file of ``path`` (a file, or a directory with safetensors or a .bin)."""
    if os.path.isfile(path):
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a safetensors or PyTorch (.bin/.pt) file as float32 numpy arrays, keyed as in
    the file."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(path)
    else:
        import torch  # PyTorch pickles need torch; weights_only refuses arbitrary code

        loaded = torch.load(path, map_location="cpu", weights_only=True)
        loaded = loaded.get("state_dict", loaded)
        tensors = {k: v.float().numpy() for k, v in loaded.items()}
    return {k: np.asarray(v) for k, v in tensors.items()}


def bert_config(path: str) -> dict:
    """Our ``BertText`` constructor arguments from a checkpoint directory's ``config.json``."""
    file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    with open(file) as f:
        hf = json.load(f)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{file}: position_embedding_type {hf['position_embedding_type']!r}")
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh"}.get(hf.get("hidden_act", "gelu"))
    if act is None:
        raise ValueError(f"{file}: hidden_act {hf['hidden_act']!r} is not supported")
    return dict(
        vocab_size=hf["vocab_size"],
        context_len=hf["max_position_embeddings"],
        width=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_id=hf.get("pad_token_id", 0) or 0,
        act=act,
        ln_eps=hf.get("layer_norm_eps", 1e-12),
    )


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # BertForMaskedLM & co. store the encoder under "bert."; BertModel stores it bare.
    if any(k.startswith("bert.") for k in state):
        return {k[len("bert.") :]: v for k, v in state.items() if k.startswith("bert.")}
    return state


def to_bert_params(
    state: dict[str, np.ndarray], *, depth: int, heads: int, source: str = "checkpoint"
) -> dict:
    """Maps a BERT state dict onto ``BertText``'s param tree (without ``proj``, the joint-space
    projection that BERT does not have).

    Linear weights are ``[out, in]`` in PyTorch and ``[in, out]`` (``[in, heads, head_dim]`` for
    attention) here.

    Raises:
      KeyError / ValueError: naming the missing, unused or mis-shaped tensor and ``source``.
    """
    state = _strip_prefix(state)
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise KeyError(f"{source}: tensor {key!r} is missing")
        used.add(key)
        return state[key]

    width = take("embeddings.word_embeddings.weight").shape[1]
    head_dim = width // heads

    def dense(prefix):
        return {"kernel": take(f"{prefix}.weight").T, "bias": take(f"{prefix}.bias")}

    def norm(prefix):
        return {"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}

    def attention_in(prefix):
        w, b = take(f"{prefix}.weight"), take(f"{prefix}.bias")
        return {"kernel": w.T.reshape(width, heads, head_dim), "bias": b.reshape(heads, head_dim)}

    params = {
        "word_embeddings": {"embedding": take("embeddings.word_embeddings.weight")},
        "position_embeddings": {"embedding": take("embeddings.position_embeddings.weight")},
        "token_type_embeddings": {"embedding": take("embeddings.token_type_embeddings.weight")},
        "ln_embed": norm("embeddings.LayerNorm"),
    }
    for i in range(depth):
        layer = f"encoder.layer.{i}"
        out_w = take(f"{layer}.attention.output.dense.weight")
        params[f"block{i}"] = {
            "attn": {
                "query": attention_in(f"{layer}.attention.self.query"),
                "key": attention_in(f"{layer}.attention.self.key"),
                "value": attention_in(f"{layer}.attention.self.value"),
                "out": {
                    "kernel": out_w.T.reshape(heads, head_dim, width),
                    "bias": take(f"{layer}.attention.output.dense.bias"),
                },
            },
            "ln_attn": norm(f"{layer}.attention.output.LayerNorm"),
            "mlp": {
                "fc1": dense(f"{layer}.intermediate.dense"),
                "fc2": dense(f"{layer}.output.dense"),
            },
            "ln_mlp": norm(f"{layer}.output.LayerNorm"),
        }
    left = sorted(k for k in state if k not in used and not _UNUSED.match(k))
    if left:
        raise ValueError(f"{source}: tensors not used by a {depth}-layer BERT: {left[:5]}")
    return params


def load(path: str) -> tuple[dict, dict]:
    """``(BertText kwargs, params without proj)`` from a checkpoint directory or file."""
    file = checkpoint_file(path)
    kwargs = bert_config(path)
    params = to_bert_params(
        read_state_dict(file), depth=kwargs["depth"], heads=kwargs["heads"], source=file
    )
    return kwargs, params
