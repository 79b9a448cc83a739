"""Evaluates a checkpoint: ``python -m region_medclip.evaluate --config=FILE --workdir=DIR``.

Runs every evaluator of ``config.evals`` on the latest checkpoint of ``DIR`` (or ``--step``) and
writes ``DIR/eval/<step>.json`` and the plots ``DIR/plots/<step>/<evaluator>.png``; prints a
table. ``--split=validation`` runs every evaluator on that split instead (``<step>.validation``);
``--params=ema`` evaluates the moving average of the params (``<step>.ema``).
"""

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (FILE[:args]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_enum(
    "split",
    None,
    ["train", "validation", "test"],
    "Run every evaluator on this split instead of its own; results go to "
    "DIR/eval/<step>.<split>.json and DIR/plots/<step>.<split>/.",
)
_PARAMS = flags.DEFINE_enum(
    "params", "params", ["params", "ema"], "The params, or their moving average (train.ema_decay)."
)


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    from region_medclip import checkpointing
    from region_medclip import config as config_lib
    from region_medclip.evaluators import run
    from region_medclip.models import clip

    config = _CONFIG.value
    config_lib.validate(config)
    if not config.evals:
        raise app.UsageError("config.evals is empty: nothing to evaluate")
    suffix = ""
    if _SPLIT.value:
        with config.unlocked():  # the flag config is locked; not every evaluator names a split
            for name in config.evals:
                config.evals[name].split = _SPLIT.value
        suffix = f".{_SPLIT.value}"
    if _PARAMS.value == "ema":
        suffix += ".ema"
    params, _, step = checkpointing.restore_params(
        _WORKDIR.value, step=_STEP.value, which=_PARAMS.value
    )
    model = clip.from_config(config.model)
    plot_dir = f"{_WORKDIR.value}/plots/{step}{suffix}"
    results = run.evaluate(config, model, params, plot_dir=plot_dir)
    print(run.write(_WORKDIR.value, step, results, suffix=suffix))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
