"""A thin wrapper around Orbax's ``CheckpointManager``.

Each checkpoint step holds three items: ``state`` (the sharded ``TrainState``), ``data`` (the
input iterator's position, one JSON file per process, through grain's Orbax handler) and
``config`` (the resolved config as JSON). Saves are asynchronous; ``keep`` most recent are kept.
"""

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_log = logging.getLogger("region_medclip.checkpointing")


class _FrozenIteratorState:
    """The iterator's state captured when the save is requested.

    An async save may write it after training has moved on; grain's handler calls
    ``get_state()`` (bytes) on save and ``set_state(bytes)`` + ``start_prefetch()`` on restore.
    """

    def __init__(self, iterator):
        self._iterator = iterator
        self._state = json.dumps(iterator.get_state(), indent=1).encode() if iterator else b"{}"

    def get_state(self) -> bytes:
        return self._state

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        pass


def _path(path: str) -> epath.Path:
    """``path`` as orbax takes it: a local relative path (``--workdir=runs/tiny``) made absolute,
    which orbax requires; ``gs://`` and other URLs as they are."""
    path = str(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _grain_checkpoint():
    """grain's Orbax handler for the iterator, imported where a checkpoint is opened: the model,
    the losses and the train step import this module's readers without grain installed."""
    import grain.checkpoint

    return grain.checkpoint


class Checkpointer:
    """Saves and restores (state, data iterator, config) under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        grain_checkpoint = _grain_checkpoint()
        self.directory = _path(workdir) / "checkpoints"
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain_checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (a save still in flight or killed is not one)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, iterator, config_json: dict[str, Any], *, force=False) -> bool:
        """Starts saving ``state`` (and the iterator position) as ``step``; returns at once."""
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=_grain_checkpoint().CheckpointSave(_FrozenIteratorState(iterator)),
                config=ocp.args.JsonSave(config_json),
            ),
            force=force,
        )
        if saved:
            _log.info("saving checkpoint %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state, iterator=None):
        """Restores ``step`` onto the shardings of ``abstract_state`` (a pytree of
        ``jax.ShapeDtypeStruct`` with ``sharding``), which may use a different mesh or device
        count than the run that saved it; moves ``iterator`` to the saved position."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if iterator is not None:
            items["data"] = _grain_checkpoint().CheckpointRestore(_FrozenIteratorState(iterator))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        _log.info("restored checkpoint %d from %s", step, self.directory)
        return restored["state"]

    def restore_config(self, step: int) -> dict[str, Any]:
        """The config stored with ``step``."""
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(abstract, shardings):
    """Attaches shardings to a pytree of shapes (for :meth:`Checkpointer.restore`)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def restore_params(path: str, abstract_params=None, step: int | None = None, which="params"):
    """Params of the latest checkpoint (or ``step``) in a workdir (``path``) or a
    ``checkpoints`` dir, as numpy arrays unless ``abstract_params`` (shapes with shardings) is
    given. ``which="ema"`` reads their moving average instead (``config.train.ema_decay``).
    Returns ``(params, config dict, step)``.

    Raises:
      FileNotFoundError: naming ``path`` when it holds no checkpoint.
      ValueError: ``which="ema"`` and the checkpoint holds no moving average.
    """
    if which not in ("params", "ema"):
        raise ValueError(f"restore_params(which={which!r}): choose params or ema")
    root = _path(path)
    directory = root / "checkpoints" if (root / "checkpoints").exists() else root
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    if step is None:
        step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{path}: no checkpoint found (looked in {directory})")
    if step not in manager.all_steps():
        raise FileNotFoundError(f"{path}: no checkpoint {step}; have {list(manager.all_steps())}")
    metadata = manager.item_metadata(step)["state"].tree
    if not metadata.get(which):
        manager.close()
        raise ValueError(
            f"{path}: checkpoint {step} holds no {which} (its run had config.train.ema_decay=0)"
        )
    if abstract_params is None:
        # Host numpy arrays: valid whatever topology saved them.
        target = {which: metadata[which]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
        target = {which: abstract_params}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            )
        ),
    )
    params = restored["state"][which]
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    manager.close()
    return params, config["config"], step


def read_config(path: str, step: int | None = None) -> dict[str, Any]:
    """The config stored with the latest checkpoint (or ``step``) of a workdir or ``convert``
    output, without reading its params.

    Raises:
      FileNotFoundError: naming ``path`` when it holds no checkpoint.
    """
    root = _path(path)
    directory = root / "checkpoints" if (root / "checkpoints").exists() else root
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(f"{path}: no checkpoint found (looked in {directory})")
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    manager.close()
    return config["config"]


def save_params(path: str, params, config_json: dict[str, Any], step: int = 0) -> None:
    """Writes ``params`` (and the config that builds their model) as checkpoint ``step`` of
    ``path/checkpoints``, the layout :func:`restore_params` (so ``model.init_from``,
    ``teacher.init_from`` and ``region_medclip.load``) reads."""
    directory = _path(path) / "checkpoints"
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave({"params": params}),
            config=ocp.args.JsonSave(config_json),
        ),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
