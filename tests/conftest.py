"""Shared test setup: fast compiles on 2-core CPUs and the real-data location."""
import os
import pathlib

_REPO = pathlib.Path(__file__).resolve().parents[1]

# Must be set before JAX initialises its backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One cache per pytest-xdist worker: JAX writes cache entries non-atomically, so two workers must not share a
# folder. JAX reads it from the environment at import, and the tests' subprocesses (launch.py, 4 devices, SIGKILL)
# inherit it.
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_REPO / ".jax_cache" / os.environ.get("PYTEST_XDIST_WORKER", "main"))

from clflax.runtime import hugepages  # noqa: E402

# Huge pages for XLA:CPU's per-step buffers, as launch.py gets them (clflax/runtime/hugepages.py). glibc reads the tunable at
# process start, so it reaches the pytest-xdist workers (started after this file is read) and the tests'
# subprocesses, not this process.
_TUNED = hugepages.tuned_environ(os.environ, hugepages.thp_mode(), hugepages.glibc_version())
if _TUNED:
  os.environ["GLIBC_TUNABLES"] = _TUNED["GLIBC_TUNABLES"]

import jax  # noqa: E402
import pytest  # noqa: E402

# Test models are tiny: XLA's heavy optimisation passes cost more than they save.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Real data shipped beside the checkout (never by the package); tests skip without it.
SHARED_DATA = pathlib.Path(os.environ.get("CLFLAX_SHARED_DATA", _REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data():
  """Path of ../shared/data; skips the test when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (set CLFLAX_SHARED_DATA)")
  return SHARED_DATA


# Files whose module fixtures run whole trainings, heaviest first: pytest-xdist hands files out in collection
# order, so starting these first keeps one of them from being the last thing a single worker runs.
_HEAVY_FIRST = ("test_multiprocess.py", "test_reliability.py", "test_parallel.py", "test_train_e2e.py",
                "test_strategies_wiring.py", "test_models_multitask.py", "test_bench.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the rest keep their order.
