"""The real main.py as 2 processes x 4 CPU devices equals 1 process x 8 devices.

Each case starts ``main.py`` as two JAX processes on a free localhost port (tests/multihost.py),
and once as a single process with all eight devices, and compares what the runs wrote.
"""

import glob
import os

import numpy as np
import pytest

import multihost

DEMO_VARIANT = "steps=40"
DEMO_OVERRIDES = {"batch_size": 64, "log_every": 1, "eval_every": 40, "eval_at_start": False,
                  "data.num_pairs": 4096, "checkpoint_every": 40}
DEMO = [f"--config=configs/demo.py:{DEMO_VARIANT}",
        *(f"--config.{key}={value}" for key, value in DEMO_OVERRIDES.items())]
TIMEOUT = 240  # seconds for one run, on a loaded 2-core machine


def _train_in_this_process(workdir):
  """The 1 process x 8 devices reference: what main.py does with DEMO, in the test process."""
  from align_jax import train
  from configs import demo
  config = demo.get_config(DEMO_VARIANT)
  for key, value in DEMO_OVERRIDES.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  train.train_and_evaluate(config, str(workdir))


def _final_params(workdir):
  """The latest checkpoint's params, read onto this process's device whatever mesh saved them."""
  from align_jax import inference
  return inference.restore_params(str(workdir))[0]


def _assert_params_close(expected, got, atol=1e-6):
  import jax
  flat_expected, flat_got = jax.tree.leaves(expected), jax.tree.leaves(got)
  assert len(flat_expected) == len(flat_got)
  for a, b in zip(flat_expected, flat_got):
    np.testing.assert_allclose(b, a, rtol=0, atol=atol)


def _assert_writers(workdir, group):
  """Only process 0 writes metrics, config and TensorBoard; each writes its checkpoint shards."""
  workdir = os.path.abspath(workdir)
  own = [os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "config.json")]
  first, other = group[0].writes, group[1].writes
  for path in own:
    assert path in first and path not in other, path
  tensorboard = os.path.join(workdir, "tensorboard") + os.sep
  assert any(p.startswith(tensorboard) for p in first)
  assert not any(p.startswith(tensorboard) for p in other)
  assert len(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))) == 1
  for step_dir in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")):
    for process in (0, 1):
      shards = glob.glob(os.path.join(step_dir, "state", f"ocdbt.process_{process}", "d", "*"))
      assert shards, f"process {process} wrote no checkpoint shard in {step_dir}"


def test_demo_training_two_processes_equals_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  _train_in_this_process(one)
  group = multihost.run_main([*DEMO, f"--workdir={two}"], processes=2, devices=4,
                             logs=tmp_path / "l2", timeout=TIMEOUT, audit=True)
  assert "process 1 of 2" in group[1].output

  expected, got = multihost.losses(one), multihost.losses(two)
  assert sorted(got) == sorted(expected) == list(range(1, 41))
  steps = sorted(expected)
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=1e-6)
  assert multihost.evals(two) == multihost.evals(one) and 40 in multihost.evals(one)
  _assert_params_close(_final_params(one), _final_params(two))
  _assert_writers(two, group)
