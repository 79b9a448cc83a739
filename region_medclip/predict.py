"""Zero-shot prediction and grounding for one image:

python -m region_medclip.predict --workdir=DIR --image=cxr.png [--labels="pleural effusion,nodule"]
python -m region_medclip.predict --workdir=DIR --image=cxr.png --phrase="..." --out=heat.png
python -m region_medclip.predict --workdir=DIR --image=cxr.png --detect=nodule,effusion --out=b.png
"""

import numpy as np
from absl import app, flags
from PIL import Image

from region_medclip.data import transforms

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (latest checkpoint is used).")
_IMAGE = flags.DEFINE_string("image", None, "Image file (PNG/JPEG).")
_LABELS = flags.DEFINE_list(
    "labels", [], "Comma-separated finding names (default: the findings of the run's dataset)."
)
_PHRASE = flags.DEFINE_string("phrase", None, "Phrase to ground.")
_DETECT = flags.DEFINE_list("detect", [], "Phrases to find without boxes (comma-separated).")
_OUT = flags.DEFINE_string(
    "out", None, "Where the heatmap (--phrase) or box overlay (--detect) PNG goes."
)
_PROMPTS = flags.DEFINE_string(
    "prompts", None, "Prompt set of the dataset's registry entry (default: the run's evaluator's)."
)
_NEGATIVES = flags.DEFINE_enum(
    "negatives",
    None,
    ["prompts", "normal"],
    "What each label is weighed against: its own negations, or normal-study prompts (default: "
    "the run's evaluator's).",
)


def overlay(image: np.ndarray, heat: np.ndarray) -> Image.Image:
    """The preprocessed gray image with the min–max normalised heatmap in red on top."""
    gray = np.asarray(image, np.float32)
    gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-6)
    h = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-6)
    rgb = np.stack([gray * 0.6 + h * 0.4, gray * 0.6, gray * 0.6], -1)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


# One colour a phrase (cycled), so the boxes of different phrases tell apart.
_COLOURS = ((255, 60, 60), (60, 200, 255), (255, 210, 40), (120, 255, 120), (255, 120, 255))


def draw_boxes(image: np.ndarray, found: dict, phrases: list[str]) -> Image.Image:
    """The film ``image [H, W]`` uint8 with each detected box drawn once, in the colour of its
    best phrase, labelled with every ``phrase score`` found there (best first, one a line)."""
    from PIL import ImageDraw

    canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    labels: dict[tuple, list[tuple[float, int]]] = {}
    for box, score, phrase in zip(found["boxes"], found["scores"], found["phrases"], strict=True):
        labels.setdefault(tuple(np.round(np.asarray(box, float), 1)), []).append(
            (float(score), int(phrase))
        )
    for box, hits in labels.items():
        hits.sort(reverse=True)
        x0, y0, x1, y1 = box
        draw.rectangle((x0, y0, x1, y1), outline=_COLOURS[hits[0][1] % len(_COLOURS)], width=2)
        for line, (score, phrase) in enumerate(hits):
            colour = _COLOURS[phrase % len(_COLOURS)]
            draw.text((x0 + 3, y0 + 2 + 11 * line), f"{phrases[phrase]} {score:.2f}", fill=colour)
    return canvas


def main(argv):
    del argv
    import region_medclip

    try:
        with Image.open(_IMAGE.value) as pil:
            image = transforms.gray_uint8(pil)
    except (OSError, ValueError) as err:
        raise app.UsageError(f"--image={_IMAGE.value}: cannot read it ({err})") from err
    model = region_medclip.load(_WORKDIR.value)
    if _LABELS.value or not (_PHRASE.value or _DETECT.value):  # the dataset's findings
        labels = _LABELS.value or model.dataset_findings()
        probs = model.zero_shot(image, labels, prompts=_PROMPTS.value, negatives=_NEGATIVES.value)
        for label, p in zip(labels, probs[0], strict=True):
            print(f"{label:<30}{p:.4f}")
    if _PHRASE.value:
        heat = model.ground(image, _PHRASE.value)
        out = _OUT.value or "grounding.png"
        overlay(model.preprocess(image)[0, ..., 0], heat).save(out)
        print(f"wrote {out}")
    if _DETECT.value:
        [found] = model.detect(image, _DETECT.value)
        for box, score, phrase in zip(
            found["boxes"], found["scores"], found["phrases"], strict=True
        ):
            coords = ", ".join(f"{v:.1f}" for v in box)
            print(f"{_DETECT.value[phrase]:<30}{score:.4f}  [{coords}]")
        out = _OUT.value or "detections.png"
        draw_boxes(image, found, _DETECT.value).save(out)
        print(f"wrote {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "image"])
    app.run(main)
