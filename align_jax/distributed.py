"""Starting a multi-process run: the ``--distributed`` flags every entry point shares.

One JAX process runs per host (a TPU VM worker, a GPU node) and all of them together form one
program over every chip. Each process is told where the coordinator (process 0) listens, how many
processes there are and which one it is::

    python main.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0  # node 0
    python main.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=1  # node 1

The values come from the flags, else from the environment (``JAX_COORDINATOR_ADDRESS`` is the
variable ``jax.distributed.initialize`` reads itself; ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
are align_jax's, named alike, for launchers that set variables rather than flags), else from
jax's own cluster detection (Cloud TPU metadata, SLURM, Open MPI, Kubernetes):
``--distributed`` alone is enough there. Any of the three flags implies ``--distributed``.

:func:`initialize` validates the values first, so a bad or missing one stops with one line naming
the flag (``error: --num_processes is required with --coordinator_address ...``), and it watches
the connection: jax aborts the process with a C++ stack trace when the coordinator does not
answer or not every process joins in time, so a watchdog thread reports that in one line a
moment earlier and exits instead. On a CPU backend, processes exchange collectives through gloo
(selected here, as jax needs it set before the backend starts).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from absl import flags

logger = logging.getLogger("align_jax")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT = 300  # seconds; jax.distributed.initialize's own default
_WATCHDOG_MARGIN = 5  # seconds jax's own timeout is set beyond ours, so ours fires first
_FLAG_NAMES = ("distributed", "coordinator_address", "num_processes", "process_id",
               "initialization_timeout")


class DistributedError(ValueError):
  """A wrong or missing multi-process setting; the message names the flag and the fix."""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --distributed, --coordinator_address, --num_processes, --process_id and
  --initialization_timeout (once; an entry point calls this before parsing its flags)."""
  if "distributed" in flag_values:
    return
  flags.DEFINE_bool(
      "distributed", False,
      "Multi-process run (one process per host): call jax.distributed.initialize() first. "
      "Alone, jax detects the cluster (Cloud TPU, SLURM, ...); implied by the flags below.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "coordinator_address", None,
      f"HOST:PORT where process 0 listens, the same for every process [{ENV_COORDINATOR}].",
      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None,
                       f"Number of processes in the run [{ENV_NUM_PROCESSES}].",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None,
                       f"This process's index, 0 .. num_processes-1 [{ENV_PROCESS_ID}]; "
                       "0 runs the coordinator.", flag_values=flag_values)
  flags.DEFINE_integer("initialization_timeout", DEFAULT_TIMEOUT,
                       "Seconds to wait for the coordinator and every process to connect.",
                       flag_values=flag_values)


def add_arguments(parser) -> None:
  """The same five options for an ``argparse`` entry point (``python -m align_jax.export``)."""
  parser.add_argument("--distributed", action="store_true",
                      help="multi-process run: call jax.distributed.initialize() first")
  parser.add_argument("--coordinator_address", default=None,
                      help=f"HOST:PORT of process 0 [{ENV_COORDINATOR}]")
  parser.add_argument("--num_processes", type=int, default=None,
                      help=f"number of processes [{ENV_NUM_PROCESSES}]")
  parser.add_argument("--process_id", type=int, default=None,
                      help=f"this process's index [{ENV_PROCESS_ID}]")
  parser.add_argument("--initialization_timeout", type=int, default=DEFAULT_TIMEOUT,
                      help="seconds to wait for every process to connect")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What :func:`initialize` passes to ``jax.distributed.initialize`` (None: jax detects it)."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  timeout: int


def _env_int(environ, name: str, flag: str) -> int | None:
  text = environ.get(name, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"{name}={text!r} (for --{flag}) is not an integer") from None


def settings_from(values: Any, environ=None) -> Settings | None:
  """The multi-process settings from parsed flags (absl FLAGS or an argparse namespace) and the
  environment, validated; None for a single-process run (no --distributed and no value given)."""
  environ = os.environ if environ is None else environ
  given = {name: getattr(values, name, None) for name in _FLAG_NAMES}
  if not given["distributed"] and all(given[name] is None for name in
                                      ("coordinator_address", "num_processes", "process_id")):
    return None
  address = given["coordinator_address"] or environ.get(ENV_COORDINATOR, "").strip() or None
  num = given["num_processes"]
  num = _env_int(environ, ENV_NUM_PROCESSES, "num_processes") if num is None else num
  pid = given["process_id"]
  pid = _env_int(environ, ENV_PROCESS_ID, "process_id") if pid is None else pid
  timeout = given["initialization_timeout"]
  timeout = DEFAULT_TIMEOUT if timeout is None else timeout

  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise DistributedError(f"--coordinator_address must be HOST:PORT (e.g. 10.0.0.1:1234), "
                             f"got {address!r}")
  if num is not None and num < 1:
    raise DistributedError(f"--num_processes must be at least 1, got {num}")
  if pid is not None and pid < 0:
    raise DistributedError(f"--process_id must be 0 or more, got {pid}")
  if num is not None and pid is not None and pid >= num:
    raise DistributedError(f"--process_id must be below --num_processes={num} (0 .. {num - 1}), "
                           f"got {pid}")
  if timeout < 1:
    raise DistributedError(f"--initialization_timeout must be at least 1 second, got {timeout}")
  if given["coordinator_address"] is not None:  # given by hand: so must the other two be
    for name, value in (("num_processes", num), ("process_id", pid)):
      if value is None:
        raise DistributedError(
            f"--{name} is required with --coordinator_address (or set "
            f"{ENV_NUM_PROCESSES if name == 'num_processes' else ENV_PROCESS_ID})")
  return Settings(address, num, pid, timeout)


def _answers(address: str, timeout: float = 1.0) -> bool:
  """Whether something accepts TCP connections at HOST:PORT."""
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
      return True
  except OSError:
    return False


def _check_port_free(address: str) -> None:
  """Process 0 binds the coordinator on every interface at the address's port."""
  port = int(address.rpartition(":")[2])
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(("", port))
    except OSError as error:
      raise DistributedError(
          f"--coordinator_address={address}: process 0 cannot listen on port {port} "
          f"({error.strerror}); pick a free port, the same on every process") from None


def _timeout_message(settings: Settings) -> str:
  wait = f"within --initialization_timeout={settings.timeout} s"
  address = settings.coordinator_address
  if address is None or settings.num_processes is None or settings.process_id is None:
    return (f"error: --distributed: the processes jax detected did not all connect {wait}; "
            "check that every host started the same command")
  if settings.process_id != 0 and not _answers(address):
    return (f"error: --coordinator_address={address}: nothing answered there {wait}; start "
            "process 0 (--process_id=0) on that host, with the same address and port")
  return (f"error: not all --num_processes={settings.num_processes} processes connected to "
          f"--coordinator_address={address} {wait}; start every --process_id "
          f"0..{settings.num_processes - 1} with the same address")


def _exit(message: str) -> None:
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access  (jax's C++ client would abort with a trace)


def initialize(values: Any = None) -> bool:
  """Starts this process's part of a multi-process run from the flags; returns whether it did.

  ``values``: parsed flags with the attributes of :func:`define_flags` (default: absl's FLAGS; an
  argparse namespace works too). Raises :class:`DistributedError` (one line, naming the flag) for
  a bad value; exits the process with one line when the processes do not connect in time.
  """
  settings = settings_from(flags.FLAGS if values is None else values)
  if settings is None:
    return False
  import jax  # pylint: disable=import-outside-toplevel  (flag parsing stays fast)
  # Cross-process collectives on the CPU backend (also the host side of GPU/TPU runs); GPU and
  # TPU chips use their own (NCCL, ICI). Must be set before the backend is created.
  if jax.config.jax_cpu_collectives_implementation in (None, "gloo"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if settings.coordinator_address is not None and settings.process_id == 0:
    _check_port_free(settings.coordinator_address)

  done = threading.Event()
  start = time.time()

  def watchdog():
    if not done.wait(settings.timeout):
      _exit(_timeout_message(settings))

  threading.Thread(target=watchdog, name="align_jax-distributed-watchdog", daemon=True).start()
  try:
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address, num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=settings.timeout + _WATCHDOG_MARGIN)
  except ValueError as error:  # jax found no cluster to fill in a missing value
    text = str(error)
    missing = next((flag for key, flag in (("coordinator_address should", "coordinator_address"),
                                           ("Number of processes", "num_processes"),
                                           ("process id of", "process_id")) if key in text), None)
    if missing is None or "defined" not in text:
      raise DistributedError(f"--distributed: {text}") from None
    raise DistributedError(
        f"--distributed: jax detected no cluster (Cloud TPU, SLURM, Open MPI, Kubernetes) to "
        f"take --{missing} from; pass --coordinator_address=HOST:PORT --num_processes=N "
        "--process_id=I on every process") from None
  except RuntimeError as error:  # e.g. called after a jax computation, or twice
    raise DistributedError(f"--distributed: {error}") from None
  finally:
    done.set()
  logger.info("process %d of %d (connected in %.1f s), %d local / %d global devices",
              jax.process_index(), jax.process_count(), time.time() - start,
              jax.local_device_count(), jax.device_count())
  return True


def initialize_or_exit(values: Any = None) -> bool:
  """:func:`initialize`, with a bad setting as ``error: ...`` (exit status 1, no traceback)."""
  try:
    return initialize(values)
  except DistributedError as error:
    sys.exit(f"error: {error}")


def on_first_process(fn: Callable, *args, **kwargs):
  """``fn(*args, **kwargs)`` on process 0 only, the others waiting for it; its result or None.

  For commands whose whole output is one set of files (encoder selection, curation), so that
  several processes never write the same paths.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  result = fn(*args, **kwargs) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"align_jax:{getattr(fn, '__name__', 'fn')}")
  return result
