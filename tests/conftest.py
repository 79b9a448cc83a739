"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Training tests compile the same small steps again and again, also in the subprocesses they
# start (which inherit this environment): a persistent compilation cache shares the work. It is
# private to this test session (JAX writes entries without locking, so a reader must never meet
# another run's half-written file); tests whose processes run concurrently or get killed leave
# it out (see `without_compilation_cache`).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = __import__("tempfile").mkdtemp(prefix="region_medclip_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
else:
    _OWN_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import importlib  # noqa: E402

import pytest  # noqa: E402


def without_compilation_cache(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a subprocess that must not touch the shared compilation cache."""
    env = dict(env)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    return env


def require_peer(module_name: str):
    """Imports a parity peer (torch, open_clip, ...).

    Locally a missing peer skips the test; under CI (CI=true) it is an error, because a parity
    test that silently skips in CI checks nothing.
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        if os.environ.get("CI"):
            raise RuntimeError(
                f"parity peer {module_name!r} is missing in CI: install the [parity] extra"
            ) from err
        pytest.skip(f"{module_name} not installed (install the [parity] extra)")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        __import__("shutil").rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_configure(config):
    # grain's worker processes read absl flags; outside `app.run` they must count as parsed.
    from absl import flags

    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def synth_data_dir(tmp_path_factory) -> str:
    """A TFDS data directory holding synth_cxr at 32 px, 160 films, seed 0 (the films of
    ``micro_config``), built once for the whole session and shared by every module."""
    from region_medclip.data.synth import builder

    path = str(tmp_path_factory.mktemp("tfds"))
    builder.ensure_built(path, size=32, num=160, seed=0)
    return path
