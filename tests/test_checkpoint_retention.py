"""Retention can never remove the newest checkpoint (issue 21, item 1).

``--config.keep_checkpoints=0`` used to delete every checkpoint (the one just saved included) and
exit 0, so a rerun trained from step 0. It is refused in one line before anything runs, and
:class:`align_jax.run.checkpoint.KeepNewest` (the orbax retention policy) keeps the highest step
whatever it is given.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from align_jax.run import checkpoint as checkpoint_lib
from align_jax.config import schema as config_lib
from align_jax.train import validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class _Info:
  step: int


def _state(step):
  return {"w": jax.numpy.full((4, 3), float(step)), "step": jax.numpy.int32(step)}


def _save(workdir, steps, keep):
  checkpointer = checkpoint_lib.Checkpointer(workdir, every=1, keep=keep, async_save=False)
  for step in steps:
    checkpointer.maybe_save(step, _state(step), {"position": step})
  checkpointer.close()


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused_in_one_line(keep):
  config = config_lib.default_config()
  config.keep_checkpoints = keep
  with pytest.raises(ValueError, match=rf"keep_checkpoints must be >= 1 \(got {keep}\)"):
    validation.validate(config, num_batch_devices=1)
  with pytest.raises(ValueError, match=rf"keep_checkpoints must be >= 1 \(got {keep}\)") as error:
    checkpoint_lib.KeepNewest(keep)
  assert "\n" not in str(error.value)


def test_checkpointer_with_keep_zero_touches_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  _save(workdir, [1, 2], keep=3)
  with pytest.raises(ValueError, match=r"keep_checkpoints must be >= 1 \(got 0\)"):
    checkpoint_lib.Checkpointer(workdir, every=1, keep=0, async_save=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]


def test_policy_keeps_the_highest_steps_in_any_order():
  infos = [_Info(30), _Info(10), _Info(40), _Info(20)]  # not in step order
  assert checkpoint_lib.KeepNewest(2).should_preserve(infos) == [True, False, True, False]
  assert checkpoint_lib.KeepNewest(1).should_preserve(infos) == [False, False, True, False]
  assert checkpoint_lib.KeepNewest(None).should_preserve(infos) == [True] * 4
  assert checkpoint_lib.KeepNewest(1).should_preserve([_Info(7)]) == [True]
  assert checkpoint_lib.KeepNewest(1).should_preserve([]) == []


def test_keep_one_keeps_the_newest_and_it_restores(tmp_path):
  workdir = str(tmp_path / "run")
  _save(workdir, [1, 2, 3], keep=1)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  checkpointer = checkpoint_lib.Checkpointer(workdir, every=1, keep=1, async_save=False)
  state, data, step = checkpointer.restore_latest(checkpoint_lib.abstract_like(_state(0)))
  checkpointer.close()
  assert step == 3 and data == {"position": 3}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 3.0, np.float32))


def test_cli_refuses_keep_zero_before_training(tmp_path):
  """Issue 21's repro: it used to train, delete every checkpoint and exit 0."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/demo.py", "--config.total_steps=20",
       "--config.checkpoint_every=10", "--config.keep_checkpoints=0", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "Traceback" not in result.stdout + result.stderr
  problem = [line for line in result.stderr.splitlines() if "keep_checkpoints" in line]
  assert problem == ["  - keep_checkpoints must be >= 1 (got 0): retention always keeps the "
                     "newest checkpoint; set --config.keep_checkpoints=N"], result.stderr
  assert not (workdir / "checkpoints").exists()  # refused before training
