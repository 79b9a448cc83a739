"""The ``file.py:arg`` parser and start-up validation against the schema.

The schema is :func:`region_medclip.config.schema.base_config`: every section, key and type a
config may have. Validation runs before anything is built or compiled, so a typo in a config
file or on the command line is an error naming the key rather than a silently ignored setting.
The tower sections go straight into the Flax modules' constructors: their keys are checked
against the modules' own fields by ``models.clip.check_towers``, which ``clip.from_config`` runs.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

from region_medclip.config.schema import base_config

# Allowed values of string-valued keys (dotted path → choices).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention": ("xla", "cudnn"),
    "model.text.kind": ("clip", "bert"),
    "model.image.pool": ("cls", "gap", "map"),
    "model.region.pool": ("mean", "attn"),
    "model.region.proj": ("own", "shared"),
    "loss.global_kind": ("softmax", "sigmoid", "medclip", "dhn_nce"),
    "loss.sigmoid_impl": ("ring", "gather"),
    "loss.dhn_nce.reduction": ("mean", "sum"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.mu_dtype": ("float32", "bfloat16"),
    "train.accum_negatives": ("global", "micro"),
}

# Sections whose keys are not fixed by the schema; they are checked by their own rules.
TOWER_SECTIONS = ("model.image", "model.text", "model.region")
_FREE_SECTIONS = ("evals",)


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an invalid value."""


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
    """Parses the ``:arg`` of a config file, typed by the defaults in ``spec``.

    ``parse_arg("runlocal,res=128", runlocal=False, res=224)`` →
    ``ConfigDict(runlocal=True, res=128)``. A bare key sets a bool to True.

    Raises:
      ConfigError: an unknown key, or a value that does not parse as the default's type.
    """
    values = dict(spec)
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        key, sep, raw = token.partition("=")
        key = key.strip()
        if key not in spec:
            raise ConfigError(f"unknown config arg {key!r}; known: {sorted(spec)}")
        default = spec[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"config arg {key!r} needs a value ({key}=...)")
            values[key] = True
            continue
        values[key] = _parse_value(key, raw.strip(), default)
    return ml_collections.ConfigDict(values)


def _parse_value(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"config arg {key!r}: expected a bool, got {raw!r}")
        return raw.lower() in ("true", "1")
    try:
        return type(default)(raw) if default is not None else raw
    except ValueError as err:
        kind = type(default).__name__
        raise ConfigError(f"config arg {key!r}: expected {kind}, got {raw!r}") from err


def validate(
    config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict | None = None
) -> None:
    """Checks ``config`` against ``schema`` (default: :func:`base_config`).

    Raises:
      ConfigError: naming the first offending key (``config.optim.lr``).
    """
    if schema is None:
        schema = base_config()
    _check_section(config, schema, "")
    for path in TOWER_SECTIONS:
        if _get(config, path) is None:
            raise ConfigError(f"config.{path}: missing")
    for path, choices in CHOICES.items():
        value = _get(config, path)
        if value is not None and value not in choices:
            raise ConfigError(f"config.{path}: {value!r} is not one of {list(choices)}")
    negatives, kind = _get(config, "data.report_negatives"), _get(config, "loss.global_kind")
    if negatives and negatives > 0 and kind not in (None, "softmax"):
        raise ConfigError(
            f"config.data.report_negatives={negatives}: hard-negative reports join the softmax "
            f"global loss only; config.loss.global_kind is {kind!r}"
        )
    _check_loss(config)
    _check_train(config)
    for section in ("evals",):
        for name, cfg in (_get(config, section) or {}).items():
            if not _is_section(cfg) or "kind" not in cfg:
                raise ConfigError(f"config.evals.{name}: needs a dict with a 'kind' key")


def _check_loss(config: Mapping) -> None:
    """Ranges of the local (GLoRIA) and box losses' keys."""
    for key in ("local_weight", "box_weight"):
        weight = _get(config, f"loss.{key}")
        if weight is not None and weight < 0:
            raise ConfigError(f"config.loss.{key}={weight}: must be ≥ 0 (0: off)")
    box = _get(config, "loss.box_weight")
    if box and not _get(config, "model.box_head.enabled"):
        raise ConfigError(
            f"config.loss.box_weight={box} trains a box head: set config.model.box_head.enabled"
        )
    for key in ("temperature1", "temperature2", "temperature3"):
        value = _get(config, f"loss.gloria.{key}")
        if value is not None and not value > 0:
            raise ConfigError(f"config.loss.gloria.{key}={value}: must be > 0")
    grid = _get(config, "loss.gloria.grid")
    if grid is not None and grid < 0:
        raise ConfigError(f"config.loss.gloria.grid={grid}: cells per axis ≥ 1, or 0 (the patches)")


def _check_train(config: Mapping) -> None:
    """Ranges of the training keys that a type check cannot see."""
    ema = _get(config, "train.ema_decay")
    if ema is not None and not 0.0 <= ema < 1.0:
        raise ConfigError(f"config.train.ema_decay={ema}: must lie in [0, 1) (0: no average)")
    accum = _get(config, "train.grad_accum")
    if accum is not None and accum < 1:
        raise ConfigError(f"config.train.grad_accum={accum}: must be at least 1")
    decay = _get(config, "optim.layer_decay")
    if decay is not None and not 0.0 < decay <= 1.0:
        raise ConfigError(f"config.optim.layer_decay={decay}: must lie in (0, 1] (1: off)")
    for tower, n in (_get(config, "optim.unlock") or {}).items():
        if tower not in ("image", "text") or not isinstance(n, int) or n < -1:
            raise ConfigError(
                f"config.optim.unlock.{tower}={n!r}: the image or text tower, a number of "
                "blocks ≥ 0 or -1 (all)"
            )


def _is_section(x: Any) -> bool:
    return isinstance(x, Mapping | ml_collections.ConfigDict)


def _get(config: Mapping, path: str) -> Any:
    node = config
    for part in path.split("."):
        if not _is_section(node) or part not in node:
            return None
        node = node[part]
    return node


def _check_section(config: Mapping, schema: Mapping, prefix: str) -> None:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"config.{path}: unknown key; known here: {sorted(schema)}")
        reference = schema[key]
        if path in TOWER_SECTIONS or path in _FREE_SECTIONS:
            continue
        if _is_section(reference):
            if not _is_section(value):
                raise ConfigError(f"config.{path}: expected a section, got {type(value).__name__}")
            _check_section(value, reference, f"{path}.")
        else:
            check_type(path, value, reference)


def check_type(path: str, value: Any, reference: Any) -> None:
    if reference is None or value is None:
        return
    if isinstance(reference, bool) or isinstance(value, bool):
        ok = isinstance(reference, bool) and isinstance(value, bool)
    elif isinstance(reference, float):
        ok = isinstance(value, int | float)
    elif isinstance(reference, tuple | list):
        ok = isinstance(value, tuple | list)
    else:
        ok = isinstance(value, type(reference))
    if not ok:
        raise ConfigError(
            f"config.{path}: expected {type(reference).__name__}, "
            f"got {type(value).__name__} ({value!r})"
        )
