"""The --distributed flags: values from flags or the environment, and one-line errors."""

import socket
import subprocess
import sys
import time
import types

import pytest
from absl import flags

from align_jax.parallel import processes as distributed
import multihost


def _values(**given):
  values = dict(distributed=False, coordinator_address=None, num_processes=None, process_id=None,
                initialization_timeout=300)
  values.update(given)
  return types.SimpleNamespace(**values)


def test_no_flag_is_a_single_process_run():
  assert distributed.settings_from(_values(), environ={}) is None
  # the environment alone does not turn a run into a multi-process one
  assert distributed.settings_from(
      _values(), environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}) is None


def test_flags_and_environment():
  got = distributed.settings_from(_values(coordinator_address="10.0.0.1:1234", num_processes=4,
                                          process_id=3, initialization_timeout=30), environ={})
  assert got == distributed.Settings("10.0.0.1:1234", 4, 3, 30)
  env = {"JAX_COORDINATOR_ADDRESS": "node-0:8476", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  assert distributed.settings_from(_values(distributed=True), environ=env) == (
      distributed.Settings("node-0:8476", 2, 1, 300))
  # flags win over the environment; one flag implies --distributed
  assert distributed.settings_from(_values(process_id=0), environ=env) == (
      distributed.Settings("node-0:8476", 2, 0, 300))
  # the coordinator from the environment alone: jax's cluster detection may fill in the rest
  assert distributed.settings_from(
      _values(distributed=True), environ={"JAX_COORDINATOR_ADDRESS": "node-0:8476"}) == (
      distributed.Settings("node-0:8476", None, None, 300))
  # --distributed alone: jax's cluster detection fills in everything
  assert distributed.settings_from(_values(distributed=True), environ={}) == (
      distributed.Settings(None, None, None, 300))


def test_parsed_absl_flags_give_the_settings():
  """The one definition of the six options (absl), parsed as a command parses them."""
  values = flags.FlagValues()
  distributed.define_flags(values)
  distributed.define_flags(values)  # a second call (another command's) changes nothing
  assert sorted(values) == ["coordinator_address", "distributed", "initialization_timeout",
                            "num_processes", "peer_timeout", "process_id"]
  values(["prog", "--coordinator_address=h:5", "--num_processes=2", "--process_id=1",
          "--peer_timeout=7"])
  assert distributed.settings_from(values, environ={}) == distributed.Settings(
      "h:5", 2, 1, 300, peer_timeout=7)
  values.unparse_flags()
  values(["prog"])
  assert distributed.settings_from(values, environ={}) is None


@pytest.mark.parametrize("given, env, message", [
    (dict(coordinator_address="10.0.0.1:1234", process_id=0), {},
     "--num_processes is required with --coordinator_address (or set JAX_NUM_PROCESSES)"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2), {},
     "--process_id is required with --coordinator_address (or set JAX_PROCESS_ID)"),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), {},
     "--coordinator_address must be HOST:PORT (e.g. 10.0.0.1:1234), got '10.0.0.1'"),
    (dict(coordinator_address="h:99999", num_processes=2, process_id=0), {},
     "--coordinator_address must be HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {},
     "--process_id must be below --num_processes=2 (0 .. 1), got 2"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), {},
     "--num_processes must be at least 1, got 0"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=-1), {},
     "--process_id must be 0 or more, got -1"),
    (dict(distributed=True), {"JAX_NUM_PROCESSES": "two"},
     "JAX_NUM_PROCESSES='two' (for --num_processes) is not an integer"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0, initialization_timeout=0), {},
     "--initialization_timeout must be at least 1 second, got 0"),
])
def test_bad_values_name_the_flag(given, env, message):
  with pytest.raises(distributed.DistributedError) as error:
    distributed.settings_from(_values(**given), environ=env)
  assert str(error.value) == message or str(error.value).startswith(message)


def _main(*args, timeout=120):
  start = time.time()
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/demo.py:steps=2", "--workdir=/nonexistent",
       *args], cwd=multihost.REPO, env=multihost.cpu_env(4), capture_output=True, text=True,
      timeout=timeout)
  return result, time.time() - start


def _one_error_line(result):
  assert result.returncode != 0
  assert "Traceback" not in result.stdout + result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr
  assert "Check failure" not in result.stderr and "@ " not in result.stderr  # no C++ trace
  return errors[0]


def test_cli_missing_value_is_one_line():
  result, _ = _main("--coordinator_address=127.0.0.1:1234", "--process_id=0")
  assert _one_error_line(result) == (
      "error: --num_processes is required with --coordinator_address (or set JAX_NUM_PROCESSES)")


def test_cli_coordinator_that_does_not_answer_times_out_in_one_line():
  port = multihost.free_port()
  result, seconds = _main(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          "--process_id=1", "--initialization_timeout=2")
  assert _one_error_line(result) == (
      f"error: --coordinator_address=127.0.0.1:{port}: nothing answered there within "
      "--initialization_timeout=2 s; start process 0 (--process_id=0) on that host, with the "
      "same address and port")
  assert seconds < 60


def test_cli_coordinator_alone_waits_for_the_others_then_one_line():
  port = multihost.free_port()
  result, _ = _main(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    "--process_id=0", "--initialization_timeout=2")
  assert _one_error_line(result) == (
      f"error: not all --num_processes=2 processes connected to --coordinator_address=127.0.0.1:"
      f"{port} within --initialization_timeout=2 s; start every --process_id 0..1 with the same "
      "address")


def test_cli_port_in_use_and_no_cluster():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
    busy.bind(("", 0))
    busy.listen()
    port = busy.getsockname()[1]
    result, _ = _main(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                      "--process_id=0")
  assert _one_error_line(result).startswith(
      f"error: --coordinator_address=127.0.0.1:{port}: process 0 cannot listen on port {port}")
  result, _ = _main("--distributed")  # this machine is no Cloud TPU VM and no SLURM job
  assert _one_error_line(result) == (
      "error: --distributed: jax detected no cluster (Cloud TPU, SLURM, Open MPI, Kubernetes) to "
      "take --coordinator_address from; pass --coordinator_address=HOST:PORT --num_processes=N "
      "--process_id=I on every process")


def test_gloo_connection_chatter_is_recognised_in_pieces():
  """gloo's per-device connection message, whole or interleaved by concurrent device threads (as
  seen in a 2-process run's stdout), is dropped; the run's own lines are kept."""
  chatter = [b"[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer "
             b"ranks is : 1",
             b"er ranks. [Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected "
             b"peer ranks is : 1",
             b"Expected number of connected peer ranks is : 1"]
  kept = [b"2026-12-06 12:42:27,205 trainable parameters: 99,457 (image: 49,728, logit: 1, "
          b"text: 49,728)", b"step 0 eval: eval/i2t@1=0.0117", b""]
  assert all(distributed.is_gloo_chatter(line) for line in chatter)
  assert not any(distributed.is_gloo_chatter(line) for line in kept)
