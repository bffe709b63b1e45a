"""Multi-process runs that never hang and never mix (issue 21, item 0; items 6 and 7).

The real main.py as 2 processes x 4 CPU devices, under competing CPU load (busy-loop processes
started and stopped here), with frequent checkpoints, logs and evaluations: it must end within a
bounded time at the loss of 1 process x 8 devices, every time. Before the fix (2026-12-06) such
runs hung in some tries (4 of ~7 on a quiet machine; 0 of 9 here under load): orbax's barriers,
jitted collectives, were launched right after an asynchronously dispatched step, XLA:CPU may run
the two at once, and its gloo collectives, all on one tag, took each other's messages. The slow
suite repeats the soak; the default suite runs it once, together with a second run started on
the first one's coordinator port, which must be refused in one line per process while the first
finishes undisturbed; a deterministic test checks the mechanism (no device-collective barriers,
host collectives on the main thread only).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import multihost
from train_utils import apply_overrides

VARIANT = "steps=80"
OVERRIDES = {"batch_size": 64, "log_every": 10, "eval_every": 40, "eval_at_start": True,
             "data.num_pairs": 4096, "data.num_heldout": 256, "checkpoint_every": 10,
             "keep_checkpoints": 2}
TIMEOUT = 300  # seconds for one 2-process run on a loaded 2-core machine


def _args(overrides=None):
  values = {**OVERRIDES, **(overrides or {})}
  return [f"--config=configs/demo.py:{VARIANT}",
          *(f"--config.{key}={value}" for key, value in values.items())]


@contextlib.contextmanager
def busy_cpus(count: int = 2, limit: float = 600):
  """``count`` busy-loop processes competing for the CPUs, each also ending itself after
  ``limit`` seconds; all killed when the block exits."""
  loops = [subprocess.Popen([sys.executable, "-c",
                             f"import time\nend = time.time() + {limit}\n"
                             "while time.time() < end: pass"]) for _ in range(count)]
  try:
    yield
  finally:
    for loop in loops:
      loop.kill()
      loop.wait(timeout=10)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Losses and evaluations of the same run as 1 process x 8 devices, in this process."""
  from align_jax.train import loop as train
  from configs import demo
  workdir = tmp_path_factory.mktemp("soak_reference")
  config = demo.get_config(VARIANT)
  apply_overrides(config, OVERRIDES)
  train.train_and_evaluate(config, str(workdir))
  return multihost.losses(workdir), multihost.evals(workdir)


def _assert_equals_reference(workdir, reference):
  losses, evals = reference
  got = multihost.losses(workdir)
  assert sorted(got) == sorted(losses) == list(range(10, 81, 10))
  # gloo and XLA:CPU's in-process collectives sum in other orders: float32 noise that grows
  # over 160 steps to ~5e-6 relative (measured); a wrong or mixed batch changes the loss by far more
  np.testing.assert_allclose([got[s] for s in sorted(losses)],
                             [losses[s] for s in sorted(losses)], rtol=2e-5)
  got_evals = multihost.evals(workdir)
  assert sorted(got_evals) == sorted(evals) == [0, 40, 80]
  for step, metrics in evals.items():  # recalls over 256 pairs: equal up to one tie (1/256)
    assert got_evals[step].keys() == metrics.keys()
    np.testing.assert_allclose([got_evals[step][k] for k in metrics],
                               [metrics[k] for k in metrics], atol=1.01 / 256)


def _soak(tmp_path, reference, overrides=None):
  workdir = tmp_path / "run"
  start = time.time()
  with busy_cpus():
    multihost.run_main([*_args(overrides), f"--workdir={workdir}"], processes=2, devices=4,
                       logs=tmp_path / "logs", timeout=TIMEOUT)
  _assert_equals_reference(workdir, reference)
  return time.time() - start


def test_two_processes_under_load_equal_one_and_a_second_run_on_the_port_is_refused(
    tmp_path, reference):
  workdir, intruder_dir = tmp_path / "run", tmp_path / "intruder"
  port = multihost.free_port()
  with busy_cpus(), multihost.start_main([*_args(), f"--workdir={workdir}"], processes=2,
                                         devices=4, logs=tmp_path / "logs", port=port) as run:
    multihost.wait_for_step(str(workdir), 10, run, TIMEOUT)  # running, its coordinator up
    with multihost.start_main([*_args(), f"--workdir={intruder_dir}"], processes=2, devices=4,
                              logs=tmp_path / "intruder_logs", port=port) as intruder:
      assert intruder.wait(120) == [1, 1]
      errors = [p.output.strip().splitlines() for p in intruder.processes]
    run.wait_ok(TIMEOUT)
  assert errors[0] == [
      f"error: --coordinator_address=127.0.0.1:{port}: process 0 cannot listen on port {port} "
      "(Address already in use): another run (or program) uses it; pick a free port, the same "
      "on every process"]
  assert errors[1] == [
      f"error: something other than this run's process 0 answers at --coordinator_address="
      f"127.0.0.1:{port} (another run's coordinator?); pick a free port, the same on every "
      "process"]
  assert not intruder_dir.exists()
  _assert_equals_reference(workdir, reference)
  for process in run.processes:  # gloo's per-device connection lines are filtered out of stdout
    assert "[Gloo]" not in process.output and "Traceback" not in process.output


@pytest.mark.slow
@pytest.mark.parametrize("repeat, loss_impl", [(1, "blockwise"), (2, "gathered"), (3, "blockwise"),
                                               (4, "gathered"), (5, "blockwise")])
def test_soak_two_processes_under_load_equal_one_every_time(tmp_path, reference, repeat,
                                                           loss_impl):
  seconds = _soak(tmp_path, reference, {"loss.impl": loss_impl})
  assert seconds < TIMEOUT


def test_no_device_barriers_and_host_collectives_on_the_main_thread_only(tmp_path):
  """The mechanism of the fix, checked deterministically: orbax's barriers launch no device
  program (``sync_global_devices``: 200 calls in this run before the fix, launched right after
  asynchronously dispatched steps), and every host collective comes from the main thread."""
  record = tmp_path / "collectives.txt"
  args = ["--config=configs/demo.py:steps=30", "--config.batch_size=64",
          "--config.data.num_pairs=4096", "--config.data.num_heldout=256",
          "--config.log_every=5", "--config.checkpoint_every=5", "--config.eval_every=15",
          f"--workdir={tmp_path / 'run'}"]
  multihost.run_main(args, processes=2, devices=4, logs=tmp_path / "logs", timeout=TIMEOUT,
                     program=("tests/collective_audit.py", str(record), "main.py"))
  calls = record.read_text().splitlines()
  assert any(call.endswith(" process_allgather") for call in calls)  # evaluation, save checks
  assert not [call for call in calls if call.endswith(" sync_global_devices")]
  elsewhere = sorted({call for call in calls if not call.startswith("MainThread ")})
  assert not elsewhere, f"host collectives launched off the main thread: {elsewhere}"


def test_mismatched_num_processes_stop_both_in_one_line(tmp_path):
  port = multihost.free_port()
  env = multihost.cpu_env(4)
  logs = []
  procs = []
  for pid, num in ((0, 2), (1, 3)):
    log = tmp_path / f"p{pid}.log"
    logs.append(log)
    with open(log, "wb") as out:
      procs.append(subprocess.Popen(
          [sys.executable, "main.py", *_args(), f"--workdir={tmp_path / 'run'}",
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num}",
           f"--process_id={pid}", "--initialization_timeout=60"],
          cwd=multihost.REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  try:
    assert [p.wait(timeout=120) for p in procs] == [1, 1]
  finally:
    for p in procs:
      p.kill()
  assert logs[0].read_text().strip() == (
      "error: --num_processes=2 here but 3 on process 1: start every process with the same "
      "--num_processes")
  assert logs[1].read_text().strip() == (
      "error: --num_processes=3 here but 2 on process 0: start every process with the same "
      "--num_processes")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_killed_peer_stops_the_survivor_in_one_line_within_the_timeout(tmp_path):
  workdir = tmp_path / "run"
  args = [f"--config=configs/demo.py:steps=3000", "--config.batch_size=64",
          "--config.data.num_pairs=4096", "--config.log_every=10", "--config.checkpoint_every=20",
          "--config.eval_at_start=False", "--config.eval_every=100000", f"--workdir={workdir}"]
  with busy_cpus(1), multihost.start_main(args, processes=2, devices=4,
                                          logs=tmp_path / "logs") as run:
    multihost.wait_for_step(str(workdir), 60, run, TIMEOUT)
    os.killpg(run[1].popen.pid, signal.SIGKILL)
    killed = time.time()
    assert run[0].popen.wait(timeout=60) == 1
    seconds = time.time() - killed
  lines = run[0].output.strip().splitlines()
  assert seconds <= 15 + 3, f"noticed after {seconds:.1f} s"
  assert lines[-1].startswith("error: lost process 1 of 2 (no sign of life for 10 s); the last "
                              "checkpoint known complete is step ")
  assert lines[-1].endswith("; run the same command on every process again to resume from it")
  assert "Check failure" not in run[0].output and "Fatal Python error" not in run[0].output
