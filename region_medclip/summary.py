"""Parameter table of a config, per tower and total, without allocating any weights.

python -m region_medclip.summary --config=configs/vitb16_roi.py
"""

import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from region_medclip import config_lib
from region_medclip.models import clip

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (FILE[:args]).")

# Parameter subtrees → the tower they belong to in the table.
_TOWERS = {
    "image_tower": "image",
    "text_tower": "text",
    "region_tower": "region",
    "logit_scale": "head",
    "logit_bias": "head",
}


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict:
    """Abstract model inputs for ``config``: ``images [B, S, S, 3]``, ``texts [B, L]``,
    ``boxes [B, R, 4]``, ``roi_mask [B, R]`` as ``jax.ShapeDtypeStruct``."""
    size, rois = config.data.image_size, config.data.max_rois
    return dict(
        images=jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
        texts=jax.ShapeDtypeStruct((batch_size, config.data.text_len), jnp.int32),
        boxes=jax.ShapeDtypeStruct((batch_size, rois, 4), jnp.float32),
        roi_mask=jax.ShapeDtypeStruct((batch_size, rois), jnp.bool_),
    )


def abstract_params(config: ml_collections.ConfigDict) -> Mapping:
    """The parameter tree of ``config.model`` as shapes only (``jax.eval_shape``)."""
    model = clip.from_config(config.model)
    inputs = example_inputs(config)
    variables = jax.eval_shape(
        lambda rng, inputs: model.init(rng, **inputs), jax.random.key(0), inputs
    )
    return variables["params"]


def count(tree) -> int:
    """Number of scalars in a (possibly abstract, possibly logically boxed) parameter tree."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def param_table(config: ml_collections.ConfigDict) -> dict[str, int]:
    """``{"image": n, "text": n, "region": n, "head": n, "total": n}`` parameter counts."""
    params = abstract_params(config)
    table = {"image": 0, "text": 0, "region": 0, "head": 0}
    for key, subtree in params.items():
        table[_TOWERS[key]] += count(subtree)
    table["total"] = sum(table.values())
    return table


def format_table(config: ml_collections.ConfigDict, table: dict[str, int]) -> str:
    """Renders :func:`param_table` as a fixed-width text table."""
    image, text = config.model.image, config.model.text
    lines = [
        f"image {image['variant']} @ {config.data.image_size}px, text {text['kind']} "
        f"{text['variant']} (L={config.data.text_len}), embed_dim {config.model.embed_dim}",
        f"{'tower':<10}{'params':>16}{'millions':>12}",
    ]
    for name, value in table.items():
        if name == "total":
            lines.append("-" * 38)
        lines.append(f"{name:<10}{value:>16,}{value / 1e6:>11.2f}M")
    return "\n".join(lines)


def main(argv):
    del argv
    # JAX logs its (expected) failure to find a TPU at INFO; keep the table clean.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    config = _CONFIG.value
    config_lib.validate(config)
    print(format_table(config, param_table(config)))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
