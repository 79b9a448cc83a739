"""The device mesh and how arrays are laid out on it.

Mesh axes are ``("data", "fsdp")``. The batch is split over both axes (every device holds
``global_batch / num_devices`` examples); parameters are replicated, or with ``mesh.fsdp > 1``
split along their ``embed`` logical axis over ``fsdp`` (ZeRO-3 style: XLA all-gathers a layer's
weights where it is used and reduce-scatters its gradient).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
# The axes the batch is split over; the losses' `axis_name` inside `jax.shard_map`.
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """``config.mesh`` → a ``Mesh`` of shape ``[data, fsdp]``.

    ``data = -1`` takes every device ``fsdp`` does not use. A size that does not divide the
    device count is a clear error naming the key.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    fsdp = int(mesh_config.get("fsdp", 1))
    data = int(mesh_config.get("data", -1))
    if fsdp < 1 or count % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must be ≥ 1 and divide {count} devices")
    if data == -1:
        data = count // fsdp
    if data * fsdp != count:
        raise ValueError(
            f"config.mesh.data={data} × config.mesh.fsdp={fsdp} must equal the {count} devices"
        )
    # Devices in their natural order: on a single host this keeps the fsdp groups (the inner
    # axis, where all-gathers happen) on neighbouring devices.
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def logical_rules(mesh: Mesh) -> tuple[tuple[str, str | None], ...]:
    """Logical parameter axes → mesh axes. Only ``embed`` is ever split (over ``fsdp``)."""
    fsdp = "fsdp" if mesh.shape["fsdp"] > 1 else None
    return (
        ("embed", fsdp),
        ("mlp", None),
        ("heads", None),
        ("kv", None),
        ("vocab", None),
        ("joint", None),
    )


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops the split of any dimension the mesh axis does not divide (kept replicated)."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
        fitted.append(axis if dim % size == 0 else None)
    return P(*fitted)


def param_shardings(boxed_params, mesh: Mesh):
    """Shardings for a pytree of (possibly ``nn.LogicallyPartitioned``) params or their shapes.

    Returns a pytree with the structure of the *unboxed* params, each leaf a ``NamedSharding``.
    """
    specs = nn.get_partition_spec(boxed_params)
    mesh_specs = nn.logical_to_mesh(specs, logical_rules(mesh))
    shapes = nn.meta.unbox(boxed_params)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, P),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))
