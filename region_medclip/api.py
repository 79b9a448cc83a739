"""The Python API: ``region_medclip.load(path)`` → a model for embedding, zero-shot and grounding.

model = region_medclip.load("runs/tiny")
probs = model.zero_shot(images_uint8, ["pleural effusion", "nodule"])   # [B, 2]
heat = model.ground(image_uint8, "small nodule in the right upper zone")  # [S, S]
"""

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from region_medclip import checkpointing
from region_medclip.data import tokenizers as tokenizers_lib
from region_medclip.data import transforms
from region_medclip.evaluators import embeddings, grounding, zero_shot
from region_medclip.models import clip

_log = logging.getLogger("region_medclip.api")


class Model:
    """A trained ``RegionCLIP`` with its preprocessing and tokenizer. Outputs are numpy."""

    def __init__(self, config: ml_collections.ConfigDict, params):
        self.config = config
        self.module = clip.from_config(config.model)
        self.params = params
        self.image_size = int(config.data.image_size)
        self.tokenizer = tokenizers_lib.from_config(config.data)
        self.text_len = int(config.data.text_len)
        self.caption_len = int(config.data.get("caption_len", 0) or self.text_len)
        self.logit_scale = float(np.exp(params["logit_scale"]))
        module = self.module
        self._image = jax.jit(
            lambda p, x: module.apply({"params": p}, x, method=clip.RegionCLIP.encode_image)
        )
        self._text = jax.jit(
            lambda p, t: module.apply({"params": p}, t, method=clip.RegionCLIP.encode_text)
        )

    def preprocess(self, images) -> np.ndarray:
        """uint8 images — one ``[H, W]`` / ``[H, W, 3]`` array or a batch / list of them — →
        ``[B, S, S, 3]`` float32: gray, aspect-preserving resize, centred padding, CLIP
        normalisation (what the training pipeline does, without augmentation)."""
        if isinstance(images, np.ndarray):
            single = images.ndim == 2 or (images.ndim == 3 and images.shape[-1] == 3)
            images = [images] if single else list(images)
        out = []
        for image in images:
            image = np.asarray(image)
            if image.dtype != np.uint8:
                raise ValueError(f"preprocess expects uint8 images, got {image.dtype}")
            if image.ndim == 3:
                image = np.asarray(Image.fromarray(image).convert("L"))
            example = {"image": image, "boxes": np.zeros((0, 4), np.float32)}
            square = transforms.ResizePad(self.image_size).map(example)["image"]
            gray = square.astype(np.float32)[..., None] / 255.0
            out.append(((gray - transforms.MEAN) / transforms.STD).astype(np.float32))
        return np.stack(out)

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """``[B, H, W, C]`` float32 preprocessed images → ``[B, D]`` L2-normalised."""
        return np.asarray(self._image(self.params, jnp.asarray(images, jnp.float32))[0])

    def encode_text(self, texts) -> np.ndarray:
        """A list of strings (tokenized at ``data.text_len``) or int32 ids ``[B, L]`` →
        ``[B, D]`` L2-normalised."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, np.ndarray):
            texts = self.tokenizer(list(texts), self.text_len)
        return np.asarray(self._text(self.params, jnp.asarray(texts, jnp.int32)))

    def zero_shot(self, images, labels: Sequence[str], negatives: str = "prompts") -> np.ndarray:
        """uint8 images and free-text finding names → ``[B, len(labels)]`` probabilities, each
        from its positive prompt set against its negative one (``negatives="prompts"``: "No
        {label}." templates) or against the normal-study prompts (``"normal"``); findings are
        not mutually exclusive."""
        if negatives not in zero_shot.NEGATIVE_SETS:
            raise ValueError(f"negatives={negatives!r}; choose one of {zero_shot.NEGATIVE_SETS}")
        zimg = self.encode_image(self.preprocess(images))
        encode = embeddings.text_encoder(self.module, self.params, self.tokenizer, self.text_len)
        labels = list(labels)
        zpos = zero_shot.class_embeddings(encode, zero_shot.template_prompts(labels))
        if negatives == "normal":
            zneg = zero_shot.normal_embeddings(encode, len(labels))
        else:
            zneg = zero_shot.class_embeddings(
                encode, zero_shot.template_prompts(labels, zero_shot.NEGATIVE_TEMPLATES)
            )
        return zero_shot.positive_probability(zimg, zpos, zneg, self.logit_scale)

    def ground(self, image, phrase: str) -> np.ndarray:
        """One uint8 image and a phrase → ``[S, S]`` similarity heatmap over the preprocessed
        (resized, padded) image: the phrase against every patch cell through the region head,
        bilinearly upsampled."""
        x = jnp.asarray(self.preprocess(image)[:1])
        module = self.module

        def patches(m, x):
            _, tokens = m.encode_image(x)
            grid = tokens.shape[1]
            cells = jnp.asarray(embeddings.patch_boxes(grid))[None]
            return m.encode_regions(tokens, cells, None)[0], grid

        zpatch, grid = module.apply({"params": self.params}, x, method=patches)
        zphrase = self.encode_text_short([phrase])[0]
        heat = (np.asarray(zpatch) @ zphrase).reshape(grid, grid)
        return grounding.upsample(heat, self.image_size, self.image_size)

    def encode_text_short(self, texts: list[str]) -> np.ndarray:
        """Phrases → ``[n, D]`` L2-normalised, tokenized at the caption length the region losses
        trained with (``data.caption_len``); a longer phrase is cut to fit, with a warning."""
        ids, cut = self.tokenizer.encode(texts, self.caption_len)
        if cut:
            _log.warning(
                "%d of %d phrases are longer than data.caption_len=%d tokens and were cut",
                cut,
                len(texts),
                self.caption_len,
            )
        return np.asarray(self._text(self.params, ids))


def load(path: str, step: int | None = None) -> Model:
    """A model from a training workdir (its latest checkpoint, or ``step``), with the config
    stored in that checkpoint.

    Raises:
      FileNotFoundError: naming ``path`` when it holds no checkpoint.
      ValueError: ``path`` holds one tower only (``convert --format=hf_bert``).
    """
    params, config, _ = checkpointing.restore_params(path, step=step)
    if "partial" in config:
        raise ValueError(
            f"{path}: holds only {config['partial']['provides']} ({config['partial']['format']}),"
            " not a whole model; train from it with config.model.init_from"
        )
    return Model(ml_collections.ConfigDict(config), params)
