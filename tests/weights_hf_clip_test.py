"""HF CLIP import (``region_medclip.weights.hf_clip``): a random transformers ``CLIPModel``,
imported, gives transformers' image and text embeddings; ``convert --format=hf_clip`` writes a
model that loads, initialises training, and serves as the distillation teacher."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from weights_fixtures import ROOT, features, hf_clip_config, overlay, tiny_hf_clip, unit

import region_medclip
from conftest import require_peer


def _clip_inputs(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[3, 32, 32, 3]`` and tokens ``[3, 16]``: start of text, words, end of text at
    5, 10 and 15, then padding."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(1, vocab - 2, size=(3, 16))
    tokens[:, 0] = vocab - 2
    for row, end in enumerate((5, 10, 15)):  # eos, then padding
        tokens[row, end], tokens[row, end + 1 :] = vocab - 1, 0
    return images, tokens


@pytest.mark.parity
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_embeddings_equal_transformers(tmp_path, act):
    torch = require_peer("torch")
    from transformers import CLIPModel

    from region_medclip import config as config_lib
    from region_medclip.models import clip
    from region_medclip.weights import hf_clip

    vocab = 100
    config = hf_clip_config(
        vocab_size=vocab, context_len=16, image_width=48, depth=2, pad_token_id=0, hidden_act=act
    )
    torch.manual_seed(0)
    reference = CLIPModel(config).eval()
    reference.save_pretrained(tmp_path)  # model.safetensors + config.json

    fields, params = hf_clip.load(str(tmp_path))
    model_config = config_lib.base_config().model
    model_config.image, model_config.text = fields["image"], fields["text"]
    model_config.embed_dim = fields["embed_dim"]
    model = clip.from_config(model_config)
    images, tokens = _clip_inputs(vocab)
    init = meta.unbox(
        model.init(jax.random.PRNGKey(0), images[:1], tokens[:1], np.zeros((1, 1, 4), np.float32))
    )["params"]
    ours = overlay(init, params)
    zimg, _ = model.apply({"params": ours}, jnp.asarray(images), method=model.encode_image)
    ztxt = model.apply({"params": ours}, jnp.asarray(tokens), method=model.encode_text)
    with torch.no_grad():
        pixel_values = torch.from_numpy(images.transpose(0, 3, 1, 2))
        expected_img = reference.get_image_features(pixel_values=pixel_values)
        expected_txt = reference.get_text_features(input_ids=torch.from_numpy(tokens))
    for name, got, expected in (("image", zimg, expected_img), ("text", ztxt, expected_txt)):
        expected = unit(features(expected))
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, err_msg=name)
    assert float(ours["logit_scale"]) == pytest.approx(reference.logit_scale.item())


def _assert_init_from_takes(out: str, model, reference) -> None:
    """``config.model.init_from=out`` finds every param of the model, with its shape."""
    from region_medclip import train
    from region_medclip.models import clip

    model_config = model.config.model
    shapes = jax.eval_shape(
        lambda: clip.from_config(model_config).init(
            jax.random.PRNGKey(1),
            np.zeros((1, 32, 32, 3), np.float32),
            np.zeros((1, 16), np.int32),
            np.zeros((1, 1, 4), np.float32),
        )
    )["params"]
    loaded = train.load_init_params(out, meta.unbox(shapes))
    assert float(loaded["logit_scale"]) == pytest.approx(reference.logit_scale.item())


@pytest.mark.parity
def test_convert_output_loads_as_a_model_and_as_init_from(tmp_path):
    torch = require_peer("torch")
    import json

    from transformers import CLIPModel

    torch.manual_seed(0)
    reference = CLIPModel(hf_clip_config(vocab_size=100, context_len=16)).eval()
    reference.save_pretrained(tmp_path / "hf")
    # The command line, as README shows it.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "region_medclip.convert",
            "--format=hf_clip",
            f"--src={tmp_path / 'hf'}",
            f"--out={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = json.loads(
        (tmp_path / "out" / "checkpoints" / "0" / "config" / "metadata").read_text()
    )
    assert stored["model"]["text"]["eot"] == 99  # pools at the first eos token, as transformers
    model = region_medclip.load(str(tmp_path / "out"))
    tokens = np.random.default_rng(0).integers(1, 99, size=(2, 16))
    tokens[:, 9] = 99
    tokens[:, 10:] = 0
    with torch.no_grad():
        expected = reference.get_text_features(input_ids=torch.from_numpy(tokens))
    expected = unit(features(expected))
    np.testing.assert_allclose(model.encode_text(tokens.astype(np.int32)), expected, atol=1e-4)
    # config.model.init_from takes it: every param of the model is there with its shape.
    _assert_init_from_takes(str(tmp_path / "out"), model, reference)


def _expected_teacher_logits(torch, reference, concepts, templates, images, boxes, roi_mask):
    """transformers + torchvision: each ROI cropped (``roi_align``) and encoded by CLIP's image
    tower, against each concept's renormalised mean prompt embedding → ``[B, R, concepts]``."""
    import torchvision

    from region_medclip.data import tokenizers

    tokenizer = tokenizers.clip_bpe()
    prompts = [t.format(x) for x in concepts for t in templates]
    with torch.no_grad():
        z = unit(
            features(
                reference.get_text_features(input_ids=torch.from_numpy(tokenizer(prompts, 77)))
            )
        )
        z = unit(z.reshape(len(concepts), len(templates), -1).mean(1))
        pixel_boxes = [torch.from_numpy(b * 32.0) for b in boxes]
        crops = torchvision.ops.roi_align(
            torch.from_numpy(images).permute(0, 3, 1, 2),
            pixel_boxes,
            output_size=32,
            sampling_ratio=2,
            aligned=True,
        )
        zroi = features(reference.get_image_features(pixel_values=crops))
    zroi = unit(zroi)
    return (zroi @ z.T).reshape(*boxes.shape[:2], len(concepts)) * roi_mask[..., None]


@pytest.mark.slow
@pytest.mark.parity
def test_converted_clip_teacher_logits_equal_transformers_on_crops(tmp_path, synth_data_dir):
    """An imported CLIP as the distillation teacher: each ROI is cropped (torchvision's
    roi_align) and encoded by CLIP's image tower; each concept is the renormalised mean of its
    prompt embeddings. Our teacher logits equal that computed with transformers and torchvision;
    then a fine-tune from the same CLIP with distillation runs through the trainer."""
    torch = require_peer("torch")
    require_peer("torchvision")
    import micro_config

    from region_medclip import config as config_lib
    from region_medclip import sharding as sharding_lib
    from region_medclip import train
    from region_medclip.train import distillation as teacher_lib
    from region_medclip.weights import convert

    reference = tiny_hf_clip(torch)
    reference.save_pretrained(tmp_path / "hf")
    out = str(tmp_path / "clip")
    convert.convert_hf_clip(str(tmp_path / "hf"), out)

    data_dir = synth_data_dir
    c = micro_config.get_config(f"data_dir={data_dir},steps=2")
    config_lib.init_model_from(c, out)
    assert c.data.tokenizer == "clip_bpe" and c.data.image_size == 32
    c.teacher.init_from = out
    c.loss.lambda_ = 0.5
    concepts = train.concept_vocabulary("synth_cxr")[:12]
    teacher = teacher_lib.Teacher(out, c.data, concepts, sharding_lib.make_mesh(c.mesh))
    assert teacher.region_source == "crops"  # a converted CLIP has no trained region tower

    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    corner = rng.uniform(0.0, 0.5, size=(2, 3, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0.2, 0.5, size=(2, 3, 2))], -1)
    boxes = np.clip(boxes, 0, 1).astype(np.float32)
    roi_mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    logits = jax.jit(teacher.logits, static_argnums=4)(teacher.params, images, boxes, roi_mask, 1.0)
    expected = _expected_teacher_logits(
        torch, reference, concepts, teacher_lib.CONCEPT_TEMPLATES, images, boxes, roi_mask
    )
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4)

    # Fine-tune the imported CLIP with it as teacher, through the trainer.
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(result["distill/loss"]) and result["distill/loss"] > 0
