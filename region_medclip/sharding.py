"""The device mesh and how arrays are laid out on it, declared once by logical axis name.

Mesh axes are ``("data", "fsdp")``. The batch is split over both axes (every device holds
``global_batch / num_devices`` examples); parameters are replicated, or with ``mesh.fsdp > 1``
split along their ``embed`` logical axis over ``fsdp`` (ZeRO-3 style: XLA all-gathers a layer's
weights where it is used and reduce-scatters its gradient).

One rules table (:func:`logical_rules`) maps every logical name to mesh axes: the parameters'
(``embed``, ``mlp``, ...), the activations' (``batch``, ``length``) and the ``jax.shard_map``
specs of the losses (:func:`logical_spec`). :func:`with_logical_rules` runs a jitted function
on its mesh, where the modules' activation annotations (:func:`constrain`) constrain GSPMD's
layout.
"""

import contextlib
from collections.abc import Callable, Sequence

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


def logical_rules(mesh) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Logical axes → mesh axes, in priority order.

    ``batch`` (activations) is split over every batch axis and comes first: an activation
    ``[batch, length, embed]`` then finds ``fsdp`` taken and keeps ``embed`` whole, while a
    parameter (which has no ``batch`` axis) splits ``embed`` over ``fsdp`` when it is > 1.
    """
    fsdp = "fsdp" if mesh.shape["fsdp"] > 1 else None
    return (
        ("batch", BATCH_AXES),
        ("length", None),
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


def logical_spec(names: tuple[str | None, ...], mesh) -> P:
    """The ``PartitionSpec`` of logical axis ``names`` under :func:`logical_rules` (for
    ``jax.shard_map`` specs and explicit shardings)."""
    return P(*nn.logical_to_mesh_axes(names, logical_rules(mesh)))


@contextlib.contextmanager
def rules_context(mesh: Mesh):
    """``mesh`` as the ambient mesh: inside it, :func:`constrain` annotations become sharding
    constraints under :func:`logical_rules` (outside it they are no-ops).

    The table is passed to flax explicitly rather than entered with ``nn.logical_axis_rules``:
    under flax's rules context a ``DenseGeneral`` with logically named multi-axis features
    constrains its kernel while still flat (at init and at apply's shape check) and fails.
    """
    with jax.set_mesh(mesh):
        yield


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """``x`` constrained to the layout of logical axis ``names`` on the ambient mesh (a no-op
    without one, e.g. when a model is applied outside the train step)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return nn.with_logical_constraint(x, names, rules=logical_rules(mesh))


class _WithRules:
    """A jitted function traced, lowered and called inside :func:`rules_context`."""

    def __init__(self, fn: Callable, mesh: Mesh):
        self._fn, self._mesh = fn, mesh

    def __call__(self, *args, **kwargs):
        with rules_context(self._mesh):
            return self._fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with rules_context(self._mesh):
            return self._fn.lower(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fn, name)


def with_logical_rules(jitted: Callable, mesh: Mesh) -> Callable:
    """``jitted`` run (and lowered, ``.lower(...)``) inside :func:`rules_context` of ``mesh``."""
    return _WithRules(jitted, mesh)
