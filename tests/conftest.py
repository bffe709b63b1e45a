"""Test set-up: eight simulated CPU devices, so sharded code runs as on a pod slice.

XLA reads XLA_FLAGS once, when jax is first imported, so this must run before any test module
imports jax. Tests marked ``slow`` are left out of the default run (see README).
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Compile once per session: many tests build the same tiny trainer or model (same program, new
# Python closures), and every subprocess a test starts (the CLI, the 2-process harness) compiles it
# again. JAX's persistent cache, keyed on the program, the devices and the compiler flags, lets
# each later copy load the executable instead. A fresh folder per session, so no run depends on
# an earlier one; set JAX_ENABLE_COMPILATION_CACHE=false to run without it. Subprocesses inherit
# it through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="align_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (must follow the XLA_FLAGS line above)
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: longer tests, run with `-m slow` (see README)")


@pytest.fixture(scope="session")
def devices():
  """The eight simulated devices; fails loudly if XLA_FLAGS was applied too late."""
  found = jax.devices()
  assert len(found) == 8, f"expected 8 simulated devices, got {len(found)}"
  return found


@pytest.fixture(scope="session")
def torch():
  """PyTorch, for reference outputs of the transformers models; tests that need it skip without."""
  return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny_demo_run(tmp_path_factory):
  """``train_utils.tiny_config()`` trained once per session (6 steps, metrics, evals, checkpoints
  at 3 and 6): ``(config, workdir, last metrics)``. Shared by every test that only reads a
  finished demo run; read-only (copy the folder to change it)."""
  from align_jax.train import loop as train
  from train_utils import tiny_config
  config = tiny_config()
  workdir = str(tmp_path_factory.mktemp("tiny_demo_run"))
  last = train.train_and_evaluate(config, workdir)
  return config, workdir, last
