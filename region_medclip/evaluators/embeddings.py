"""One pass of a model over an evaluation split: every embedding the evaluators need."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from region_medclip.data import pipeline
from region_medclip.models import clip
from region_medclip.models.region import patch_boxes

_log = logging.getLogger("region_medclip.evaluate")


def _encode(module: clip.RegionCLIP, batch, grid_boxes):
    out = module(batch["images"], batch["texts"], batch["boxes"], batch["roi_mask"])
    patch_tokens = out.pop("patch_tokens")
    n = patch_tokens.shape[0]
    # Patch-level embeddings through the region head: each patch cell is scored as a tiny ROI,
    # so a phrase is compared with the same kind of embedding the region losses trained.
    cells = jnp.broadcast_to(grid_boxes, (n, *grid_boxes.shape))
    out["zpatch"] = module.encode_regions(patch_tokens, cells, None)
    out["zcap"] = module.encode_text(batch["captions"])
    return out


def embed_split(
    model: clip.RegionCLIP,
    params,
    data_config,
    *,
    split: str,
    batch_size: int,
    grid: int,
    max_examples: int = 0,
    records=None,
) -> dict[str, np.ndarray]:
    """Embeds ``split`` of ``config.data.eval`` in order, one pass, on the default device.

    Returns numpy arrays over the N examples: ``zimg, ztxt [N, D]``, ``zroi, zcap [N, R, D]``,
    ``zpatch [N, grid², D]`` (patch-cell embeddings for grounding), ``roi_mask [N, R]``,
    ``cap_ids [N, R]``, ``captions [N, R, L]`` and ``texts [N, T]`` token ids,
    ``boxes [N, R, 4]`` normalised, ``box_labels [N, R]``, ``labels [N, C]``, ``image_box
    [N, 4]`` (the film's area in the padded square, normalised xyxy),
    ``images [N, S, S]`` (first channel, for overlays), plus ``logit_scale``.
    """
    dataset = pipeline.make_dataset(
        data_config, split=split, train=False, seed=0, batch_size=batch_size, records=records
    )
    encode = jax.jit(
        lambda p, b: model.apply({"params": p}, b, jnp.asarray(patch_boxes(grid)), method=_encode)
    )
    keep = ("roi_mask", "cap_ids", "boxes", "box_labels", "labels", "captions", "texts")
    keep += ("image_box",)
    chunks: dict[str, list] = {}
    total = 0
    for batch in pipeline.BatchIterator(dataset):
        n = len(batch["images"])
        # Pad the last, partial batch to the compiled size.
        padded = {k: _pad(v, batch_size) for k, v in batch.items()}
        out = jax.device_get(encode(params, padded))
        for key in ("zimg", "ztxt", "zroi", "zcap", "zpatch"):
            chunks.setdefault(key, []).append(out[key][:n])
        for key in keep:
            chunks.setdefault(key, []).append(batch[key])
        chunks.setdefault("images", []).append(batch["images"][..., 0])
        chunks["logit_scale"] = [np.exp(out["logit_scale"])]
        total += n
        if max_examples and total >= max_examples:
            break
    if not total:
        raise ValueError(f"config.data.eval={data_config.eval!r} split {split!r} is empty")
    result = {k: np.concatenate(v) if k != "logit_scale" else v[0] for k, v in chunks.items()}
    if max_examples:
        result = {k: v[:max_examples] if k != "logit_scale" else v for k, v in result.items()}
    return result


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def text_encoder(model: clip.RegionCLIP, params, tokenizer, length: int):
    """A function ``list[str] → [n, D]`` L2-normalised text embeddings (numpy), jitted once."""
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t, method=clip.RegionCLIP.encode_text))

    def run(texts: list[str]) -> np.ndarray:
        out, cut = [], 0
        for start in range(0, len(texts), 256):
            chunk = texts[start : start + 256]
            tokens, truncated = tokenizer.encode(chunk, length)
            cut += truncated
            tokens = _pad(tokens, 256)  # one compiled shape
            out.append(np.asarray(encode(params, tokens))[: len(chunk)])
        if cut:
            _log.warning(
                "%d of %d prompts are longer than %d tokens and were cut", cut, len(texts), length
            )
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return run
