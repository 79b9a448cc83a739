"""ViT-B/16 region recipe with the SigLIP sigmoid global loss (same args as vitb16_roi)."""

import os

from region_medclip import config as config_lib


def get_config(arg: str | None = None):
    """``arg`` as in ``vitb16_roi``."""
    c = config_lib.load_file(os.path.join(os.path.dirname(__file__), "vitb16_roi.py"), arg)
    c.loss.global_kind = "sigmoid"
    c.model.logit_scale_init = config_lib.SIGMOID_LOGIT_SCALE_INIT
    c.model.logit_bias_init = -10.0
    return c
