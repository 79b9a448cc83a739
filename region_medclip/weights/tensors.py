"""Reading PyTorch state dicts into our Flax param trees: the layouts every importer shares.

PyTorch and Flax store the same weights in different layouts:

* ``nn.Linear`` weight ``[out, in]`` → Flax ``Dense`` kernel ``[in, out]`` (a transpose);
* attention projections, whose Flax ``MultiHeadDotProductAttention`` kernels split the head
  axis out: query/key/value ``[W_out, W_in]`` → ``[W_in, heads, head_dim]`` with the bias
  ``[W_out]`` → ``[heads, head_dim]``, the output projection ``[W_out, W_in]`` →
  ``[heads, head_dim, W_out]``;
* a fused q/k/v projection (PyTorch's ``MultiheadAttention.in_proj_*``, timm's ``attn.qkv``)
  ``[3 W, W]`` → three ``[W, W]`` projections, in the order query, key, value;
* ``nn.Conv2d`` weight ``[out, in, kh, kw]`` → Flax ``Conv`` kernel ``[kh, kw, in, out]``;
* ``nn.LayerNorm`` ``weight``/``bias`` ``[W]`` → Flax ``scale``/``bias`` ``[W]``.

A :class:`StateReader` hands out tensors by name and remembers which it handed out, so an
importer can insist that a checkpoint has every tensor it needs and no tensor it ignores: both
are errors naming the tensor and the file it came from.
"""

import os
from collections.abc import Callable, Iterable

import numpy as np


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
    """Tensors of a safetensors or PyTorch (.bin/.pt) file as numpy arrays, keyed as in the file.

    PyTorch tensors come back as float32; safetensors keep their stored dtype.
    """
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(path)
    else:
        import torch  # PyTorch pickles need torch; weights_only refuses arbitrary code

        loaded = torch.load(path, map_location="cpu", weights_only=True)
        loaded = loaded.get("state_dict", loaded)
        tensors = {k: v.float().numpy() for k, v in loaded.items()}
    return {k: np.asarray(v) for k, v in tensors.items()}


class StateReader:
    """Tensors of a state dict by name, with a record of the names taken.

    Args:
      state: tensor name → array, as in the checkpoint.
      source: where ``state`` came from (a file path); every error names it.
      dtype: the dtype :meth:`take` converts to, or ``None`` to hand out the stored arrays.
    """

    def __init__(
        self,
        state: dict[str, np.ndarray],
        source: str = "checkpoint",
        dtype: type | None = np.float32,
    ):
        self.state = state
        self.source = source
        self.dtype = dtype
        self.used: set[str] = set()

    def take(self, key: str) -> np.ndarray:
        """The tensor ``key``, shape as stored.

        Raises:
          KeyError: ``"{source}: tensor '{key}' is missing"``.
        """
        if key not in self.state:
            raise KeyError(f"{self.source}: tensor {key!r} is missing")
        self.used.add(key)
        value = self.state[key]
        return value if self.dtype is None else np.asarray(value, self.dtype)

    def mark_used(self, keys: Iterable[str]) -> None:
        """Counts ``keys`` as used (tensors read through another reader)."""
        self.used.update(keys)

    def norm(self, name: str) -> dict:
        """LayerNorm ``{name}.weight`` / ``{name}.bias`` ``[W]`` → ``{"scale", "bias"}`` ``[W]``."""
        return {"scale": self.take(f"{name}.weight"), "bias": self.take(f"{name}.bias")}

    def dense(self, name: str) -> dict:
        """``nn.Linear`` ``{name}.weight`` ``[out, in]`` and ``.bias`` ``[out]`` → a Flax
        ``Dense``'s ``{"kernel": [in, out], "bias": [out]}``."""
        return {
            "kernel": linear_kernel(self.take(f"{name}.weight")),
            "bias": self.take(f"{name}.bias"),
        }

    def linear(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``({name}.weight [out, in], {name}.bias [out])``, in PyTorch layout."""
        return self.take(f"{name}.weight"), self.take(f"{name}.bias")

    def check_all_used(self, ignore: Callable[[str], bool], what: str) -> None:
        """Raises unless every tensor was taken, marked used, or is one ``ignore`` accepts.

        Raises:
          ValueError: ``"{source}: tensors not used by {what}: [first five names]"``.
        """
        left = sorted(k for k in self.state if k not in self.used and not ignore(k))
        if left:
            raise ValueError(f"{self.source}: tensors not used by {what}: {left[:5]}")


def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """``nn.Linear`` weight ``[out, in]`` → Flax ``Dense`` kernel ``[in, out]``."""
    return weight.T


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """``nn.Conv2d`` weight ``[out, in, kh, kw]`` → Flax ``Conv`` kernel ``[kh, kw, in, out]``."""
    return weight.transpose(2, 3, 1, 0)


def split_qkv(weight: np.ndarray, bias: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fused projection, weight ``[3 W, W]`` and bias ``[3 W]`` → ``[(weight [W, W], bias
    [W])]`` for query, key and value, in that order (PyTorch's ``in_proj``, timm's ``qkv``)."""
    return list(zip(np.split(weight, 3), np.split(bias, 3), strict=True))


def attention_in(weight: np.ndarray, bias: np.ndarray, width: int, heads: int) -> dict:
    """A query/key/value ``nn.Linear``, weight ``[W, W]`` and bias ``[W]`` → Flax
    ``{"kernel": [W, heads, W / heads], "bias": [heads, W / heads]}``."""
    head_dim = width // heads
    return {
        "kernel": weight.T.reshape(width, heads, head_dim),
        "bias": bias.reshape(heads, head_dim),
    }


def attention_out(weight: np.ndarray, bias: np.ndarray, width: int, heads: int) -> dict:
    """The output ``nn.Linear``, weight ``[W, W]`` and bias ``[W]`` → Flax
    ``{"kernel": [heads, W / heads, W], "bias": [W]}``."""
    return {"kernel": weight.T.reshape(heads, width // heads, width), "bias": bias}


def attention(
    qkv: Iterable[tuple[np.ndarray, np.ndarray]],
    out: tuple[np.ndarray, np.ndarray],
    width: int,
    heads: int,
) -> dict:
    """Flax ``MultiHeadDotProductAttention`` params ``{"query", "key", "value", "out"}`` from
    three ``(weight [W, W], bias [W])`` projections in PyTorch layout and the output one."""
    params = {
        name: attention_in(w, b, width, heads)
        for name, (w, b) in zip(("query", "key", "value"), qkv, strict=True)
    }
    params["out"] = attention_out(*out, width, heads)
    return params


def pre_norm_block(
    reader: StateReader, *, ln_1: str, attn: dict, ln_2: str, fc1: str, fc2: str
) -> dict:
    """One pre-LayerNorm transformer block of our ViT / CLIP text encoder: the LayerNorms and
    MLP Linears named in the checkpoint, and ``attn`` (see :func:`attention`)."""
    return {
        "ln_1": reader.norm(ln_1),
        "attn": attn,
        "ln_2": reader.norm(ln_2),
        "mlp": {"fc1": reader.dense(fc1), "fc2": reader.dense(fc2)},
    }
