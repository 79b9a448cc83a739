"""Runs a benchmark suite on trained models and writes its tables.

python -m region_medclip.benchmark --workdir=runs/tiny [--suite=cxr|synth] [--data_dir=DIR]
python -m region_medclip.benchmark --workdir=runs/a,runs/b --suite=synth --out=docs/bench

Every protocol of the suite whose dataset is prepared is evaluated on each workdir's latest
checkpoint (one row each); the others get a "not prepared" line naming the prepare command.
Writes ``<out>/benchmark_<suite>.md`` and ``.json`` (``out`` defaults to the first workdir) and
prints the Markdown.
"""

import json
import logging
import time

from absl import app, flags
from etils import epath

_WORKDIR = flags.DEFINE_list("workdir", None, "Training workdirs (or convert outputs), a row each.")
_SUITE = flags.DEFINE_string("suite", "cxr", "cxr (the real datasets) or synth (synth_cxr).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared datasets (default: the run's).")
_OUT = flags.DEFINE_string("out", None, "Folder for the tables (default: the first workdir).")


def main(argv) -> None:
    """CLI: run the suite, write and print its tables."""
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    from region_medclip.benchmark import tables

    start = time.perf_counter()
    result = tables.run_suite(_WORKDIR.value, _SUITE.value, _DATA_DIR.value)
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = epath.Path(_OUT.value or _WORKDIR.value[0])
    out.mkdir(parents=True, exist_ok=True)
    text = tables.markdown(result)
    (out / f"benchmark_{_SUITE.value}.md").write_text(text)
    (out / f"benchmark_{_SUITE.value}.json").write_text(json.dumps(result, indent=2))
    print(text)
    print(f"{result['seconds']:.0f} s; written to {out}/benchmark_{_SUITE.value}.{{md,json}}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
