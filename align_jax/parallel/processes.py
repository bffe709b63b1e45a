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

The rules that keep a multi-process run from hanging or mixing with another run:

* one coordinator port, one run: :mod:`align_jax.parallel.run_guard` holds the port before jax does,
  and
  every process shows process 0 its workdir, config hash and process count;
* collective programs are launched from the main thread only, in the same order on every
  process: orbax's barriers go through the coordinator's key-value store
  (:func:`_orbax_barriers_through_coordinator`), and on XLA:CPU one program runs at a time
  (:func:`one_program_at_a_time`);
* a lost peer is noticed within ``--peer_timeout`` seconds, in one line
  (:mod:`align_jax.parallel.peer_watch`).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from absl import flags

from align_jax.parallel import peer_watch, run_guard

logger = logging.getLogger("align_jax")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT = 300  # seconds; jax.distributed.initialize's own default
_WATCHDOG_MARGIN = 5  # seconds jax's own timeout is set beyond ours, so ours fires first
# jax's heartbeat timeout, in --peer_timeout units: the service counts it from the last heartbeat
# it received, which can be half a timeout before a peer dies, so at 1x + 5 s (tried first) jax
# sometimes aborted before our watchdog spoke; at 3x it cannot.
_JAX_HEARTBEAT_TIMEOUTS = 3
_FLAG_NAMES = ("distributed", "coordinator_address", "num_processes", "process_id",
               "initialization_timeout", "peer_timeout")


class DistributedError(ValueError):
  """A wrong or missing multi-process setting; the message names the flag and the fix."""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --distributed, --coordinator_address, --num_processes, --process_id,
  --initialization_timeout and --peer_timeout (once; every command of :mod:`align_jax.cli` calls
  this before parsing its flags): the one definition of the multi-process options."""
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
  flags.DEFINE_integer("peer_timeout", peer_watch.DEFAULT_TIMEOUT,
                       "Seconds without a sign of life before a lost process stops the others "
                       "(one line naming it and the last checkpoint).", flag_values=flag_values)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What :func:`initialize` passes to ``jax.distributed.initialize`` (None: jax detects it)."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  timeout: int
  peer_timeout: int = peer_watch.DEFAULT_TIMEOUT


def _env_int(environ, name: str, flag: str) -> int | None:
  text = environ.get(name, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"{name}={text!r} (for --{flag}) is not an integer") from None


def settings_from(values: Any, environ=None) -> Settings | None:
  """The multi-process settings from parsed flags (absl's FLAGS, or any object with the attributes
  :func:`define_flags` defines) and the environment, validated; None for a single-process run (no
  --distributed and no value given)."""
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
  peer_timeout = given["peer_timeout"]
  peer_timeout = peer_watch.DEFAULT_TIMEOUT if peer_timeout is None else peer_timeout

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
  if peer_timeout < 2:
    raise DistributedError(f"--peer_timeout must be at least 2 seconds, got {peer_timeout}")
  if given["coordinator_address"] is not None:  # given by hand: so must the other two be
    for name, value in (("num_processes", num), ("process_id", pid)):
      if value is None:
        raise DistributedError(
            f"--{name} is required with --coordinator_address (or set "
            f"{ENV_NUM_PROCESSES if name == 'num_processes' else ENV_PROCESS_ID})")
  return Settings(address, num, pid, timeout, peer_timeout)


def _answers(address: str, timeout: float = 1.0) -> bool:
  """Whether something accepts TCP connections at HOST:PORT."""
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
      return True
  except OSError:
    return False


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


def command_identity(workdir: str = "", config_text: str | None = None, mode: str = "") -> tuple:
  """(workdir, config hash) of this command, for the check that every process runs the same.

  Without ``config_text``, the hash covers the command line minus the per-process flags.
  """
  if config_text is None:
    per_process = ("--process_id", "--coordinator_address")
    config_text = " ".join(a for a in sys.argv[1:] if not a.startswith(per_process))
  return workdir, run_guard.config_hash(config_text, mode)


def one_program_at_a_time() -> bool:
  """Whether programs with collectives must run one after another, not overlap.

  XLA:CPU runs programs that do not depend on each other concurrently, and its gloo collectives
  all use one tag (xla/backends/cpu/collectives/gloo_communicator.cc); with several processes,
  two programs in flight at once can take each other's messages and deadlock. The train loop
  waits for each step there (a few ms); TPU and GPU runtimes order programs per device.
  """
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_count() > 1 and jax.default_backend() == "cpu"


def _orbax_barriers_through_coordinator() -> None:
  """Orbax's barriers by default are jitted collectives (``sync_global_devices``: a psum over
  every device), about ten per save, launched right after an asynchronously dispatched step that
  does not feed them, so XLA:CPU may run both at once (:func:`one_program_at_a_time`). Its
  distributed-client barrier (the coordination service's key-value store) launches no device
  program at all (tests/test_multiprocess_soak.py counts them: 200 in a 30-step, 2-process run
  before, 0 after)."""
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel,unused-import  (defines it)
  name = "experimental_orbax_use_distributed_barrier"
  if name not in flags.FLAGS:
    return
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  flags.FLAGS[name].value = True


def initialize(values: Any = None, identity: tuple | None = None) -> bool:
  """Starts this process's part of a multi-process run from the flags; returns whether it did.

  ``values``: parsed flags with the attributes of :func:`define_flags` (default: absl's FLAGS).
  ``identity``: :func:`command_identity` of this command (default:
  its command line). Before jax connects, process 0 holds the coordinator port and every
  process shows it its identity (:mod:`align_jax.parallel.run_guard`); after, a watch notices a lost
  peer (:mod:`align_jax.parallel.peer_watch`). Raises :class:`DistributedError` (one line, naming
  the flag) for a bad value or a mismatch; exits the process with one line when the processes do
  not connect in time.
  """
  settings = settings_from(flags.FLAGS if values is None else values)
  if settings is None:
    return False
  import jax  # pylint: disable=import-outside-toplevel  (flag parsing stays fast)
  # Cross-process collectives on the CPU backend (also the host side of GPU/TPU runs); GPU and
  # TPU chips use their own (NCCL, ICI). Must be set before the backend is created.
  if jax.config.jax_cpu_collectives_implementation in (None, "gloo"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  workdir, config_hash = identity or command_identity()

  done = threading.Event()
  start = time.time()

  def watchdog():
    if not done.wait(settings.timeout):
      _exit(_timeout_message(settings))

  run_id = None
  try:
    if settings.coordinator_address is not None and settings.num_processes is not None:
      me = run_guard.Identity(workdir, config_hash, settings.num_processes, settings.process_id)
      run_id = (run_guard.accept_members if settings.process_id == 0 else run_guard.join)(
          settings.coordinator_address, me, settings.timeout)
    threading.Thread(target=watchdog, name="align_jax-distributed-watchdog", daemon=True).start()
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address, num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=settings.timeout + _WATCHDOG_MARGIN,
        heartbeat_timeout_seconds=_JAX_HEARTBEAT_TIMEOUTS * settings.peer_timeout)
    run_id = _agree_on_identity(workdir, config_hash, settings.num_processes, run_id)
  except run_guard.RunGuardError as error:
    raise DistributedError(str(error)) from None
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
  _orbax_barriers_through_coordinator()
  if jax.default_backend() == "cpu" and jax.process_count() > 1:
    _drop_gloo_chatter()
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    watch = peer_watch.start(jax_distributed.global_state.client, jax.process_index(),
                             jax.process_count(), settings.peer_timeout, run_id)
    atexit.register(watch.stop)  # runs before jax's own shutdown (registered earlier)
  logger.info("process %d of %d (run %s, connected in %.1f s), %d local / %d global devices",
              jax.process_index(), jax.process_count(), run_id, time.time() - start,
              jax.local_device_count(), jax.device_count())
  return True


# gloo's connection message, "[Gloo] Rank N is connected to M peer ranks. Expected number of
# connected peer ranks is : M": several device threads print it at once, token by token, so
# pieces of it can share a line (seen: "...er ranks. [Gloo] Rank 0 is connected to ...").
_GLOO_CHATTER = (b"[Gloo] ", b"peer ranks")


def is_gloo_chatter(line: bytes) -> bool:
  """Whether a stdout line holds (a piece of) gloo's connection message."""
  return any(marker in line for marker in _GLOO_CHATTER)


def _drop_gloo_chatter() -> None:
  """gloo (XLA:CPU's cross-process collectives) prints ``[Gloo] Rank N is connected to M peer
  ranks...`` on stdout from C++, one message per device and communicator, with no setting to stop
  it. Here stdout's file descriptor is passed through a pipe whose reader thread drops the lines
  holding any piece of it (:func:`is_gloo_chatter`) and forwards the rest unchanged; at exit the
  pipe is drained first."""
  read_fd, write_fd = os.pipe()
  sys.stdout.flush()
  real_stdout = os.dup(1)
  os.dup2(write_fd, 1)
  os.close(write_fd)

  def forward():
    pending = b""
    with open(read_fd, "rb", buffering=0) as source:
      while chunk := source.read(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not is_gloo_chatter(line))
        if kept:
          os.write(real_stdout, kept)
    if pending and not is_gloo_chatter(pending):
      os.write(real_stdout, pending)

  thread = threading.Thread(target=forward, name="align_jax-stdout-filter", daemon=True)
  thread.start()

  def drain():
    sys.stdout.flush()
    os.dup2(real_stdout, 1)  # the pipe's last writer closes: the reader sees the end
    thread.join(timeout=5)

  atexit.register(drain)


def _agree_on_identity(workdir: str, config_hash: str, num_processes: int | None,
                       run_id: str | None) -> str:
  """Every process compares its workdir, config hash and process count with process 0's (through
  the coordinator's key-value store); a mismatch is a :class:`DistributedError`. Covers runs whose
  cluster jax detected (no explicit address, so no :mod:`run_guard` step). Returns the run id."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  client = jax_distributed.global_state.client
  mine = {"workdir": workdir, "config_hash": config_hash,
          "num_processes": num_processes or jax.process_count(),
          "run_id": run_id or ""}
  if jax.process_index() == 0:
    mine["run_id"] = mine["run_id"] or os.urandom(6).hex()
    client.key_value_set("align_jax/identity", json.dumps(mine), allow_overwrite=True)
    return mine["run_id"]
  theirs = json.loads(client.blocking_key_value_get("align_jax/identity", 60_000))
  problem = run_guard.mismatch({**mine, "process_id": jax.process_index()}, theirs, "process 0")
  if problem is not None:
    raise DistributedError(problem)
  return theirs["run_id"]


def initialize_or_exit(values: Any = None, identity: tuple | None = None) -> bool:
  """:func:`initialize`, with a bad setting as ``error: ...`` (exit status 1, no traceback)."""
  try:
    return initialize(values, identity)
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
