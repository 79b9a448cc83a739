"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

# LLVM's optimisation level 0 for the compiled programs: the tests run tiny shapes, where compile
# time is most of a test's time and LLVM's passes are most of that (a train step compiles in
# about 60% of the time); HLO passes, sharding and float semantics are those of a real run.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
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


# Under pytest-xdist (README's command runs the suite on every core) each test goes to whichever
# worker is free, so that the cores finish together, except the tests of these modules: they
# share an expensive module-scoped fixture (a trained workdir) that one worker builds once.
SHARED_FIXTURE_MODULES = ("tests/evaluators_run_test.py",)
# Modules whose tests compile whole train steps (10-35 s each) are handed out first: a long test
# that starts last keeps one core busy while the other idles.
HEAVY_FIRST = (
    "tests/sharding_test.py",
    "tests/train_step_test.py",
    "tests/train_accum_test.py",
    "tests/evaluators_run_test.py",
    "tests/checkpointing_test.py",
    "tests/train_loop_test.py",
)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown when it is not loaded
def pytest_xdist_make_scheduler(config, log):
    """``--dist load`` with :data:`SHARED_FIXTURE_MODULES` kept together (xdist's own
    ``loadgroup`` marks no longer group under pytest 9: it renames node ids that pytest 9 no
    longer reads)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_FIXTURE_MODULES else nodeid

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Puts the :data:`HEAVY_FIRST` modules' tests first (a stable sort: the order within a
    module is kept)."""

    def rank(item) -> int:
        module = item.nodeid.split("::", 1)[0]
        return HEAVY_FIRST.index(module) if module in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)


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
