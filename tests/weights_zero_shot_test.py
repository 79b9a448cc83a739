"""ImageNet zero-shot (``region_medclip.imagenet_zero_shot``) on a converted random HF CLIP: our
logits, accuracies and the command line's output equal open_clip's evaluation protocol on
transformers' CLIP, from an image folder and from a TFDS dataset."""

import json
import subprocess
import sys

import numpy as np
import pytest
from weights_fixtures import ROOT, features, tiny_hf_clip, unit

import region_medclip
from conftest import require_peer

CLASS_NAMES = ["tench", "goldfish", "great white shark"]
PROMPTS = ["a photo of a {}.", "a bad photo of the {}."]


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


def _open_clip_protocol(torch, reference, files):
    """The reference: open_clip's eval transform, transformers' CLIP, prompt-ensembled classes.

    Returns:
      ``(logits [images, 3], class weights [3, D], pixels [images, 3, 32, 32])``.
    """
    from open_clip.transform import image_transform
    from PIL import Image

    from region_medclip.data import tokenizers

    transform = image_transform(32, is_train=False)
    tokenizer = tokenizers.clip_bpe()
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(path)) for path, _ in files])
        zimg = features(reference.get_image_features(pixel_values=pixels))
        texts = [t.format(c) for c in CLASS_NAMES for t in PROMPTS]
        tokens = torch.from_numpy(tokenizer(texts, 77))
        ztxt = features(reference.get_text_features(input_ids=tokens))
    zimg, ztxt = unit(zimg), unit(ztxt)
    weights = unit(ztxt.reshape(3, 2, -1).mean(1))
    return zimg @ weights.T, weights, pixels


def _assert_command_line_top1(tmp_path, model_dir: str, top1: float) -> None:
    """The command line, as README shows it, prints the same top-1 and counts the skipped."""
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
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads((tmp_path / "r.json").read_text())
    assert printed["top1"] == pytest.approx(top1)
    assert printed["num_images"] == 6 and printed["skipped"] == 1


def _tfds_copy(data_dir: str, files) -> str:
    """The same images as a TFDS dataset (array_record, image + label features); its dir."""
    import tensorflow_datasets as tfds

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

    builder = FakeImagenetV2(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


@pytest.mark.slow
@pytest.mark.parity
def test_imagenet_zero_shot_equals_open_clip_protocol(tmp_path):
    """The ImageNet zero-shot command on a converted random CLIP and a fake ImageNetV2-style
    folder: logits equal transformers' CLIP on open_clip's eval transform with prompt-ensembled
    class weights; top-1/top-5 match those logits; a broken file is skipped and counted; the
    same images through a TFDS dataset give the same numbers; CLIP's 1000 × 80 metadata loads."""
    torch = require_peer("torch")
    require_peer("open_clip")
    from PIL import Image

    from region_medclip.evaluators import common as eval_common
    from region_medclip.evaluators import imagenet as izs
    from region_medclip.weights import convert

    names, templates = izs.clip_metadata()
    assert len(names) == 1000 and len(templates) == 80
    assert all("{}" in t for t in templates) and names[0] == "tench"

    reference = tiny_hf_clip(torch)
    reference.save_pretrained(tmp_path / "hf")
    model_dir = str(tmp_path / "clip")
    convert.convert_hf_clip(str(tmp_path / "hf"), model_dir)
    files = _fake_image_folder(tmp_path / "images", np.random.default_rng(0))
    (tmp_path / "names.txt").write_text("tench\ngoldfish\ngreat white shark\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na bad photo of the {}.\n")
    expected, weights, pixels = _open_clip_protocol(torch, reference, files)
    labels = np.array([label for _, label in files])

    model = region_medclip.load(model_dir)
    ours_pixels = np.stack([izs.clip_preprocess(Image.open(p), 32) for p, _ in files])
    np.testing.assert_allclose(ours_pixels, pixels.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    ours_weights = izs.classifier(model, CLASS_NAMES, PROMPTS)
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

    _assert_command_line_top1(tmp_path, model_dir, top1)
    from_tfds = izs.run(
        model,
        tfds_dir=_tfds_copy(str(tmp_path / "tfds"), files),
        classnames=str(tmp_path / "names.txt"),
        templates=str(tmp_path / "templates.txt"),
        batch_size=4,
    )
    assert from_tfds["num_images"] == 6 and from_tfds["top1"] == pytest.approx(top1)
