"""The loss ablation (``region_medclip.train.ablation``): global-only CLIP, MedCLIP loss, sigmoid
loss, GLoRIA's global + local, the full region-aware model and region-aware + local, same config,
budget and seeds, in one table.

python -m region_medclip.ablation --config=configs/tiny_roi.py --workdir=runs/ablation --seeds=0,1,2

The table (mean ± sample std over seeds) is printed and written to ``workdir/ablation.md`` and
``workdir/ablation.json``.
"""

import json
import logging

from absl import app, flags
from etils import epath
from ml_collections import config_flags


def _define_flags() -> None:
    # Defined only when run as a program: tests import this module beside other CLIs that
    # define --config too, and absl flags are global.
    config_flags.DEFINE_config_file("config", None, "Base config (FILE[:args]).")
    flags.DEFINE_string("workdir", None, "Directory for the runs and the table.")
    flags.DEFINE_list("seeds", ["0"], "Seeds, each trained for every variant.")
    flags.DEFINE_list("variants", None, "Subset of the variants (default: all).")


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.INFO)
    from region_medclip.train import ablation

    args = flags.FLAGS
    variants = args.variants or list(ablation.VARIANTS)
    seeds = [int(s) for s in args.seeds]
    summary, table = ablation.run(args.config, args.workdir, seeds, variants)
    root = epath.Path(args.workdir)
    (root / "ablation.md").write_text(table + "\n")
    (root / "ablation.json").write_text(json.dumps(summary, indent=2))
    print(table)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
