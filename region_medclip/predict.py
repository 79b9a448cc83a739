"""Zero-shot prediction and grounding for one image:

python -m region_medclip.predict --workdir=DIR --image=cxr.png [--labels="pleural effusion,nodule"]
python -m region_medclip.predict --workdir=DIR --image=cxr.png --phrase="..." --out=heat.png
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
_OUT = flags.DEFINE_string("out", "grounding.png", "Where the grounding heatmap PNG goes.")
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


def main(argv):
    del argv
    import region_medclip

    try:
        with Image.open(_IMAGE.value) as pil:
            image = transforms.gray_uint8(pil)
    except (OSError, ValueError) as err:
        raise app.UsageError(f"--image={_IMAGE.value}: cannot read it ({err})") from err
    model = region_medclip.load(_WORKDIR.value)
    if _LABELS.value or not _PHRASE.value:  # without --labels: the dataset's findings
        labels = _LABELS.value or model.dataset_findings()
        probs = model.zero_shot(image, labels, prompts=_PROMPTS.value, negatives=_NEGATIVES.value)
        for label, p in zip(labels, probs[0], strict=True):
            print(f"{label:<30}{p:.4f}")
    if _PHRASE.value:
        heat = model.ground(image, _PHRASE.value)
        overlay(model.preprocess(image)[0, ..., 0], heat).save(_OUT.value)
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "image"])
    app.run(main)
