"""ViT-B/16 region recipe with the SigLIP sigmoid global loss (same args as vitb16_roi)."""

from configs import common, vitb16_roi


def get_config(arg: str | None = None):
    """``arg`` as in ``vitb16_roi``."""
    c = vitb16_roi.get_config(arg)
    c.loss.global_kind = "sigmoid"
    c.model.logit_scale_init = common.SIGMOID_LOGIT_SCALE_INIT
    c.model.logit_bias_init = -10.0
    return c
