"""Quiet orbax after a failure it has already reported: its log tracebacks and its stray reports.

A failed checkpoint read or write reaches :mod:`align_jax.run.checkpoint` as one exception, which
it reports in one line. Orbax and the libraries under it then print the same failure again, in
tracebacks tens of lines long, from places that are not the caller's: these workarounds drop those
echoes, and only them, so the one line stays the last thing printed.

* :class:`DemoteOrbaxErrors` (a logging filter, :func:`install_log_filter`): orbax logs each
  background save failure with a traceback from several threads, and asyncio logs the exceptions
  of the failed call's sibling operations that nobody retrieved; these records go to DEBUG.
* :class:`NoiseFilter` (a process-wide ``sys.unraisablehook``, held by :func:`acquire` /
  :func:`release` while a checkpointer is open): when one tensorstore operation of an orbax call
  fails, orbax abandons the others and closes its event loop; their "Event loop is closed" errors
  and the garbage collector's finalisation of the abandoned coroutines reach the unraisable hook
  (:func:`is_orbax_noise` says which). Every other report goes to the hook that was in place.
* :func:`collect_abandoned_operations`: finalises those coroutines now, while the hook is held,
  rather than at some later collection, perhaps after the checkpointer closed.

The hook is process-wide, so it is contained: installed only while a user holds it, and the
previous hook is put back by the last release (unless someone replaced ours meanwhile).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from typing import Any

logger = logging.getLogger("align_jax")


class DemoteOrbaxErrors(logging.Filter):
  """Orbax logs each background save failure with a traceback from several threads, and when
  several arrays of one call fail, asyncio later logs the exceptions nobody retrieved. The failure
  reaches us as an exception and is reported in one line, so those records go to DEBUG."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    ours = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
    if record.name == "asyncio":
      text = record.getMessage()
      # tensorstore's read errors name the array's file (".../checkpoints/40/state/...: Requested
      # byte range ... is not valid") rather than tensorstore or orbax
      ours = "exception was never retrieved" in text and any(
          word in text.lower() for word in ("tensorstore", "orbax", "ocdbt", "checkpoints"))
    if ours:
      record.levelno, record.levelname = logging.DEBUG, "DEBUG"
      return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


def install_log_filter() -> None:
  """Puts :class:`DemoteOrbaxErrors` on the ``absl`` (orbax logs through it) and ``asyncio``
  loggers, once per process."""
  for name in ("absl", "asyncio"):
    target = logging.getLogger(name)
    if not any(isinstance(f, DemoteOrbaxErrors) for f in target.filters):
      target.addFilter(DemoteOrbaxErrors())


def is_orbax_noise(unraisable: Any) -> bool:
  """Whether a ``sys.unraisablehook`` report is the aftermath of a failed orbax call, only that.

  When one tensorstore read or write of an orbax call fails, orbax abandons the call's sibling
  operations and closes its event loop while they are still in flight. Two kinds of reports
  follow, each with a multi-kilobyte traceback, after the failure already reached us as an
  exception (and was reported in one line):

  * "Event loop is closed", raised in asyncio by a sibling's completion callback;
  * an abandoned orbax coroutine (e.g. ``_read_array_index_and_device_put``) finalised by the
    garbage collector: closing it throws ``GeneratorExit`` into it, which orbax's
    ``except BaseException`` turns into a new exception ("Encountered error while reading array
    index ...").

  Anything else (any other object, or an orbax coroutine that failed for another reason) is not
  noise.
  """
  error = unraisable.exc_value
  trace = unraisable.exc_traceback
  while trace is not None and trace.tb_next is not None:
    trace = trace.tb_next
  if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
      and trace is not None and "asyncio" in trace.tb_frame.f_code.co_filename):
    return True
  code = getattr(unraisable.object, "cr_code", None)  # a coroutine object
  return (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
          and (isinstance(error, GeneratorExit) or isinstance(
              getattr(error, "__cause__", None) or getattr(error, "__context__", None),
              GeneratorExit)))


class NoiseFilter:
  """Drops :func:`is_orbax_noise` reports while at least one user (an open checkpointer) holds it.

  ``sys.unraisablehook`` is process-wide, so the filter is contained: a checkpointer that opens
  installs it in front of the hook in place then (again, if someone replaced it meanwhile), and
  when the last one closes (or is garbage-collected unclosed) that hook is put back, unless
  someone replaced ours meanwhile: theirs is left alone. Every other report goes to that hook
  unchanged.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._users = 0
    self._previous = None
    self._inside = threading.local()  # a hook that hands reports back to ours: no loop

  def _hook(self, unraisable) -> None:
    if is_orbax_noise(unraisable):
      logger.debug("dropped orbax's report of an abandoned operation: %s", unraisable.exc_value)
      return
    if getattr(self._inside, "active", False):
      sys.__unraisablehook__(unraisable)
      return
    self._inside.active = True
    try:
      (self._previous or sys.__unraisablehook__)(unraisable)
    finally:
      self._inside.active = False

  def acquire(self) -> None:
    with self._lock:
      if sys.unraisablehook != self._hook:  # pylint: disable=comparison-with-callable
        self._previous, sys.unraisablehook = sys.unraisablehook, self._hook
      self._users += 1

  def release(self) -> None:
    with self._lock:
      self._users -= 1
      if self._users == 0:
        if sys.unraisablehook == self._hook:  # pylint: disable=comparison-with-callable
          sys.unraisablehook = self._previous
        self._previous = None


_noise_filter = NoiseFilter()


def acquire() -> None:
  """One more user of the process's :class:`NoiseFilter` (the first installs it)."""
  _noise_filter.acquire()


def release() -> None:
  """One user less; the last one puts the previous ``sys.unraisablehook`` back."""
  _noise_filter.release()


def collect_abandoned_operations() -> None:
  """Finalises the operations a failed orbax call abandoned, now, while the filter is on.

  Called once the exception that held them is gone; otherwise they would be finalised at some
  later collection, possibly at interpreter exit after every checkpointer closed (their reports
  then printed after our error line).
  """
  gc.collect()
