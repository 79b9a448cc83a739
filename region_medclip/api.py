"""The Python API: ``region_medclip.load(path)`` → a model for embedding, zero-shot and grounding.

model = region_medclip.load("runs/tiny")
probs = model.zero_shot(images_uint8)  # [B, F]: the findings, scored as the evaluator does
probs = model.zero_shot(images_uint8, ["pleural effusion", "nodule"])   # [B, 2]
probs = model.zero_shot(images_uint8, prompts="coop")  # learned prompts (python -m ...coop)
heat = model.ground(image_uint8, "small nodule in the right upper zone")  # [S, S]
"""

import functools
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from region_medclip import checkpointing
from region_medclip.data import registry as data_registry
from region_medclip.data import tokenizers as tokenizers_lib
from region_medclip.data import transforms
from region_medclip.evaluators import coop as coop_lib
from region_medclip.evaluators import detect as detect_lib
from region_medclip.evaluators import detection, embeddings, grounding, zero_shot
from region_medclip.models import clip

_log = logging.getLogger("region_medclip.api")
# Images a compiled image-tower call takes: any batch is run in chunks of this many.
IMAGE_CHUNK = 32


class Model:
    """A trained ``RegionCLIP`` with its preprocessing and tokenizer. Outputs are numpy.

    ``path``: the workdir it was loaded from, where its learned prompts are found (None: none).
    """

    def __init__(self, config: ml_collections.ConfigDict, params, path: str | None = None):
        self.config = config
        self.path = path
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
        """Films — one ``[H, W]`` / ``[H, W, 3]`` uint8 or 16-bit array, or a batch / list of
        them — → ``[B, S, S, 3]`` float32: gray, aspect-preserving resize, centred padding, CLIP
        normalisation (what the training pipeline does, without augmentation). 16-bit films are
        scaled from the full 16-bit range (``transforms.gray_uint8``)."""
        if isinstance(images, np.ndarray):
            single = images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (3, 4))
            images = [images] if single else list(images)
        out = []
        for index, image in enumerate(images):
            try:
                gray = transforms.gray_uint8(image)
            except ValueError as err:
                raise ValueError(f"preprocess: image {index}: {err}") from err
            example = {"image": gray, "boxes": np.zeros((0, 4), np.float32)}
            square = transforms.ResizePad(self.image_size).map(example)["image"]
            pixels = square.astype(np.float32)[..., None] / 255.0
            out.append(((pixels - transforms.MEAN) / transforms.STD).astype(np.float32))
        return np.stack(out)

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """``[B, H, W, C]`` float32 preprocessed images → ``[B, D]`` L2-normalised, in chunks of
        ``IMAGE_CHUNK`` (the last one padded: one compiled shape for any ``B``)."""
        images = np.asarray(images, np.float32)
        out = []
        for start in range(0, len(images), IMAGE_CHUNK):
            chunk = images[start : start + IMAGE_CHUNK]
            padded = np.zeros((IMAGE_CHUNK, *chunk.shape[1:]), np.float32)
            padded[: len(chunk)] = chunk
            out.append(np.asarray(self._image(self.params, jnp.asarray(padded))[0])[: len(chunk)])
        return np.concatenate(out)

    def encode_text(self, texts) -> np.ndarray:
        """A list of strings (tokenized at ``data.text_len``) or int32 ids ``[B, L]`` →
        ``[B, D]`` L2-normalised."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, np.ndarray):
            texts = self.tokenizer(list(texts), self.text_len)
        return np.asarray(self._text(self.params, jnp.asarray(texts, jnp.int32)))

    def zero_shot_settings(self) -> dict[str, str]:
        """What :meth:`zero_shot` scores with by default, the run's own zero-shot evaluator's:
        ``dataset`` (``config.data.eval``, whose registry entry holds the prompt sets),
        ``prompts`` and ``negatives`` (``config.evals.zero_shot``, else the first evaluator of
        kind ``zero_shot``, else that kind's defaults)."""
        evals = self.config.get("evals", {})
        kinds = [name for name in evals if evals[name].get("kind") == "zero_shot"]
        names = (["zero_shot"] if "zero_shot" in kinds else []) + kinds
        chosen = evals[names[0]] if names else {}
        settings = {
            key: chosen.get(key, zero_shot.OPTIONS[key]) for key in ("prompts", "negatives")
        }
        return {"dataset": self.config.data.get("eval", "synth_cxr"), **settings}

    def dataset_findings(self, dataset: str | None = None) -> list[str]:
        """The finding names of ``dataset`` (default: the run's, ``config.data.eval``), its
        class names less "no finding": the columns :meth:`zero_shot` returns by default."""
        entry = data_registry.get(
            dataset or self.zero_shot_settings()["dataset"], self.config.data.get("data_dir")
        )
        return [name for name in entry.class_names() if not name.startswith("no ")]

    def zero_shot(
        self,
        images,
        labels: Sequence[str] | None = None,
        *,
        prompts: str | None = None,
        negatives: str | None = None,
        dataset: str | None = None,
        coop: str | None = None,
    ) -> np.ndarray:
        """Films (as :meth:`preprocess` takes them) and finding names → ``[B, F]``
        probabilities, each finding's positive prompt set weighed against its negative one;
        findings are not mutually exclusive.

        By default this scores as the run's evaluator does (:meth:`zero_shot_settings`): the
        prompt set ``prompts`` of ``dataset``'s registry entry, against each finding's own
        negations (``negatives="prompts"``) or the normal-study prompts (``"normal"``).
        ``labels`` defaults to the dataset's findings; a name the dataset's prompt set does not
        know is prompted with the generic templates ("There is {label}."), with a warning.
        ``prompts="coop"``: the learned prompts ``coop`` (:meth:`learned_prompts`) instead,
        scored as the zero-shot evaluator with ``coop=`` their file scores.

        Raises:
          ValueError: an unknown prompt or negative set, a "no ..." label (it has no
            negation), or a label the learned prompts do not prompt.
          FileNotFoundError: ``prompts="coop"`` and no learned prompts are saved.
        """
        settings = self.zero_shot_settings()
        overrides = dict(prompts=prompts, negatives=negatives, dataset=dataset)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        # The run's data_dir: a user's dataset is found where it was prepared.
        entry = data_registry.get(settings["dataset"], self.config.data.get("data_dir"))
        learned = self.learned_prompts(coop, entry.name) if settings["prompts"] == "coop" else None
        kw = dict(
            class_names=self._labels(labels, entry, warn=learned is None),
            encode=embeddings.text_encoder(self.module, self.params, self.tokenizer, self.text_len),
            logit_scale=self.logit_scale,
        )
        if learned is not None:
            kw.update(learned=learned, encode_learned=self._learned_encoder)
            probs_fn = zero_shot.learned_probabilities
        else:
            kw.update(prompts=settings["prompts"], negatives=settings["negatives"], dataset=entry)
            probs_fn = zero_shot.finding_probabilities
        return probs_fn(zimg=self.encode_image(self.preprocess(images)), **kw)[0]

    def _labels(self, labels, entry, warn: bool) -> list[str]:
        """``labels`` (default: the findings of ``entry``) lower-cased; ``warn``: of those the
        dataset does not know, that the generic templates prompt them.

        Raises:
          ValueError: a "no ..." label.
        """
        known = entry.class_names() if entry.label_names else []
        if labels is None:
            labels = self.dataset_findings(entry.name)
        labels = [str(label).strip().lower() for label in labels]
        if any(label.startswith("no ") for label in labels):
            raise ValueError(f"zero_shot: labels {labels}: a 'no ...' class has no negation")
        unknown = [label for label in labels if label not in known]
        if unknown and warn:
            _log.warning(
                "zero_shot: %s not among %s's findings: prompted with the generic templates",
                unknown,
                entry.name,
            )
        return labels

    @functools.cached_property
    def _learned_encoder(self) -> coop_lib.Encoder:
        # One per model: its jitted text tower compiles once for every later call.
        return coop_lib.Encoder(self.module, self.params, self.tokenizer, self.text_len)

    def learned_prompts(
        self, name: str | None = None, dataset: str | None = None
    ) -> coop_lib.LearnedPrompts:
        """The learned prompts (CoOp) ``name`` of ``dataset`` (default: the run's): a file
        ``<path>/coop/<dataset>/<name>.npz``, or ``name`` itself when it is the path of one;
        None: those with the most shots saved there (the lowest seed among them).

        Raises:
          FileNotFoundError: none saved, naming the command that learns them.
        """
        dataset = dataset or self.zero_shot_settings()["dataset"]
        if name and (name.endswith(".npz") or os.sep in name):
            return coop_lib.load(name)
        if self.path is None:
            raise FileNotFoundError("learned prompts: this model was not loaded from a workdir")
        if name:
            return coop_lib.load(coop_lib.path(self.path, dataset, name))
        found = coop_lib.saved(self.path, dataset)
        if not found:
            raise FileNotFoundError(
                f"{self.path}: no learned prompts for {dataset!r}; learn them with python -m "
                f"region_medclip.coop --workdir={self.path} --dataset={dataset}"
            )
        return found[0]

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

    def detect(
        self,
        images,
        phrases: Sequence[str],
        *,
        method: str = "auto",
        detections: int = 5,
        min_score: float = 0.0,
        prompts: str | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Films (as :meth:`preprocess` takes them) and phrases → for each film, the boxes
        where each phrase is found without given boxes (``evaluators/detection.py``; ``auto``:
        the box head's proposals when the model has one): ``boxes [K, 4]`` pixel xyxy in the
        film as given, ``scores [K]`` probabilities (with a box head: that the box holds a
        finding and that it is this phrase rather than another phrase asked or a clear region;
        without: the phrase against the nearest clear-region prompt), ``phrases [K]`` indices into
        ``phrases``; at most ``detections`` a phrase, only those whose log-odds exceed
        ``min_score`` (0: even odds).

        A phrase that names a finding of the run's dataset is looked for with that finding's
        class embedding from the prompt set ``prompts`` (default: the run's detection
        evaluator's), as the evaluator does: one typed word is a weaker query than the
        sentences a prompt set averages. Any other phrase, or every phrase with
        ``prompts="none"``, is embedded as typed."""
        zphrase = self._phrase_embeddings(list(phrases), prompts)
        films = self._films(images)
        x = self.preprocess(films)
        znormal = self.encode_text_short(list(detect_lib.NORMAL_REGION_PROMPTS))
        _, regions, propose = detection.towers(self.module)
        out = []
        for start in range(0, len(x), IMAGE_CHUNK):
            _, tokens = self._image(self.params, jnp.asarray(x[start : start + IMAGE_CHUNK]))
            found = detection.find_in_tokens(
                np.asarray(tokens),
                zphrase,
                znormal,
                encode_regions_fn=lambda t, b: np.asarray(regions(self.params, t, jnp.asarray(b))),
                propose_fn=None if propose is None else lambda t: propose(self.params, t),
                logit_scale=self.logit_scale,
                method=method,
                detections=detections,
                min_score=min_score,
            )
            for k, result in enumerate(found):
                out.append(self._to_film(result, films[start + k].shape[:2]))
        return out

    def _phrase_embeddings(self, phrases: list[str], prompts: str | None) -> np.ndarray:
        """``[P, D]``: each phrase as :meth:`detect` looks for it."""
        zphrase = np.array(self.encode_text_short(phrases))
        evals = self.config.get("evals", {})
        kinds = [name for name in evals if evals[name].get("kind") == "detection"]
        prompts = prompts or (evals[kinds[0]].get("prompts") if kinds else None) or "templates"
        if prompts == "none":
            return zphrase
        entry = data_registry.get(
            self.zero_shot_settings()["dataset"], self.config.data.get("data_dir")
        )
        known = set(entry.class_names()) if entry.label_names else set()
        names = [p.strip().lower() for p in phrases]
        rows = [i for i, name in enumerate(names) if name in known]
        if rows:
            positive, _ = entry.prompts(prompts, [names[i] for i in rows])
            encode = embeddings.text_encoder(
                self.module, self.params, self.tokenizer, self.text_len
            )
            zphrase[rows] = zero_shot.class_embeddings(encode, positive)
        return zphrase

    def _films(self, images) -> list[np.ndarray]:
        """``images`` as a list of single films (what :meth:`preprocess` accepts)."""
        if isinstance(images, np.ndarray):
            single = images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (3, 4))
            return [images] if single else list(images)
        return list(images)

    def _to_film(self, found, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """Detections in the padded square (normalised) → pixel boxes in a ``[H, W]`` film,
        undoing :meth:`preprocess`'s resize and centred padding; scores as probabilities."""
        height, width = shape
        scale = self.image_size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (self.image_size - new_h) // 2, (self.image_size - new_w) // 2
        pixels = found.boxes * self.image_size - np.array([left, top, left, top])
        boxes = pixels * np.array([width / new_w, height / new_h] * 2)
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        scores = 1.0 / (1.0 + np.exp(-np.asarray(found.scores, np.float64)))
        return dict(boxes=boxes, scores=scores, phrases=found.phrases)

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


def load(path: str, step: int | None = None, params: str = "params") -> Model:
    """A model from a training workdir (its latest checkpoint, or ``step``), with the config
    stored in that checkpoint; ``params="ema"`` takes the moving average of the params
    (``config.train.ema_decay``).

    Raises:
      FileNotFoundError: naming ``path`` when it holds no checkpoint.
      ValueError: ``path`` holds one tower only (``convert --format=hf_bert``), or no moving
        average.
    """
    which = params
    params, config, _ = checkpointing.restore_params(path, step=step, which=which)
    if "partial" in config:
        raise ValueError(
            f"{path}: holds only {config['partial']['provides']} ({config['partial']['format']}),"
            " not a whole model; train from it with config.model.init_from"
        )
    return Model(ml_collections.ConfigDict(config), params, path)
