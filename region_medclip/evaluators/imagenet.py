"""CLIP's ImageNet zero-shot protocol, to check an imported CLIP against its published numbers
(``python -m region_medclip.imagenet_zero_shot`` runs it).

Each class's weight is the renormalised mean of its name in every prompt template (CLIP's prompt
ensembling; by default open_clip's copy of CLIP's 1000 ImageNet class names and 80 templates,
read from the installed ``open_clip_torch`` package, or files with one entry a line and ``{}``
for the name). Images get CLIP's evaluation transform: bicubic resize of the short side, centre
crop, RGB, CLIP normalisation. Reported: top-1 and top-5 accuracy in percent.

Images come from a folder with one subfolder a class (ImageNetV2's layout: subfolders ``0`` to
``999`` are class indices; otherwise sorted subfolder names, e.g. WordNet ids, give the indices)
or from a prepared TFDS dataset in array_record format with ``image`` and ``label`` features
(read without TensorFlow). Nothing is downloaded. A file that is not a readable image is skipped,
counted and listed in the output.
"""

import importlib.util
import io
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from region_medclip.data import transforms
from region_medclip.evaluators import common, zero_shot

_log = logging.getLogger("region_medclip.evaluators.imagenet")
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def clip_metadata() -> tuple[list[str], list[str]]:
    """CLIP's 1000 ImageNet class names and 80 prompt templates (``{}`` for the name), from the
    installed ``open_clip_torch`` (its metadata module imports nothing, so torch is not loaded).

    Raises:
      FileNotFoundError: open_clip_torch is not installed (pass --classnames and --templates).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "CLIP's ImageNet class names and templates come from the open_clip_torch package: "
            "install it (the [parity] extra), or pass --classnames=FILE and --templates=FILE"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "zero_shot_metadata.py")
    module_spec = importlib.util.spec_from_file_location("_open_clip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    templates = [t("{}") for t in module.OPENAI_IMAGENET_TEMPLATES]
    return list(module.IMAGENET_CLASSNAMES), templates


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a text file."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path}: no entries")
    return lines


def clip_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """CLIP's evaluation transform: a PIL image → ``[size, size, 3]`` float32 (bicubic resize
    of the short side to ``size``, centre crop, RGB, ``/255``, CLIP mean/std)."""
    # The order and arithmetic of open_clip's transform: resize (short side exactly `size`, the
    # long side truncated as torchvision's Resize does), centre crop (offsets rounded), then RGB.
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    image = image.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - transforms.MEAN) / transforms.STD).astype(np.float32)


def folder_examples(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(file, label)], class folder names)`` of an image folder.

    Raises:
      FileNotFoundError / ValueError: naming ``root`` when it has no class folders or no images.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--images={root}: not a directory")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise ValueError(f"--images={root}: no class subfolders")
    if all(d.isdigit() for d in folders):  # ImageNetV2: the folder name is the class index
        labels = {d: int(d) for d in folders}
    else:
        labels = {d: i for i, d in enumerate(folders)}
    examples = []
    for folder in folders:
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.lower().endswith(_IMAGE_SUFFIXES):
                examples.append((os.path.join(root, folder, name), labels[folder]))
    if not examples:
        raise ValueError(f"--images={root}: no image files ({', '.join(_IMAGE_SUFFIXES)})")
    return examples, folders


def folder_images(examples, size: int, skipped: list[str]) -> Iterator[tuple[np.ndarray, int]]:
    """Preprocessed images and labels; unreadable files go to ``skipped``."""
    for path, label in examples:
        try:
            with Image.open(path) as image:
                pixels = clip_preprocess(image, size)
        except (OSError, ValueError) as err:
            _log.warning("skipping %s: %s", path, err)
            skipped.append(path)
            continue
        yield pixels, label


def tfds_images(path: str, split: str, size: int, skipped: list[str]):
    """Preprocessed images and labels of a prepared TFDS dataset directory (array_record)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(path)
    source = builder.as_data_source(split=split)
    for index in range(len(source)):
        record = source[index]
        image = record["image"]
        try:
            pil = (
                Image.open(io.BytesIO(image))
                if isinstance(image, bytes)
                else Image.fromarray(np.asarray(image).squeeze())
            )
            pixels = clip_preprocess(pil, size)
        except (OSError, ValueError) as err:
            _log.warning("skipping %s[%s][%d]: %s", path, split, index, err)
            skipped.append(f"{split}[{index}]")
            continue
        yield pixels, int(record["label"])


def classifier(model, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """``[C, D]`` zero-shot weights: per class, the renormalised mean of its prompt embeddings."""
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no {{}} for the class name")
    prompts = zero_shot.template_prompts(list(classnames), templates)

    def encode(texts: list[str], chunk: int = 1024) -> np.ndarray:
        return np.concatenate(
            [model.encode_text(texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
        )

    return zero_shot.class_embeddings(encode, prompts)


def evaluate(
    model,
    images: Iterator[tuple[np.ndarray, int]],
    weights: np.ndarray,
    *,
    batch_size: int = 64,
    max_images: int = 0,
) -> dict:
    """Top-1 / top-5 accuracy (percent) of ``model`` on ``(image [S, S, 3], label)`` pairs with
    class ``weights [C, D]``; also returns the ``logits [N, C]`` and ``labels [N]``."""
    logits, labels, batch, batch_labels = [], [], [], []

    def flush():
        x = np.stack(batch)
        # A fixed batch shape: one compilation whatever the last batch's size.
        padded = np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])
        z = model.encode_image(padded)[: len(x)]
        logits.append(z @ weights.T)
        labels.extend(batch_labels)
        batch.clear()
        batch_labels.clear()

    count = 0
    for pixels, label in images:
        if label >= len(weights):
            raise ValueError(f"label {label} but only {len(weights)} class names")
        batch.append(pixels)
        batch_labels.append(label)
        count += 1
        if len(batch) == batch_size:
            flush()
        if max_images and count >= max_images:
            break
    if batch:
        flush()
    if not labels:
        raise ValueError("no images were read")
    all_logits = np.concatenate(logits)
    targets = np.asarray(labels)
    return dict(
        top1=100.0 * common.top_k_accuracy(all_logits, targets, 1),
        top5=100.0 * common.top_k_accuracy(all_logits, targets, min(5, len(weights))),
        num_images=len(targets),
        num_classes=len(weights),
        logits=all_logits,
        labels=targets,
    )


def run(
    model,
    *,
    images: str | None = None,
    tfds_dir: str | None = None,
    split: str = "test",
    classnames: str | None = None,
    templates: str | None = None,
    batch_size: int = 64,
    max_images: int = 0,
) -> dict:
    """The whole protocol on ``model`` (what ``region_medclip.load`` returns); returns
    ``top1, top5, num_images, num_classes, skipped``."""
    if (images is None) == (tfds_dir is None):
        raise ValueError("give exactly one of --images and --tfds")
    default_names, default_templates = (None, None)
    if classnames is None or templates is None:
        default_names, default_templates = clip_metadata()
    names = read_lines(classnames) if classnames else default_names
    prompts = read_lines(templates) if templates else default_templates
    weights = classifier(model, names, prompts)
    skipped: list[str] = []
    if images is not None:
        examples, folders = folder_examples(images)
        if max(label for _, label in examples) >= len(names):
            raise ValueError(f"--images={images}: {len(folders)} class folders, {len(names)} names")
        stream = folder_images(examples, model.image_size, skipped)
    else:
        stream = tfds_images(tfds_dir, split, model.image_size, skipped)
    result = evaluate(model, stream, weights, batch_size=batch_size, max_images=max_images)
    result.pop("logits")
    result.pop("labels")
    result["num_templates"] = len(prompts)
    result["skipped"] = len(skipped)
    result["skipped_files"] = skipped[:100]
    return result
