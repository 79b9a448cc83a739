"""Config helpers: the ``file.py:arg`` parser and start-up validation against the schema.

The schema is ``configs/common.py:base_config()``: every section, key and type a config may have.
Validation runs before anything is built or compiled, so a typo in a config file or on the
command line is an error naming the key rather than a silently ignored setting.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

# Allowed values of string-valued keys (dotted path → choices).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.text.kind": ("clip", "bert"),
    "model.image.pool": ("cls", "gap", "map"),
    "model.region.pool": ("mean", "attn"),
    "model.region.proj": ("own", "shared"),
    "loss.global_kind": ("softmax", "sigmoid", "medclip", "dhn_nce"),
    "loss.sigmoid_impl": ("ring", "gather"),
    "loss.dhn_nce.reduction": ("mean", "sum"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.mu_dtype": ("float32", "bfloat16"),
}

# Sections whose keys are not fixed by the schema; they are checked by their own rules.
_TOWER_SECTIONS = ("model.image", "model.text", "model.region")
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
    """Checks ``config`` against ``schema`` (default: ``configs.common.base_config()``).

    Raises:
      ConfigError: naming the first offending key (``config.optim.lr``).
    """
    if schema is None:
        from configs import common  # the schema lives with the configs

        schema = common.base_config()
    _check_section(config, schema, "")
    for path in _TOWER_SECTIONS:
        _check_tower(path, _get(config, path), config)
    for path, choices in CHOICES.items():
        value = _get(config, path)
        if value is not None and value not in choices:
            raise ConfigError(f"config.{path}: {value!r} is not one of {list(choices)}")
    for section in ("evals",):
        for name, cfg in (_get(config, section) or {}).items():
            if not _is_section(cfg) or "kind" not in cfg:
                raise ConfigError(f"config.evals.{name}: needs a dict with a 'kind' key")


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
        if path in _TOWER_SECTIONS or path in _FREE_SECTIONS:
            continue
        if _is_section(reference):
            if not _is_section(value):
                raise ConfigError(f"config.{path}: expected a section, got {type(value).__name__}")
            _check_section(value, reference, f"{path}.")
        else:
            _check_type(path, value, reference)


def _check_type(path: str, value: Any, reference: Any) -> None:
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


def _check_tower(path: str, tower: Mapping | None, config: Mapping) -> None:
    """Tower sections go straight into module constructors: check their keys against the
    module's own fields, so a misspelt field fails here and not deep inside Flax."""
    from region_medclip.models import region, text, vit

    if tower is None:
        raise ConfigError(f"config.{path}: missing")
    tower = dict(tower)
    if path == "model.image":
        module, extra = vit.ViT, {"variant"}
    elif path == "model.text":
        kind = tower.get("kind")
        if kind not in ("clip", "bert"):
            raise ConfigError(f"config.{path}.kind: {kind!r} is not one of ['clip', 'bert']")
        module, extra = (text.CLIPText if kind == "clip" else text.BertText), {"kind", "variant"}
    else:
        module, extra = region.RegionHead, set()
    # The composite supplies these from the model section itself.
    owned = {"embed_dim", "dtype", "param_dtype", "remat", "parent", "name"}
    fields = {f.name: f.type for f in dataclasses.fields(module)}
    allowed = set(fields) - owned | extra
    for key, value in tower.items():
        if key not in allowed:
            raise ConfigError(f"config.{path}.{key}: unknown key; known here: {sorted(allowed)}")
        if fields.get(key) in (int, float, str, bool):
            _check_type(f"{path}.{key}", value, fields[key]())
    if "variant" in extra and "variant" not in tower:
        raise ConfigError(f"config.{path}.variant: missing")
