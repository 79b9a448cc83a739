"""open_clip import (``region_medclip.weights.open_clip``): open_clip's CLIP and BiomedCLIP's
architecture (timm ViT + HF BERT), random and small, converted, give open_clip's embeddings; our
CLIP BPE tokenizer gives open_clip's ids."""

import json
import os

import numpy as np
import pytest
from weights_fixtures import SENTENCES, minilm_dir

import region_medclip
from conftest import require_peer


def _varied_strings() -> list[str]:
    rng = np.random.default_rng(0)
    fixed = [
        "",
        "a",
        "A photo of a DOG.",
        "café naïve résumé — “quoted” ‘text’…",
        "肺结节 右上叶 胸腔积液",
        "Röntgen: kein Pneumothorax, keine Ergüsse.",
        "emoji 🫁🩻 and symbols ±×÷≤≥ µm",
        "&amp; &lt;tag&gt; html entities &quot;",
        "   leading and   repeated   spaces\tand\ttabs\nnewlines  ",
        "numbers 1234567890 3.14 1e-4 50% 2:30pm",
        "hyphen-ated words, co-operate, x-ray, ct/mri",
        "ALLCAPS FINDINGS: NO ACUTE PROCESS.",
        "don't can't won't it's they're",
        "mojibake Ã©tÃ© ftfy fixes",
        "Ｆｕｌｌｗｉｄｔｈ ｃｈａｒａｃｔｅｒｓ",
        " ".join(SENTENCES),  # long: truncated at the context length
        "word " * 100,
    ]
    words = SENTENCES + fixed[2:14]
    mixed = []
    for _ in range(100 - len(fixed) - len(SENTENCES)):
        picks = rng.choice(len(words), size=rng.integers(1, 6))
        mixed.append(" ".join(words[i] for i in picks))
    return fixed + SENTENCES + mixed


@pytest.mark.parity
def test_clip_bpe_ids_equal_open_clip_tokenizer():
    open_clip = require_peer("open_clip")
    from region_medclip.data import tokenizers

    texts = _varied_strings()
    assert len(texts) == 100
    ours = tokenizers.clip_bpe()(texts, 77)
    theirs = open_clip.tokenize(texts, context_length=77).numpy()
    for text, a, b in zip(texts, ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=repr(text))


def _random_open_clip(torch, open_clip, oc_config: dict):
    """open_clip's ``CLIP`` of ``oc_config``, random, with non-trivial LayerNorms (so a swapped
    scale/bias shows)."""
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(
        embed_dim=oc_config["embed_dim"],
        vision_cfg=open_clip.model.CLIPVisionCfg(**oc_config["vision_cfg"]),
        text_cfg=open_clip.model.CLIPTextCfg(**oc_config["text_cfg"]),
        quick_gelu=oc_config["quick_gelu"],
    ).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return reference


@pytest.mark.parity
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_embeddings_equal_open_clip(tmp_path, quick_gelu):
    torch = require_peer("torch")
    open_clip = require_peer("open_clip")
    from region_medclip.weights import convert

    oc_config = dict(
        embed_dim=16,
        quick_gelu=quick_gelu,
        vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2),
    )
    reference = _random_open_clip(torch, open_clip, oc_config)
    torch.save(reference.state_dict(), tmp_path / "oc.pt")
    (tmp_path / "oc.json").write_text(json.dumps(oc_config))
    convert.convert_open_clip(
        str(tmp_path / "oc.pt"), str(tmp_path / "out"), str(tmp_path / "oc.json")
    )
    model = region_medclip.load(str(tmp_path / "out"))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(1, 98, size=(2, 16))
    tokens[:, 7], tokens[:, 8:] = 99, 0  # end of text (the highest id), then padding
    with torch.no_grad():
        expected_img = reference.encode_image(
            torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True
        )
        expected_txt = reference.encode_text(torch.from_numpy(tokens), normalize=True)
    np.testing.assert_allclose(model.encode_image(images), expected_img.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        model.encode_text(tokens.astype(np.int32)), expected_txt.numpy(), atol=1e-4
    )
    state = reference.state_dict()
    del state["ln_final.bias"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(KeyError, match=r"broken.pt: tensor 'ln_final.bias' is missing"):
        convert.convert_open_clip(
            str(tmp_path / "broken.pt"), str(tmp_path / "o2"), str(tmp_path / "oc.json")
        )


def _biomedclip_configs(text_dir) -> tuple[dict, dict]:
    """BiomedCLIP's open_clip ``(vision_cfg, text_cfg)`` at small size: a timm ViT-Tiny with
    token pooling and a linear head; an HF BERT (at ``text_dir``) with CLS pooling and an MLP
    projection. ``text_dir`` gets a 2-layer BertConfig and MiniLM's tokenizer."""
    import shutil

    from transformers import BertConfig

    BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    ).save_pretrained(text_dir)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_dir(), name), text_dir)
    vision_cfg = dict(
        timm_model_name="vit_tiny_patch16_224",
        timm_model_pretrained=False,
        timm_pool="",
        timm_proj="linear",
        image_size=224,
    )
    text_cfg = dict(
        hf_model_name="microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        hf_tokenizer_name="microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        hf_proj_type="mlp",
        hf_pooler_type="cls_last_hidden_state_pooler",
        context_length=64,
    )
    return vision_cfg, text_cfg


def _random_biomedclip(torch, vision_cfg: dict, text_cfg: dict, text_dir):
    """open_clip's ``CustomTextCLIP`` with the text tower read from ``text_dir``, random."""
    from open_clip.model import CustomTextCLIP

    local_text_cfg = {**text_cfg, "hf_model_name": str(text_dir), "hf_model_pretrained": False}
    torch.manual_seed(0)
    reference = CustomTextCLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=local_text_cfg).eval()
    # Random LayerNorms and biases: an identity LayerNorm or a zero bias would hide a swap.
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name.lower() or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return reference


@pytest.mark.parity
def test_biomedclip_architecture_equals_open_clip(tmp_path):
    """BiomedCLIP's architecture at small size, random: open_clip's CustomTextCLIP with a timm ViT
    image tower (token pool, linear head) and an HF BERT text tower (CLS pooling, MLP
    projection). Converted with the hub-style open_clip_config.json and a local text directory,
    our image and text embeddings equal open_clip's within 1e-4 and the tokenizer gives
    open_clip's HFTokenizer ids."""
    torch = require_peer("torch")
    require_peer("timm")
    from open_clip.tokenizer import HFTokenizer

    from region_medclip.weights import convert

    text_dir = tmp_path / "biomedbert"
    vision_cfg, text_cfg = _biomedclip_configs(text_dir)
    config_file = tmp_path / "open_clip_config.json"
    config_file.write_text(
        json.dumps(dict(model_cfg=dict(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg)))
    )
    reference = _random_biomedclip(torch, vision_cfg, text_cfg, text_dir)
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")

    stored = convert.convert_open_clip(
        str(tmp_path / "open_clip_pytorch_model.bin"),
        str(tmp_path / "out"),
        str(config_file),
        hf_text_dir=str(text_dir),
    )
    assert stored["model"]["text"]["kind"] == "bert" and stored["data"]["text_len"] == 64
    model = region_medclip.load(str(tmp_path / "out"))

    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    texts = ["Right lower lobe consolidation.", "No pneumothorax; heart size is normal."]
    ids = model.tokenizer(texts, 64)
    expected_ids = HFTokenizer(str(text_dir), context_length=64)(texts).numpy()
    np.testing.assert_array_equal(ids, expected_ids)
    with torch.no_grad():
        zimg = reference.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True)
        ztxt = reference.encode_text(torch.from_numpy(expected_ids), normalize=True)
    np.testing.assert_allclose(model.encode_image(images), zimg.numpy(), atol=1e-4)
    np.testing.assert_allclose(model.encode_text(texts), ztxt.numpy(), atol=1e-4)

    # Without a local text directory the error says what to pass.
    with pytest.raises(FileNotFoundError, match="hf_text_dir"):
        convert.convert_open_clip(
            str(tmp_path / "open_clip_pytorch_model.bin"), str(tmp_path / "x"), str(config_file)
        )
