"""Parameter table of a config, per tower and total, without allocating any weights.

python -m region_medclip.summary --config=configs/vitb16_roi.py
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from region_medclip import config as config_lib
from region_medclip.models import summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (FILE[:args]).")


def main(argv):
    del argv
    # JAX logs its (expected) failure to find a TPU at INFO; keep the table clean.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    config = _CONFIG.value
    config_lib.validate(config)
    print(summary.format_table(config, summary.param_table(config)))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
