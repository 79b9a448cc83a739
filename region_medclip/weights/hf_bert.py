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

from region_medclip.weights import tensors

# Also reached as hf_bert.checkpoint_file / hf_bert.read_state_dict.
checkpoint_file = tensors.checkpoint_file
read_state_dict = tensors.read_state_dict

# Checkpoint tensors our tower has no use for: BERT's NSP pooler and non-parameter buffers.
_UNUSED = re.compile(r"^(pooler\.|embeddings\.position_ids$)")


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
    # Stored dtype kept: open_clip passes its BERT tensors through unconverted.
    reader = tensors.StateReader(_strip_prefix(state), source, dtype=None)
    width = reader.take("embeddings.word_embeddings.weight").shape[1]
    params = {
        "word_embeddings": {"embedding": reader.take("embeddings.word_embeddings.weight")},
        "position_embeddings": {"embedding": reader.take("embeddings.position_embeddings.weight")},
        "token_type_embeddings": {
            "embedding": reader.take("embeddings.token_type_embeddings.weight")
        },
        "ln_embed": reader.norm("embeddings.LayerNorm"),
    }
    for i in range(depth):
        layer = f"encoder.layer.{i}"
        out = reader.linear(f"{layer}.attention.output.dense")
        qkv = [reader.linear(f"{layer}.attention.self.{n}") for n in ("query", "key", "value")]
        params[f"block{i}"] = {
            "attn": tensors.attention(qkv, out, width, heads),
            "ln_attn": reader.norm(f"{layer}.attention.output.LayerNorm"),
            "mlp": {
                "fc1": reader.dense(f"{layer}.intermediate.dense"),
                "fc2": reader.dense(f"{layer}.output.dense"),
            },
            "ln_mlp": reader.norm(f"{layer}.output.LayerNorm"),
        }
    reader.check_all_used(lambda k: bool(_UNUSED.match(k)), f"a {depth}-layer BERT")
    return params


def load(path: str) -> tuple[dict, dict]:
    """``(BertText kwargs, params without proj)`` from a checkpoint directory or file."""
    file = checkpoint_file(path)
    kwargs = bert_config(path)
    params = to_bert_params(
        read_state_dict(file), depth=kwargs["depth"], heads=kwargs["heads"], source=file
    )
    return kwargs, params
