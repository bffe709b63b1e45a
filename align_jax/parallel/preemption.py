"""Preemption notices (SIGTERM) turned into one agreed step at which every process saves and stops.

A spot/preemptible TPU VM, SLURM's ``--signal`` and Kubernetes all send SIGTERM some seconds before
taking the machine. The training loop asks :meth:`PreemptionWatch.reached` after every step; it
answers True at one step, the same on every process, and the loop saves a checkpoint there and
returns, so the same command continues bit-exact from that step.

* Multi-process runs (``jax.distributed`` initialised): jax's preemption sync manager already
  catches SIGTERM in every process; a notice on any host is shared through the coordination
  service, and ``multihost_utils.reached_preemption_sync_point(step)`` turns True on all of them
  at the same step (one past the furthest step any process had reached). With
  ``jax_enable_preemption_service`` off, nothing is caught and SIGTERM ends the processes.
* A single process (no ``jax.distributed``): there is nothing to agree with, so a SIGTERM handler
  installed for the duration of the loop records the notice; the step running then is the one.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

logger = logging.getLogger("align_jax")


class PreemptionWatch:
  """``with PreemptionWatch() as watch: ... if watch.reached(step): save and stop``."""

  def __init__(self):
    self.distributed = jax.distributed.is_initialized()
    # With jax's preemption service turned off, SIGTERM keeps its default (the process ends).
    self.enabled = not self.distributed or bool(jax.config.jax_enable_preemption_service)
    self._notice = threading.Event()
    self._previous = None
    self._installed = False

  def __enter__(self) -> "PreemptionWatch":
    # jax's sync manager owns SIGTERM in a distributed run; signal handlers need the main thread.
    if not self.distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    if not self._notice.is_set():
      logger.warning("SIGTERM: saving a checkpoint after this step, then stopping")
    self._notice.set()

  def reached(self, step: int) -> bool:
    """Whether to save at ``step`` (just finished) and stop; call it after every step."""
    if self.distributed:
      return self.enabled and multihost_utils.reached_preemption_sync_point(step)
    return self._notice.is_set()
