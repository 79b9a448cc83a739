"""Parameter counts of a config, per tower and total, from shapes alone (nothing allocated)."""

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from region_medclip.models import clip

# Parameter subtrees → the tower they belong to in the table.
_TOWERS = {
    "image_tower": "image",
    "text_tower": "text",
    "region_tower": "region",
    "box_tower": "region",
    "logit_scale": "head",
    "logit_bias": "head",
}


def abstract_params(config: ml_collections.ConfigDict) -> Mapping:
    """The parameter tree of ``config.model`` as shapes only (``jax.eval_shape``)."""
    model = clip.from_config(config.model)
    inputs = clip.example_inputs(config.data)
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
