"""``python -m region_medclip.bench accum [--out=JSON]``: what gradient accumulation costs in
memory.

For each config (``tiny_roi`` and ViT-B/16 ``vitb16_roi``, region-aware), the train step at
global batch ``B = --accum_batch`` is compiled on 8 simulated CPU devices four ways:

- ``B / k``: one step of the micro-batch, unaccumulated (``k = --accum_k``);
- ``B``: the whole batch in one step;
- ``B, k global``: ``k`` micro-batches meeting the whole batch's negatives (GradCache,
  ``train.accum_negatives=global``);
- ``B, k micro``: ``k`` micro-batches each with its own negatives (``micro``).

Nothing runs: XLA's compiled memory statistics give each program's peak per device (arguments,
outputs and temporaries, less what the donated state aliases). The embedding cache is what the
GradCache step keeps between its passes: every row's embeddings and their gradients. The target
is the ``B, k global`` peak within 1.25× of the ``B / k`` peak plus that cache.
"""

import jax
import jax.numpy as jnp

from region_medclip import sharding as sharding_lib
from region_medclip import train
from region_medclip.bench import common
from region_medclip.models import vit

MIB = 2**20
CASES = {"tiny_roi": ("tiny_roi.py", None), "vitb16_roi": ("vitb16_roi.py", None)}


def _abstract_batch(config, mesh) -> dict:
    """Shapes (with the batch sharding) of one global batch of ``config``."""
    from region_medclip.data import schema

    example = schema.random_batch(config.data, config.data.batch_size, 0)
    sharding = sharding_lib.batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in example.items()
    }


def peak_mib(config) -> float:
    """Peak MiB per device of ``config``'s compiled train step on every local device."""
    config_copy = config.copy_and_resolve_references()
    config_copy.mesh.update(data=-1, fsdp=1)
    mesh = sharding_lib.make_mesh(config_copy.mesh)
    run = train.setup(config_copy, mesh)
    step = run.train_step(config_copy, mesh)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), run.abstract, run.shardings
    )
    compiled = step.lower(state, _abstract_batch(config_copy, mesh), {}).compile()
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return peak / MIB


def cache_mib(config) -> float:
    """MiB per device of every row's embeddings and their cotangents (the GradCache step's)."""
    d, rows = config.model.embed_dim, config.data.batch_size / jax.device_count()
    rois, negatives = config.data.max_rois, config.data.num_negatives
    per_row = 2 + (rois if config.loss.beta or config.loss.gamma else 0)
    per_row += rois * (1 + negatives) if config.loss.gamma else 0
    per_row += config.data.get("report_negatives", 0)
    if config.loss.get("local_weight", 0.0) > 0:  # GLoRIA's words and patch cells (§4.6)
        patch = vit.decode_variant(config.model.image.variant)["patch"]
        grid = config.loss.gloria.grid or config.data.image_size // patch
        per_row += config.data.text_len + grid**2
    return 2 * rows * per_row * d * jnp.dtype(config.model.dtype).itemsize / MIB


def measure(config, batch: int, k: int) -> dict:
    """The four peaks of ``config`` at global batch ``batch`` and ``k`` micro-batches."""

    def variant(size, accum, negatives="global"):
        c = config.copy_and_resolve_references()
        c.data.batch_size = size
        c.train.update(grad_accum=accum, accum_negatives=negatives)
        return c

    small = peak_mib(variant(batch // k, 1))
    cache = cache_mib(variant(batch, 1))
    cached = peak_mib(variant(batch, k))
    return dict(
        batch=batch,
        k=k,
        micro_step_mib=small,
        full_step_mib=peak_mib(variant(batch, 1)),
        accum_global_mib=cached,
        accum_micro_mib=peak_mib(variant(batch, k, "micro")),
        cache_mib=cache,
        global_over_target=cached / (1.25 * (small + cache)),
    )


def run(args) -> tuple[dict, str]:
    """Measures every config of :data:`CASES`; returns (results, markdown report)."""
    configs = common.load_cases(args, None, "--accum_configs", CASES)
    rows = []
    for name, config in configs.items():
        rows.append(dict(config=name, **measure(config, args.accum_batch, args.accum_k)))
    columns = [
        "config",
        "batch",
        "k",
        "micro_step_mib",
        "full_step_mib",
        "accum_global_mib",
        "accum_micro_mib",
        "cache_mib",
        "global_over_target",
    ]
    report = (
        f"Peak memory per device (MiB), {jax.device_count()} devices, global batch "
        f"{args.accum_batch}, k = {args.accum_k}; global_over_target ≤ 1 meets the target "
        "(1.25 × (B / k step + cache))\n\n" + common.markdown(rows, columns)
    )
    return dict(rows=rows, devices=jax.device_count(), cpu=common.cpu_model()), report
