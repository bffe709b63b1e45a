"""Orbax checkpoints of the trainable state and the data position: verified resume, loud failures.

A checkpoint ``WORKDIR/checkpoints/<step>/`` holds three orbax items: ``state`` (step, trainable
params, optimiser state, RNG key), ``data`` (the input source's position, JSON) and ``integrity``
(a checksum of every array of ``state``, JSON). Frozen encoder params are never saved: they are
re-read from their source (a Hugging Face checkpoint, or a seed for the demo encoders), so
checkpoints stay small. ``WORKDIR`` may be a local folder or a URL such as ``gs://bucket/run``.

Saves are asynchronous and atomic (orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it
when complete; on ``gs://`` it writes ``commit_success.txt`` last), so a process killed at any
moment leaves the last finished checkpoint intact, and the same command resumes from it.

The run directory heals itself (:meth:`Checkpointer.restore_latest`):

* The newest checkpoint is restored and checked: every item must read back, and the state's
  checksums must equal those computed before it was saved (catching silently corrupted chunks
  that tensorstore would decode without an error). A checkpoint that fails is reported in one line
  (step, path, cause), moved to ``WORKDIR/checkpoints_corrupt/<step>-<UTC time>`` (a sibling
  folder: orbax lists and garbage-collects everything inside ``checkpoints/``) and the previous one
  is tried. Nothing is deleted. Only when no checkpoint restores does the run stop, with one line,
  leaving the folder untouched.
* Unfinished saves (orbax's temporary folders, or on ``gs://`` a step folder without its commit
  marker) are never listed by orbax as checkpoints; they are reported and orbax removes them.

A reader (``Checkpointer(workdir, read_only=True)``, what :mod:`align_jax.run_dir` uses for
evaluation, export and inference) lists and restores with the same verification, and never
creates, cleans up or moves anything: the run it reads may still be training.

A save that fails in the background (disk full, permission, quota) raises
:class:`CheckpointError` at the next :meth:`Checkpointer.check` (the training loop calls it every
step) with one line naming the path and the cause; the last good checkpoint stays intact (old ones
are only removed after a save succeeded). Orbax's own background tracebacks for that failure are
demoted to DEBUG, so the one line is the last thing printed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from align_jax import checksums, storage

logger = logging.getLogger("align_jax")

CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"
_TMP_MARK = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"
_CHECKSUM_FORMAT = "align_jax.state_checksums/1"


class CheckpointError(OSError):
  """A checkpoint that cannot be written or restored; the message is one line naming the path."""


def state_checksums(state: Any) -> dict[str, int]:
  """``{path: checksum}`` of every array of a train state (see :mod:`align_jax.checksums`)."""
  return checksums.tree_checksums(state)


# ---------------------------------------------------------------------------------------------
# Messages.


def describe_error(error: BaseException, limit: int = 300) -> str:
  """The root cause of an orbax / tensorstore error in one short line.

  Orbax wraps tensorstore errors (which carry multi-kilobyte JSON specs) in generic exceptions;
  the innermost exception holds the useful text, and an ``os_error_code`` is turned into its
  ``strerror`` (e.g. "No space left on device (ENOSPC)").
  """
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:  # the OS error anywhere in the chain is the clearest cause
    text = str(e)
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    match = re.search(r"os_error_code='?(\d+)", text)
    if match or code:
      code = int(match.group(1)) if match else code
      return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
  root = chain[-1]
  text = str(root).strip() or type(root).__name__
  text = re.split(r" \[tensorstore_spec|\. See full TensorStore details", text)[0]
  text = " ".join(text.split())
  if type(root).__name__ not in text and not isinstance(root, (ValueError, OSError)):
    text = f"{type(root).__name__}: {text}"
  if len(text) <= limit:
    return text
  # tensorstore nests "CODE: outer: ...: innermost": keep the code and the innermost parts.
  parts = text.split(": ")
  head = parts.pop(0) + ": ..." if re.fullmatch(r"[A-Z_]+", parts[0]) else "..."
  tail: list[str] = []
  while parts and len(head) + len(": ".join([parts[-1], *tail])) + 2 <= limit:
    tail.insert(0, parts.pop())
  return f"{head}: {': '.join(tail)}" if tail else text[:limit - 3] + "..."


class _DemoteOrbaxErrors(logging.Filter):
  """Orbax logs each background save failure with a traceback from several threads, and when
  several arrays of one call fail, asyncio later logs the exceptions nobody retrieved. The failure
  reaches us as an exception and is reported in one line, so those records go to DEBUG."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    ours = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
    if record.name == "asyncio":
      text = record.getMessage()
      ours = "exception was never retrieved" in text and (
          "tensorstore" in text.lower() or "orbax" in text.lower())
    if ours:
      record.levelno, record.levelname = logging.DEBUG, "DEBUG"
      return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


def _install_log_filter() -> None:
  for name in ("absl", "asyncio"):
    target = logging.getLogger(name)
    if not any(isinstance(f, _DemoteOrbaxErrors) for f in target.filters):
      target.addFilter(_DemoteOrbaxErrors())
  if not getattr(sys.unraisablehook, "_align_jax", False):
    sys.unraisablehook = _quiet_closed_loop_hook(sys.unraisablehook)


def _quiet_closed_loop_hook(previous):
  """When one tensorstore read or write of an orbax call fails, orbax closes that call's event
  loop while sibling operations are still in flight; each of them then reports "Event loop is
  closed" from its completion callback as an unraisable exception (a traceback on stderr, often
  after our one-line error). Those, and only those, are dropped."""
  def hook(unraisable):
    error = unraisable.exc_value
    trace = unraisable.exc_traceback
    while trace is not None and trace.tb_next is not None:
      trace = trace.tb_next
    if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        and trace is not None and "asyncio" in trace.tb_frame.f_code.co_filename):
      return
    previous(unraisable)
  hook._align_jax = True  # pylint: disable=protected-access
  return hook


def _forget_cached_listings(path: str) -> None:
  """Orbax reaches ``gs://`` through etils.epath's own cached gcsfs client; after a folder was
  moved by :mod:`align_jax.storage`, its cached listing would still show the folder there."""
  if storage.is_url(path):
    from etils.epath import backend  # pylint: disable=g-import-not-at-top
    backend.fsspec_backend.fs(path).invalidate_cache()


def _any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is True on any (all processes take the same branch)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


# ---------------------------------------------------------------------------------------------


def _by_path_name(sums: dict[str, int]) -> dict[str, int]:
  """``{".params['image'][0]": x}`` -> ``{"params/image/0": x}``: the same name for an attribute,
  a dict key and a sequence index, whatever container held the array."""
  def name(key: str) -> str:
    parts = re.findall(r"\.(\w+)|\[(-?\d+)\]|\[(?:'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\")\]",
                       key)
    return "/".join(next(p for p in groups if p) if any(groups) else "" for groups in parts)
  return {name(k): v for k, v in sums.items()}


class Checkpointer:
  """Saves every ``every`` steps into ``WORKDIR/checkpoints``, keeps the last ``keep``."""

  def __init__(self, workdir: str, *, every: int = 1, keep: int | None = None,
               async_save: bool = True, read_only: bool = False):
    """``read_only``: a reader of an existing (possibly still training) run, for evaluation and
    export: it creates no folder, removes no unfinished save and never saves."""
    _install_log_filter()
    self.every = every
    self.read_only = read_only
    self.workdir = storage.normalize(workdir)
    self.directory = storage.join(self.workdir, CHECKPOINTS)
    self.corrupt_directory = storage.join(self.workdir, CORRUPT)
    if read_only:  # the item handlers let a reader ask orbax for the saved tree's metadata
      _forget_cached_listings(self.directory)  # the run may have saved (or removed) steps since
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False),
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "data": ocp.JsonCheckpointHandler(),
                         "integrity": ocp.JsonCheckpointHandler()})
    else:
      self._report_unfinished()
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
              cleanup_tmp_directories=True))
    self._pending: int | None = None  # step of a save not yet known to have finished
    self.last_good: int | None = None  # newest checkpoint known to be complete

  def step_path(self, step: int) -> str:
    return storage.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """The finished checkpoint steps, oldest first (unfinished saves are never listed)."""
    return sorted(self.manager.all_steps())

  def saved_state(self, step: int) -> Any:
    """The saved train state's tree at ``step`` (nested dicts and lists; a leaf per array, with
    ``shape`` and ``dtype``), read from the checkpoint's metadata without reading any array."""
    return self.manager.item_metadata(step)["state"].tree

  # --- resume ----------------------------------------------------------------------------------

  def _report_unfinished(self) -> None:
    """One line per save that never finished (orbax removes those folders when it starts)."""
    if jax.process_index() != 0:
      return
    for name in storage.listdir(self.directory):
      path = storage.join(self.directory, name)
      unfinished = _TMP_MARK in name or (
          storage.is_url(path) and name.isdigit()
          and not storage.exists(storage.join(path, _COMMIT_FILE)))
      if unfinished:
        step = re.match(r"\d+", name)
        logger.warning("checkpoint step %s at %s was never finished (no commit marker: the run "
                       "stopped during the save); ignored, orbax removes it",
                       step.group(0) if step else "?", path)

  def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
    """Restores and verifies one step; raises with "<item>: <cause>" if it is not usable."""
    def item(name: str, arg):
      try:
        return self.manager.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
      except Exception as error:  # pylint: disable=broad-except
        raise CheckpointError(f"{name}: {describe_error(error)}") from error

    data = item("data", ocp.args.JsonRestore())
    state = item("state", ocp.args.StandardRestore(abstract_state))
    if storage.exists(storage.join(self.step_path(step), "integrity")):  # absent before 2026-12
      saved = item("integrity", ocp.args.JsonRestore())
      # Compared by path names, so a state restored as the saved tree (dicts and lists, see
      # saved_state) is checked as well as one restored into a TrainState.
      got = _by_path_name(state_checksums(state))
      expected = _by_path_name(saved.get("checksums", {}) if isinstance(saved, dict) else {})
      bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
      if bad:
        raise CheckpointError(f"state: checksum mismatch in {len(bad)} of {len(got)} arrays "
                              f"(e.g. {bad[0]}): the files were damaged after the save")
    if not isinstance(data, dict):
      raise CheckpointError(f"data: expected a JSON object, got {type(data).__name__}")
    return state, data

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step folder to ``checkpoints_corrupt/<step>-<UTC time>``; returns it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = storage.join(self.corrupt_directory, f"{step}-{stamp}")
    if jax.process_index() == 0:
      storage.makedirs(self.corrupt_directory)
      try:
        storage.rename(self.step_path(step), target)
      except OSError as error:
        if getattr(error, "errno", None) != errno.EXDEV:
          raise
        shutil.move(self.step_path(step), target)  # checkpoints/ on its own mount
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"align_jax_moved_checkpoint_{step}")
    return target

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
    """(state, data_state, step) of the newest checkpoint that restores, or None if there is none.

    Damaged newer checkpoints are reported (one line each) and moved aside; if none restores,
    nothing is moved and :class:`CheckpointError` says so in one line.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for step in steps:
      try:
        state, data = self._restore_step(abstract_state, step)
        cause = None
      except Exception as error:  # pylint: disable=broad-except
        cause = str(error) if isinstance(error, CheckpointError) else describe_error(error)
      if _any_process(cause is not None):
        failures.append((step, cause or "failed on another process"))
        continue
      for bad_step, bad_cause in failures:
        target = self._move_aside(bad_step)
        logger.warning("checkpoint step %d at %s cannot be restored (%s); moved it to %s and "
                       "resumed from step %d", bad_step, self.step_path(bad_step), bad_cause,
                       target, step)
      if failures:
        _forget_cached_listings(self.directory)
        self.manager.reload()
      logger.info("restored checkpoint at step %d from %s", step, self.directory)
      self.last_good = step
      return state, data, step
    if failures:
      first_step, first_cause = failures[0]
      others = ", ".join(str(s) for s, _ in failures[1:])
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored: step {first_step}: {first_cause}"
          + (f" (steps {others} fail too)" if others else "")
          + f"; nothing was changed. To start over, move {self.directory} aside or use "
          "another --workdir")
    return None

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores (state, data_state, step) of one step (default: the latest) onto the shardings
    in ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set, so each
    process reads only its own shards); raises :class:`CheckpointError` if it is damaged."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      state, data = self._restore_step(abstract_state, step)
    except CheckpointError as error:
      raise CheckpointError(f"checkpoint step {step} at {self.step_path(step)} cannot be "
                            f"restored ({error})") from None
    logger.info("restored checkpoint at step %d from %s", step, self.directory)
    return state, data, step

  # --- save ------------------------------------------------------------------------------------

  def _save_error(self, step: int, error: BaseException) -> CheckpointError:
    last = (f"the last good checkpoint is step {self.last_good} ({self.step_path(self.last_good)})"
            if self.last_good is not None else "no checkpoint was saved yet")
    return CheckpointError(
        f"saving checkpoint step {step} to {self.step_path(step)} failed: "
        f"{describe_error(error)}; {last}. Fix the cause (space, permissions, quota) and run the "
        "same command again to resume")

  def _finish_pending(self) -> None:
    """Waits for the pending save; raises CheckpointError if it failed."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      self._close_quietly()
      raise self._save_error(step, error) from None
    self.last_good = step

  def _close_quietly(self) -> None:
    """Stops orbax's background threads after a failed save (the failure is reported by us)."""
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def check(self, *, collective: bool = True) -> None:
    """Raises CheckpointError if a save failed in the background. Cheap; call every step.

    With several processes the answer is agreed over all of them (one tiny collective), so every
    process stops at the same step; pass ``collective=False`` to skip such steps.
    """
    if jax.process_count() > 1:
      if not collective:
        return
      done = self._pending is not None and not self.manager.is_saving_in_progress()
      failed = False
      if done:
        try:
          self._finish_pending()
        except CheckpointError as error:
          failed, message = True, str(error)
      if _any_process(failed):
        raise CheckpointError(message if failed else
                              "a checkpoint save failed on another process (see its log)")
      return
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._finish_pending()

  def maybe_save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Saves at multiples of ``every`` (or when forced); returns whether it saved."""
    if not force and step % self.every:
      return False
    self._finish_pending()  # one save at a time; a failed previous one stops here
    if step in self.manager.all_steps():
      return False
    integrity = {"format": _CHECKSUM_FORMAT, "checksums": state_checksums(state)}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          integrity=ocp.args.JsonSave(integrity)), force=True)
    except Exception as error:  # pylint: disable=broad-except
      self._close_quietly()
      raise self._save_error(step, error) from None
    self._pending = step
    return True

  def wait(self) -> None:
    self._finish_pending()

  def close(self) -> None:
    self._finish_pending()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for restoring onto the layout of ``tree``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
