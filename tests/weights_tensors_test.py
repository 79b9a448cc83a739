"""The PyTorch → Flax layouts of ``region_medclip.weights.tensors``, on hand-made arrays."""

import re

import numpy as np
import pytest

from conftest import require_peer
from region_medclip.weights import tensors


def test_linear_and_conv_kernels_are_transposed():
    w = np.arange(6.0).reshape(2, 3)  # [out 2, in 3]
    np.testing.assert_array_equal(tensors.linear_kernel(w), [[0, 3], [1, 4], [2, 5]])
    conv = np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)  # [out, in, kh, kw]
    kernel = tensors.conv_kernel(conv)
    assert kernel.shape == (4, 5, 3, 2)  # [kh, kw, in, out]
    assert kernel[1, 2, 0, 1] == conv[1, 0, 1, 2]


def test_split_qkv_gives_query_key_value_in_order():
    width = 4
    w = np.arange(3 * width * width, dtype=np.float32).reshape(3 * width, width)
    b = np.arange(3 * width, dtype=np.float32)
    parts = tensors.split_qkv(w, b)
    assert [(pw.shape, pb.shape) for pw, pb in parts] == [((width, width), (width,))] * 3
    for i, (pw, pb) in enumerate(parts):
        np.testing.assert_array_equal(pw, w[i * width : (i + 1) * width])
        np.testing.assert_array_equal(pb, b[i * width : (i + 1) * width])


def test_attention_splits_heads_out_of_the_kernels():
    width, heads = 4, 2
    rng = np.random.default_rng(0)
    qkv = [(rng.normal(size=(width, width)), rng.normal(size=width)) for _ in range(3)]
    out = (rng.normal(size=(width, width)), rng.normal(size=width))
    params = tensors.attention(qkv, out, width, heads)
    assert set(params) == {"query", "key", "value", "out"}
    for name, (w, b) in zip(("query", "key", "value"), qkv, strict=True):
        assert params[name]["kernel"].shape == (width, heads, width // heads)
        assert params[name]["bias"].shape == (heads, width // heads)
        # Flax kernel [in, head, d] is torch weight [head * d_out + d, in], transposed.
        np.testing.assert_array_equal(params[name]["kernel"][3, 1, 0], w[1 * 2 + 0, 3])
        np.testing.assert_array_equal(params[name]["bias"].reshape(-1), b)
    assert params["out"]["kernel"].shape == (heads, width // heads, width)
    np.testing.assert_array_equal(params["out"]["kernel"][1, 0, 3], out[0][3, 1 * 2 + 0])
    np.testing.assert_array_equal(params["out"]["bias"], out[1])
    x = rng.normal(size=width)  # the projections compute what torch's Linear does
    np.testing.assert_allclose(
        np.einsum("i,ihd->hd", x, params["key"]["kernel"]).reshape(-1) + qkv[1][1],
        qkv[1][0] @ x + qkv[1][1],
    )


def test_reader_takes_norms_and_dense_layers_and_names_missing_keys():
    state = {
        "ln.weight": np.ones(3, np.float64),
        "ln.bias": np.zeros(3),
        "fc.weight": np.arange(6.0).reshape(2, 3),
        "fc.bias": np.array([1.0, 2.0]),
        "buffer": np.zeros(1),
    }
    reader = tensors.StateReader(state, source="m.safetensors")
    norm = reader.norm("ln")
    assert set(norm) == {"scale", "bias"} and norm["scale"].dtype == np.float32
    dense = reader.dense("fc")
    np.testing.assert_array_equal(dense["kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(dense["bias"], [1.0, 2.0])
    assert tensors.StateReader(state, dtype=None).take("ln.weight").dtype == np.float64
    with pytest.raises(KeyError, match=r"m.safetensors: tensor 'fc.kernel' is missing"):
        reader.take("fc.kernel")
    with pytest.raises(ValueError, match=r"m.safetensors: tensors not used by a test: \['buffer'"):
        reader.check_all_used(lambda k: False, "a test")
    reader.check_all_used(lambda k: k == "buffer", "a test")
    reader.mark_used(["buffer"])
    reader.check_all_used(lambda k: False, "a test")


def test_checkpoint_file_names_the_directory_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no model.safetensors")):
        tensors.checkpoint_file(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert tensors.checkpoint_file(str(tmp_path)) == str(tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").write_bytes(b"")  # preferred over the .bin
    assert tensors.checkpoint_file(str(tmp_path)) == str(tmp_path / "model.safetensors")


def test_read_state_dict_reads_torch_pickles_and_safetensors(tmp_path):
    """A ``.bin``'s tensors (also under a Lightning-style ``state_dict`` key) become float32
    arrays; a ``.safetensors`` file keeps its stored dtype."""
    torch = require_peer("torch")
    from safetensors.numpy import save_file

    weight = np.arange(6, dtype=np.float64).reshape(2, 3)
    torch.save({"fc.weight": torch.from_numpy(weight)}, tmp_path / "plain.bin")
    torch.save({"state_dict": {"fc.weight": torch.from_numpy(weight)}}, tmp_path / "wrapped.bin")
    for name in ("plain.bin", "wrapped.bin"):
        state = tensors.read_state_dict(str(tmp_path / name))
        assert set(state) == {"fc.weight"} and state["fc.weight"].dtype == np.float32, name
        np.testing.assert_array_equal(state["fc.weight"], weight)
    save_file({"fc.weight": weight.astype(np.float16)}, str(tmp_path / "m.safetensors"))
    state = tensors.read_state_dict(str(tmp_path / "m.safetensors"))
    assert state["fc.weight"].dtype == np.float16
    np.testing.assert_array_equal(state["fc.weight"], weight)


def test_pre_norm_block_names_our_params():
    width = 2
    state = {f"{n}.{p}": np.ones(width) for n in ("n1", "n2") for p in ("weight", "bias")}
    state |= {"up.weight": np.ones((4, width)), "up.bias": np.zeros(4)}
    state |= {"down.weight": np.ones((width, 4)), "down.bias": np.zeros(width)}
    reader = tensors.StateReader(state)
    block = tensors.pre_norm_block(reader, ln_1="n1", attn={}, ln_2="n2", fc1="up", fc2="down")
    assert set(block) == {"ln_1", "attn", "ln_2", "mlp"}
    assert block["mlp"]["fc1"]["kernel"].shape == (width, 4)
    assert block["mlp"]["fc2"]["kernel"].shape == (4, width)
    reader.check_all_used(lambda k: False, "a block")  # every tensor was taken
