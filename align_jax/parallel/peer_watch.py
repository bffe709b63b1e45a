"""A lost peer noticed within seconds and said in one line, instead of a minute and a C++ abort.

jax's coordination service declares a process dead only after its heartbeat timeout (100 s by
default) and then aborts every survivor with SIGABRT and ~150 lines of C++ and thread stacks; a
survivor blocked in a collective can wait even longer. Here every process of a multi-process run
beats a counter in the coordination service's key-value store and reads everyone's counters
(one ``key_value_dir_get`` per beat). A peer whose counter has not moved for ``timeout`` seconds,
a peer that reported an error, or the coordinator itself unreachable for as long is *lost*: the
watch prints one line naming it and the last checkpoint, and ends this process with status 1
(``os._exit``, so no C++ abort follows). jax's own heartbeat timeout is set beyond ours
(:func:`align_jax.parallel.processes.initialize`), so ours speaks first. The restart rule is
unchanged: run the same command on every host again, and it resumes from the last checkpoint.

One case stays jax's: when process 0, which hosts jax's coordination service, dies, every other
process's jax client sees the service gone at once and aborts (within a second, status 134, with
C++ stacks). jaxlib's client takes an error callback, but the one in jax 0.10.2 cannot pass the
error to Python (``std::bad_cast``, checked 2026-12-06), so it cannot be turned into this line.

A process that ends normally marks itself finished first (:func:`finish`), and one that stops on
an error says so (:func:`fail`), so that its peers name the cause instead of a silence.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable

logger = logging.getLogger("align_jax")

DEFAULT_TIMEOUT = 10  # seconds without a sign of life before a peer counts as lost
_BEATS_PER_TIMEOUT = 10  # a lost peer is named between 0.9 and 1.2 timeouts after its last beat


def _no_progress() -> str:
  return "no checkpoint was saved by this run yet"


class PeerWatch:
  """Two daemon threads: one beats and reads the key-value store, one judges the peers."""

  def __init__(self, client: Any, process_id: int, num_processes: int, timeout: float,
               run_id: str, exit_fn: Callable[[str], None] | None = None):
    self.client = client
    self.process_id = process_id
    self.num_processes = num_processes
    self.timeout = timeout
    self.interval = timeout / _BEATS_PER_TIMEOUT
    self.prefix = f"align_jax/{run_id}/"
    self.progress: Callable[[], str] = _no_progress
    self._exit = exit_fn or _exit
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._lost: str | None = None
    now = time.monotonic()
    self._store_ok = now  # last successful round trip to the coordinator's store
    self._seen = {p: (None, now) for p in range(num_processes) if p != process_id}
    self._ended: dict[int, str] = {}
    self._threads = [threading.Thread(target=self._beat, name="align_jax-peer-beat", daemon=True),
                     threading.Thread(target=self._judge, name="align_jax-peer-judge",
                                      daemon=True)]

  def start(self) -> "PeerWatch":
    for thread in self._threads:
      thread.start()
    return self

  def _beat(self) -> None:
    count = 0
    while not self._stop.is_set():
      try:
        self.client.key_value_set(f"{self.prefix}beat/{self.process_id}", str(count),
                                  allow_overwrite=True)
        entries = dict(self.client.key_value_dir_get(self.prefix))
      except Exception:  # pylint: disable=broad-except  (the coordinator is gone: _judge says so)
        self._stop.wait(self.interval)
        continue
      count += 1
      now = time.monotonic()
      with self._lock:
        self._store_ok = now
        for peer, (value, since) in self._seen.items():
          beat = entries.get(f"{self.prefix}beat/{peer}")
          if beat != value:
            self._seen[peer] = (beat, now)
          end = entries.get(f"{self.prefix}end/{peer}")
          if end is not None:
            self._ended[peer] = end
      self._stop.wait(self.interval)

  def lost_peer(self) -> str | None:
    """The lost peer, as the phrase of the error line; None while every peer is alive."""
    now = time.monotonic()
    with self._lock:
      if self._lost is not None:
        return self._lost
      if now - self._store_ok > self.timeout and self.process_id != 0:
        return (f"lost process 0 of {self.num_processes}, the coordinator (no answer for "
                f"{self.timeout:g} s)")
      for peer, (_, since) in sorted(self._seen.items()):
        end = self._ended.get(peer)
        if end is not None and end != "ok":
          return f"process {peer} of {self.num_processes} stopped: {end}"
        # judged on reads that succeeded: with the store unreachable, the store is what is lost
        if end is None and self._store_ok - since > self.timeout:
          return (f"lost process {peer} of {self.num_processes} (no sign of life for "
                  f"{self.timeout:g} s)")
    return None

  def _judge(self) -> None:
    while not self._stop.wait(self.interval):
      lost = self.lost_peer()
      if lost is not None:
        with self._lock:
          self._lost = lost
        self._exit(self.line(lost))
        return

  def line(self, lost: str) -> str:
    """The one line a survivor prints."""
    try:
      progress = self.progress()
    except Exception:  # pylint: disable=broad-except
      progress = "the last checkpoint is unknown"
    return (f"error: {lost}; {progress}; run the same command on every process again to resume "
            "from it")

  def _end(self, value: str) -> None:
    self._stop.set()
    try:
      self.client.key_value_set(f"{self.prefix}end/{self.process_id}", value,
                                allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the coordinator is gone already)
      pass

  def finish(self) -> None:
    """This process ended normally: peers stop watching it."""
    self._end("ok")

  def fail(self, message: str) -> None:
    """This process stops on ``message``: peers stop too, naming it."""
    self._end(message[:500])

  def stop(self) -> None:
    self._stop.set()


def _exit(line: str) -> None:
  sys.stdout.flush()
  sys.stderr.write(line + "\n")
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access  (jax's client would abort with C++ stacks)


_current: PeerWatch | None = None


def start(client: Any, process_id: int, num_processes: int, timeout: float,
          run_id: str) -> PeerWatch:
  """Starts this process's watch (one per process)."""
  global _current
  _current = PeerWatch(client, process_id, num_processes, timeout, run_id).start()
  return _current


def current() -> PeerWatch | None:
  return _current


def set_progress(describe: Callable[[], str]) -> None:
  """``describe()`` says how far the run got (e.g. its last checkpoint), for the lost-peer line."""
  if _current is not None:
    _current.progress = describe


def finish() -> None:
  if _current is not None:
    _current.finish()


def fail(message: str) -> None:
  if _current is not None:
    _current.fail(message)


def explain(error: BaseException) -> None:
  """After ``error`` escaped a multi-process command: if a lost peer caused it, say that in one
  line and exit (waiting at most one timeout for the watch to be sure); otherwise return."""
  watch = _current
  if watch is None:
    return
  deadline = time.monotonic() + watch.timeout + 2 * watch.interval
  while time.monotonic() < deadline:
    lost = watch.lost_peer()
    if lost is not None:
      watch.stop()
      _exit(watch.line(lost))
    time.sleep(watch.interval / 2)
  logger.debug("no lost peer behind %r", error)
