"""Zero-shot AUROC through the API on films presented as real ones arrive:

python -m region_medclip.robustness --workdir=DIR [--num=600] [--size=300] [--out=FILE.json]

The first ``--num`` synth_cxr films of ``--split``, rendered at ``--size`` px, are scored by
``region_medclip.load(DIR).zero_shot`` as square PNGs, stretched to 5:6 and 4:3, as JPEG q85,
as 16-bit PNGs and as RGB arrays (``evaluators/robustness.py``); prints the macro AUROC of each
and its difference to the square PNGs, then what each finding is mistaken for: its AUROC on the
square films without the negatives that hold each other finding in turn.
"""

import json

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (latest checkpoint is used).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM = flags.DEFINE_integer("num", 600, "Films scored.")
_SIZE = flags.DEFINE_integer("size", 300, "Pixels of the rendered square film.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "synth_cxr split.")
_OUT = flags.DEFINE_string("out", None, "Also write the results here as JSON.")


def main(argv):
    del argv
    import region_medclip
    from region_medclip.evaluators import robustness

    model = region_medclip.load(_WORKDIR.value, step=_STEP.value)
    if model.zero_shot_settings()["dataset"] != "synth_cxr":
        raise app.UsageError(f"{_WORKDIR.value}: evaluates on another dataset than synth_cxr")
    pairs = list(robustness.synth_films(_NUM.value, size=_SIZE.value, split=_SPLIT.value))
    films = [image for image, _ in pairs]
    labels = np.stack([label for _, label in pairs])[:, 1:]  # class 0 is "no finding"
    findings = model.dataset_findings()
    results = robustness.evaluate(model.zero_shot, films, labels, findings)
    print(robustness.table(results))
    # What each finding is mistaken for, on the square films.
    results["confusions"] = robustness.confusions(model.zero_shot(films), labels, findings)
    print(robustness.confusion_table(results["confusions"]))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
