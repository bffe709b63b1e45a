"""Runs the real ``main.py`` as several JAX processes on this machine, for multi-host tests.

Each process gets ``JAX_PLATFORMS=cpu`` and its own simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), and the processes find each other
through the ``--coordinator_address/--num_processes/--process_id`` flags on a free localhost
port, exactly as hosts of a pod would. Every wait is bounded, and whatever was started is killed
when the ``with`` block ends (or the test fails).

``audit=True`` runs ``main.py`` under :mod:`tests.write_audit`, which records every file a
process opens for writing from Python (``PROCESS.writes``), to check which process writes what.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT = os.path.join(REPO, "tests", "write_audit.py")


def free_port() -> int:
  """A localhost TCP port nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def cpu_env(devices: int, extra: dict | None = None) -> dict:
  """This environment, with ``devices`` simulated CPU devices instead of conftest's eight."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  env.update(extra or {})
  return env


class Process:
  """One started ``main.py`` process; its output goes to ``log`` (no pipe to fill up)."""

  def __init__(self, program: Sequence[str], args: Sequence[str], env: dict, log: str,
               audit: str | None):
    self.log = log
    self.audit = audit
    prefix = [sys.executable] + ([AUDIT, audit] if audit else [])
    with open(log, "wb") as out:
      self.popen = subprocess.Popen([*prefix, *program, *args], cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

  @property
  def output(self) -> str:
    with open(self.log, errors="replace") as f:
      return f.read()

  def _audit(self, kind: str) -> list[str]:
    if not self.audit or not os.path.exists(self.audit):
      return []
    with open(self.audit) as f:
      return [line[2:].rstrip("\n") for line in f if line.startswith(kind + " ")]

  @property
  def writes(self) -> set[str]:
    """Absolute paths this process opened for writing from Python (``audit=True`` only)."""
    return set(self._audit("w"))

  @property
  def reads(self) -> list[str]:
    """Files under ``reads_under`` (see :func:`start_main`) this process opened, in order."""
    return self._audit("r")

  def signal(self, sig: int) -> None:
    if self.popen.poll() is None:
      self.popen.send_signal(sig)

  def kill(self) -> None:
    """SIGKILL to the process group (grain workers included), then reap it."""
    if self.popen.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(self.popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
      self.popen.wait(timeout=30)


class Group:
  """The processes of one run (one process, or several forming one JAX program)."""

  def __init__(self, processes: list[Process]):
    self.processes = processes

  def __getitem__(self, index: int) -> Process:
    return self.processes[index]

  def wait(self, timeout: float) -> list[int]:
    """Waits for every process (within ``timeout`` seconds in all); their exit codes.

    Fails the test, showing each process's output tail, if one is still running at the deadline
    or exited non-zero.
    """
    deadline = time.time() + timeout
    for process in self.processes:
      try:
        process.popen.wait(timeout=max(deadline - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        self.kill()
        raise AssertionError(f"still running after {timeout:.0f} s:\n{self.tails()}") from None
    return [p.popen.returncode for p in self.processes]

  def wait_ok(self, timeout: float) -> None:
    codes = self.wait(timeout)
    assert codes == [0] * len(codes), f"exit codes {codes}:\n{self.tails()}"

  def tails(self, lines: int = 25) -> str:
    return "\n".join(f"--- process {i} ---\n" + "\n".join(p.output.splitlines()[-lines:])
                     for i, p in enumerate(self.processes))

  def kill(self) -> None:
    for process in self.processes:
      process.kill()


@contextlib.contextmanager
def start_main(args: Sequence[str], *, processes: int, devices: int, logs: str,
               audit: bool = False, reads_under: str | None = None, port: int | None = None,
               program: Sequence[str] = ("main.py",)) -> Iterator[Group]:
  """Starts ``main.py ARGS`` as ``processes`` JAX processes with ``devices`` CPU devices each.

  With one process no distributed flag is passed (a plain single-host run). ``logs``: a folder
  for each process's output (``process-I.log``) and audit record. ``audit``: record the files
  each process writes, and reads under the folder ``reads_under``. ``port``: the coordinator's
  (default: a free one). ``program``: what runs instead of ``main.py`` (e.g. ``("-m",
  "align_jax.cli.export")``; ``audit`` needs a script path). Everything started is SIGKILLed
  when the block exits, so a failing test leaves nothing running.
  """
  assert not audit or not program[0].startswith("-"), "the write audit runs a script path"
  os.makedirs(logs, exist_ok=True)
  env = cpu_env(devices, {"ALIGN_JAX_AUDIT_READS": str(reads_under)} if reads_under else None)
  started = []
  try:
    port = port or free_port()
    for index in range(processes):
      flags = [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}",
                                        f"--num_processes={processes}", f"--process_id={index}",
                                        "--initialization_timeout=120"]
      audit_file = os.path.join(logs, f"writes-{index}.txt") if audit else None
      started.append(Process(program, [*args, *flags], env,
                             os.path.join(logs, f"process-{index}.log"), audit_file))
    yield Group(started)
  finally:
    for process in started:
      process.kill()


def run_main(args: Sequence[str], *, processes: int, devices: int, logs: str, timeout: float,
             **kwargs) -> Group:
  """Runs ``main.py ARGS`` to completion as in :func:`start_main`; fails unless all exit 0."""
  with start_main(args, processes=processes, devices=devices, logs=logs, **kwargs) as group:
    group.wait_ok(timeout)
  return group


def wait_for_step(workdir: str, step: int, group: Group, timeout: float) -> int:
  """Waits until ``WORKDIR/metrics.jsonl`` has a train line at ``step`` or later; that step."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [s for s in logged_steps(workdir) if s >= step]
    if steps:
      return steps[0]
    for index, process in enumerate(group.processes):
      assert process.popen.poll() is None, (
          f"process {index} exited ({process.popen.returncode}) before step {step}:\n"
          f"{group.tails()}")
    time.sleep(0.02)
  raise AssertionError(f"step {step} not reached in {timeout:.0f} s:\n{group.tails()}")


def metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def logged_steps(workdir: str) -> list[int]:
  """The steps of the train lines in metrics.jsonl, in file order (repeats kept)."""
  return [r["step"] for r in metrics(workdir) if "train/loss" in r]


def losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in metrics(workdir) if "train/loss" in r}


def evals(workdir: str) -> dict[int, dict]:
  return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
          for r in metrics(workdir) if any(k.startswith("eval/") for k in r)}
