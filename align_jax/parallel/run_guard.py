"""One coordinator port, one run: every process shows process 0 who it is before jax connects.

jax's coordination service is a gRPC server, and gRPC listens with ``SO_REUSEPORT``: a second
run started on the port of a running one binds it without error, the kernel hands connections to
either server, and a process that reaches the other run's coordinator registers there as a task
that is already connected; that run then aborts. So before any process calls
``jax.distributed.initialize``:

* process 0 listens on the coordinator port itself with a plain socket (no ``SO_REUSEPORT``),
  which the kernel refuses while anything listens there: a taken port is one line, at once;
* every other process connects to that port and sends its :class:`Identity` (workdir, config
  hash, process count and index); process 0 answers with the run's id, or with the mismatch;
* only when all ``num_processes - 1`` others have been accepted does process 0 close the guard
  and start jax's coordinator on the same port; the others connect to it right after.

A process that finds something other than its own process 0 at the port (another run's gRPC
coordinator answers in HTTP/2, not in this protocol) stops with one line and never registers
there, so the running run is not disturbed. Process count, config and workdir mismatches between
processes of one launch stop them all with one line that names both values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import socket
import time

PROTOCOL = "align_jax-run-guard/1"
_RETRY_SECONDS = 0.25


class RunGuardError(RuntimeError):
  """This process cannot join the run; the message says why and what to change."""


@dataclasses.dataclass(frozen=True)
class Identity:
  """What every process of one run must agree on."""
  workdir: str
  config_hash: str
  num_processes: int
  process_id: int

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def config_hash(config_text: str, mode: str) -> str:
  """A short hash of the command's config (its full text) and mode."""
  return hashlib.sha256(f"{mode}\n{config_text}".encode()).hexdigest()[:12]


def mismatch(mine: dict, theirs: dict, their_name: str) -> str | None:
  """The first disagreement between two identities, as a phrase naming both values; or None."""
  if mine["num_processes"] != theirs["num_processes"]:
    return (f"--num_processes={mine['num_processes']} here but {theirs['num_processes']} on "
            f"{their_name}: start every process with the same --num_processes")
  if mine["workdir"] != theirs["workdir"]:
    return (f"--workdir={mine['workdir']} here but {theirs['workdir']} on {their_name}: give "
            "every process the same --workdir (or give another run its own coordinator port)")
  if mine["config_hash"] != theirs["config_hash"]:
    return (f"the config differs from {their_name}'s (hash {mine['config_hash']} here, "
            f"{theirs['config_hash']} there): start every process with the same --config, "
            "--config.* overrides and --mode")
  return None


def _read_line(conn: socket.socket, deadline: float, limit: int = 65536) -> bytes:
  data = b""
  while not data.endswith(b"\n"):
    conn.settimeout(max(deadline - time.time(), 0.05))
    chunk = conn.recv(4096)
    if not chunk:
      break
    data += chunk
    if len(data) > limit:
      break
  return data


def _send(conn: socket.socket, message: dict) -> None:
  conn.sendall(json.dumps(message).encode() + b"\n")


def _listen(port: int) -> socket.socket:
  """A listening socket on every interface at ``port``, refused if anything listens there."""
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
    try:
      server = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue
    try:
      if family == socket.AF_INET6:  # one socket for IPv4 and IPv6, as gRPC binds
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
      # SO_REUSEADDR only lets a port in TIME_WAIT be reused; a listener there still refuses us
      server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      server.bind((host, port))
      server.listen(64)
      return server
    except OSError as error:
      server.close()
      if error.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):  # no IPv6 here: try IPv4
        continue
      raise
  raise OSError(f"cannot listen on port {port}")


def accept_members(address: str, identity: Identity, timeout: float) -> str:
  """Process 0: holds the coordinator's port until every other process has shown its identity.

  Returns the run id sent to every process. Raises :class:`RunGuardError` when the port is taken,
  when a process of this launch disagrees (both sides stop), or at the deadline.
  """
  port = int(address.rpartition(":")[2])
  try:
    server = _listen(port)
  except OSError as error:
    raise RunGuardError(
        f"--coordinator_address={address}: process 0 cannot listen on port {port} "
        f"({error.strerror or error}): another run (or program) uses it; pick a free port, the "
        "same on every process") from None
  run_id = os.urandom(6).hex()
  waiting: dict[int, socket.socket] = {}  # accepted processes, answered once all have come
  deadline = time.time() + timeout

  def stop_all(problem: str) -> RunGuardError:
    for conn in waiting.values():
      with contextlib.suppress(OSError):
        _send(conn, {"ok": False, "error": f"process 0 stopped the run: {problem}"})
    return RunGuardError(problem)

  try:
    with server:
      while len(waiting) < identity.num_processes - 1:
        server.settimeout(max(deadline - time.time(), 0.05))
        try:
          conn, _ = server.accept()
        except socket.timeout:
          num = identity.num_processes
          raise stop_all(
              f"not all --num_processes={num} processes connected to --coordinator_address="
              f"{address} within --initialization_timeout={timeout:g} s; start every "
              f"--process_id 0..{num - 1} with the same address") from None
        try:
          hello = json.loads(_read_line(conn, min(deadline, time.time() + 10)))
          theirs = hello["identity"]
          if hello.get("protocol") != PROTOCOL or not isinstance(theirs, dict):
            raise ValueError(hello)
        except (OSError, ValueError, KeyError, TypeError):
          conn.close()  # not one of ours (a port scan, a stray client): ignore it
          continue
        pid = theirs.get("process_id")
        if theirs.get("workdir") != identity.workdir:  # another run's process: turn it away only
          with conn:
            _send(conn, {"ok": False, "error": (
                f"the coordinator at port {port} belongs to another run (workdir "
                f"{identity.workdir}); give this run its own --coordinator_address port")})
          continue
        problem = mismatch(identity.to_json(), theirs, f"process {pid}")
        if problem is None and not (isinstance(pid, int) and 0 < pid < identity.num_processes):
          problem = (f"process {pid} is not one of 1..{identity.num_processes - 1} (process 0 "
                     "is this one): give each process its own --process_id")
        if problem is None and pid in waiting:
          problem = f"two processes claim --process_id={pid}: give each its own --process_id"
        if problem is not None:
          with conn:
            _send(conn, {"ok": False,
                         "error": mismatch(theirs, identity.to_json(), "process 0") or problem})
          raise stop_all(problem)
        waiting[pid] = conn
    for conn in waiting.values():
      _send(conn, {"ok": True, "run_id": run_id})
  finally:
    for conn in waiting.values():
      conn.close()
  return run_id


def join(address: str, identity: Identity, timeout: float) -> str:
  """Process i > 0: shows process 0 at ``address`` this process's identity; the run id.

  Retries while nothing listens yet (process 0 may start later). Raises :class:`RunGuardError`
  when process 0 refuses, or when something else answers at the address.
  """
  host, _, port = address.rpartition(":")
  deadline = time.time() + timeout
  hello = json.dumps({"protocol": PROTOCOL, "identity": identity.to_json()}).encode() + b"\n"
  while True:
    try:
      conn = socket.create_connection((host.strip("[]"), int(port)),
                                      timeout=max(deadline - time.time(), 0.05))
    except (ConnectionRefusedError, socket.timeout, ConnectionResetError):
      if time.time() > deadline:
        raise RunGuardError(
            f"--coordinator_address={address}: nothing answered there within "
            f"--initialization_timeout={timeout:g} s; start process 0 (--process_id=0) on that "
            "host, with the same address and port") from None
      time.sleep(_RETRY_SECONDS)
      continue
    except OSError as error:
      raise RunGuardError(f"cannot reach --coordinator_address={address}: "
                          f"{error.strerror or error}") from None
    # Connected: whatever listens there answers now. Process 0 replies with one JSON line once
    # every process has come; anything else (another protocol, a reset, silence) is not it.
    with conn:
      try:
        conn.sendall(hello)
        line = _read_line(conn, deadline + 30)
      except (OSError, socket.timeout):
        line = b""
    break
  try:
    answer = json.loads(line)
    ok = answer["ok"]
  except (ValueError, KeyError, TypeError):
    raise RunGuardError(
        f"something other than this run's process 0 answers at --coordinator_address="
        f"{address} (another run's coordinator?); pick a free port, the same on every "
        "process") from None
  if not ok:
    raise RunGuardError(str(answer.get("error", "refused by process 0")))
  return str(answer["run_id"])
