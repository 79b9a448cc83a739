"""Learned prompts (CoOp) on a trained run, and their few-shot table:

python -m region_medclip.coop --workdir=W [--dataset=NAME] --shots=1,2,4,8,16 [--seeds=0,1,2]
    [--n_ctx=16] [--class_specific] [--position=end|middle] [--init=PHRASE]
    [--negatives=learned|normal] [--steps=200] [--split=test]

For each shots × seed, prompts are learned on the train split with both towers frozen and saved
as ``W/coop/<dataset>/<k>shot_seed<seed>.npz``; the zero-shot AUROC they give on the evaluated
split, against the run's own hand prompts as 0 shots, is printed and written to
``W/coop/<dataset>/table.md`` and ``table.json`` (``region_medclip.train.coop_sweep``).
"""

import logging

from absl import app, flags
from etils import epath


def _define_flags() -> None:
    # Defined only when run as a program: tests import command lines side by side, and absl
    # flags are global.
    flags.DEFINE_string("workdir", None, "A trained run (its latest checkpoint).")
    flags.DEFINE_string("dataset", None, "Dataset (default: the run's config.data.eval).")
    flags.DEFINE_list("shots", ["1", "2", "4", "8", "16"], "Images per class to learn from.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each draws its own k-shot set.")
    flags.DEFINE_integer("n_ctx", 16, "Context vectors per prompt (M).")
    flags.DEFINE_bool("class_specific", False, "One context per class instead of one shared.")
    flags.DEFINE_enum("position", "end", ["end", "middle"], "Where the class name goes.")
    flags.DEFINE_string("init", "", "Start the context from this phrase's token embeddings.")
    flags.DEFINE_enum(
        "negatives",
        "learned",
        ["learned", "normal"],
        "Multi-label: what a finding is weighed "
        "against: a learned negative context, or the fixed normal-study prompts.",
    )
    flags.DEFINE_enum("task", "auto", ["auto", "multilabel", "multiclass"], "The loss's task.")
    flags.DEFINE_integer("steps", 200, "Full-batch optimiser steps.")
    flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimiser (cosine decay).")
    flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate.")
    flags.DEFINE_enum("split", "test", ["validation", "test"], "The evaluated split.")
    flags.DEFINE_integer("train_examples", 0, "Draw the shots from this many train films (0: all).")
    flags.DEFINE_integer("max_examples", 0, "Evaluate this many films (0: all).")


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("region_medclip.coop").setLevel(logging.INFO)
    from region_medclip import api
    from region_medclip.train import coop, coop_sweep

    args = flags.FLAGS
    model = api.load(args.workdir)
    settings = model.zero_shot_settings()
    options = coop.Options(
        n_ctx=args.n_ctx,
        class_specific=args.class_specific,
        position=args.position,
        init=args.init,
        negatives=args.negatives,
        task=args.task,
        steps=args.steps,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
    )
    dataset = args.dataset or settings["dataset"]
    result = coop_sweep.sweep(
        model.module,
        model.params,
        model.config,
        workdir=args.workdir,
        dataset=dataset,
        shots=[int(k) for k in args.shots],
        seeds=[int(s) for s in args.seeds],
        options=options,
        settings=settings,
        split=args.split,
        train_examples=args.train_examples,
        max_examples=args.max_examples,
    )
    table = coop_sweep.table(result)
    root = epath.Path(args.workdir) / "coop" / dataset
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table + "\n")
    (root / "table.json").write_text(coop_sweep.to_json(result))
    print(table)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
