"""Checkpoints: restore on other device counts and meshes, params and config round trips."""

import jax
import jax.numpy as jnp
import micro_config
import numpy as np
import pytest

from region_medclip import checkpointing, train
from region_medclip import sharding as sharding_lib


def test_checkpoint_from_8_devices_restores_on_4_and_1(tmp_path):
    c = micro_config.get_config()
    c.mesh.fsdp = 2
    state, _ = micro_config.run_steps(c, [micro_config.random_batch(c)])
    expected = jax.device_get(state)
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(1, state, None, {"note": "test"})
    ckpt.wait()
    for devices, fsdp in ((4, 4), (4, 1), (1, 1)):
        c.mesh.fsdp = fsdp
        run = train.setup(c, sharding_lib.make_mesh(c.mesh, jax.devices()[:devices]))
        target = checkpointing.abstract_with_shardings(run.abstract, run.shardings)
        restored = ckpt.restore(1, target)
        leaf = restored.params["image_tower"]["proj"]["kernel"]
        assert len(leaf.sharding.device_set) == devices
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
    assert ckpt.restore_config(1) == {"note": "test"}
    ckpt.close()


def _tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image_tower": {"proj": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}},
        "logit_scale": np.float32(2.5),
    }


def test_save_params_round_trips_params_and_config_from_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params, config = _tree(), {"model": {"embed_dim": 3}, "note": "x"}
    checkpointing.save_params("out", params, config, step=5)
    loaded, stored, step = checkpointing.restore_params("out")
    assert step == 5 and stored == config
    assert checkpointing.read_config("out") == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
        assert isinstance(b, np.ndarray)
    # The checkpoints directory itself is accepted too.
    assert checkpointing.restore_params(str(tmp_path / "out" / "checkpoints"))[2] == 5


def test_missing_checkpoints_are_errors_naming_the_path(tmp_path):
    checkpointing.save_params(str(tmp_path / "run"), _tree(), {}, step=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        checkpointing.restore_params(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 3; have \[1\]"):
        checkpointing.restore_params(str(tmp_path / "run"), step=3)
    with pytest.raises(FileNotFoundError, match="empty"):
        checkpointing.read_config(str(tmp_path / "empty"))


def test_checkpointer_keeps_the_newest_and_restores_with_shardings(tmp_path):
    mesh = sharding_lib.make_mesh({"fsdp": 1})
    state = {"w": jnp.arange(8.0), "step": jnp.int32(0)}
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, state), None, {"step": step})
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    shardings = {"w": sharding_lib.batch_sharding(mesh), "step": sharding_lib.replicated(mesh)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = ckpt.restore(2, checkpointing.abstract_with_shardings(abstract, shardings))
    np.testing.assert_array_equal(restored["w"], np.arange(8.0) + 2)
    assert restored["w"].sharding == shardings["w"] and int(restored["step"]) == 2
    assert ckpt.restore_config(3) == {"step": 3}
    ckpt.close()
