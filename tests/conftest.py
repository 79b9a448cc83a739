"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Training tests compile the same small steps again and again, also in the subprocesses they
# start (which inherit this environment): a persistent compilation cache shares the work.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(__import__("tempfile").gettempdir(), "region_medclip_test_jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import importlib  # noqa: E402

import pytest  # noqa: E402


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


def pytest_configure(config):
    # grain's worker processes read absl flags; outside `app.run` they must count as parsed.
    from absl import flags

    flags.FLAGS.mark_as_parsed()
