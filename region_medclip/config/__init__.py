"""Configs: the schema (every key and its default), the ``:arg`` parser, validation, and the
``init_*_from`` helpers that start a config from a stored checkpoint.

Experiment files live in the repository's ``configs/`` folder; each starts from
:func:`base_config`. The library never imports them.
"""

from region_medclip.config.init_from import init_model_from, init_text_from, load_file
from region_medclip.config.schema import (
    SIGMOID_LOGIT_SCALE_INIT,
    SOFTMAX_LOGIT_SCALE_INIT,
    base_config,
)
from region_medclip.config.validate import CHOICES, ConfigError, parse_arg, validate

__all__ = [
    "CHOICES",
    "SIGMOID_LOGIT_SCALE_INIT",
    "SOFTMAX_LOGIT_SCALE_INIT",
    "ConfigError",
    "base_config",
    "init_model_from",
    "init_text_from",
    "load_file",
    "parse_arg",
    "validate",
]
