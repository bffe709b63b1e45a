"""SIGTERM (a preemption notice) saves a checkpoint at that step and exits 0; rerunning continues.

The resumed trajectory must equal an uninterrupted run's: every step logged once, the same losses
and evaluations, the same final params.
"""

import re

import numpy as np

import multihost
import train_utils
from align_jax.parallel import preemption
from align_jax.train import loop as train

VARIANT = "steps=100"
OVERRIDES = {"batch_size": 64, "log_every": 1, "eval_every": 40, "eval_at_start": False,
             "data.num_pairs": 4096, "checkpoint_every": 1000}
ARGS = [f"--config=configs/demo.py:{VARIANT}",
        *(f"--config.{key}={value}" for key, value in OVERRIDES.items())]
PREEMPTED = re.compile(r"preempted: saved a checkpoint at step (\d+) of 100 in \S+; run the same "
                       r"command to continue")


def _demo_config():
  from configs import demo
  config = demo.get_config(VARIANT)
  train_utils.apply_overrides(config, OVERRIDES)
  return config


def _params(workdir):
  from align_jax.run import reader as run_dir
  return run_dir.restore_params(str(workdir))[0]


def _assert_same_run(reference, resumed, total):
  import jax
  assert multihost.logged_steps(resumed) == list(range(1, total + 1))  # none twice, none lost
  assert multihost.losses(resumed) == multihost.losses(reference)  # bit-identical
  assert multihost.evals(resumed) == multihost.evals(reference)
  jax.tree.map(np.testing.assert_array_equal, _params(reference), _params(resumed))


def test_sigterm_saves_exits_zero_and_the_same_command_continues(tmp_path):
  reference, run = tmp_path / "reference", tmp_path / "run"
  train.train_and_evaluate(_demo_config(), str(reference))  # uninterrupted, 1 process x 8

  command = [*ARGS, f"--workdir={run}"]
  with multihost.start_main(command, processes=1, devices=8, logs=tmp_path / "a") as group:
    reached = multihost.wait_for_step(str(run), 10, group, timeout=240)
    group[0].signal(15)  # SIGTERM
    assert group.wait(timeout=120) == [0], group.tails()
  found = PREEMPTED.search(group[0].output)
  assert found, group.tails()
  step = int(found.group(1))
  assert reached <= step < 100
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [step]
  assert multihost.logged_steps(run)[-1] == step

  again = multihost.run_main(command, processes=1, devices=8, logs=tmp_path / "b", timeout=240)
  assert f"restored checkpoint at step {step}" in again[0].output
  _assert_same_run(reference, run, 100)


def test_preemption_at_an_evaluation_step_evaluates_after_the_restart(tmp_path, monkeypatch):
  """Saving comes first at a preemption; the evaluation due at that step runs when resumed."""
  config = train_utils.tiny_config(**{"total_steps": 8, "log_every": 1, "eval_every": 4,
                                      "checkpoint_every": 100})
  reference, run = tmp_path / "reference", tmp_path / "run"
  train.train_and_evaluate(config, str(reference))
  assert sorted(multihost.evals(reference)) == [4, 8]

  seen = []

  def preempt_at_4(self, step):
    seen.append(step)
    return step == 4

  with monkeypatch.context() as patch:
    patch.setattr(preemption.PreemptionWatch, "reached", preempt_at_4)
    train.train_and_evaluate(config, str(run))
  assert seen == [1, 2, 3, 4]  # stopped right after the agreed step
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [4]
  assert multihost.evals(run) == {}  # not yet: the save came first
  train.train_and_evaluate(config, str(run))
  _assert_same_run(reference, run, 8)


def test_single_process_watch_catches_sigterm_and_restores_the_handler():
  import signal
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatch() as watch:
    assert not watch.distributed  # no jax.distributed here: its own handler
    assert not watch.reached(1)
    signal.raise_signal(signal.SIGTERM)  # handled: the test process does not die
    assert watch.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before
