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

* The newest checkpoint is restored and checked: every item must read back, the state's
  checksums must equal those computed before it was saved (catching silently corrupted chunks
  that tensorstore would decode without an error), and the step the state holds must be the
  folder's. A checkpoint without its checksums (``integrity/``) cannot be verified, so it is
  damaged too (a ``state/`` copied in from another step looks the same). A checkpoint that fails
  is reported in one line (step, path, cause), moved to
  ``WORKDIR/checkpoints_corrupt/<step>-<UTC time>`` (a sibling folder: orbax lists and
  garbage-collects everything inside ``checkpoints/``) and the previous one is tried. Nothing is
  deleted. Only when no checkpoint restores does the run stop, with one line, leaving the folder
  untouched.
* Unfinished saves (orbax's temporary folders, or on ``gs://`` a step folder without its commit
  marker) are never listed by orbax as checkpoints; they are reported and orbax removes them.

A reader (``Checkpointer(workdir, read_only=True)``, what :mod:`align_jax.run.reader` uses for
evaluation, export and inference) lists and restores with the same verification and the same
fallback to the newest checkpoint that restores, and never creates, cleans up or moves anything:
the run it reads may still be training. Its one line per damaged checkpoint names the step used
and the steps left to pick with ``--step``.

Retention (:class:`KeepNewest`) keeps the ``keep`` highest steps and can never remove the newest
one: ``keep`` < 1 is refused.

When one read or write of an orbax call fails, orbax abandons the others; they then report from
the garbage collector or tensorstore's callbacks, ~60 lines each, through ``sys.unraisablehook``.
While a :class:`Checkpointer` is open those reports, and only those, are dropped
(:mod:`align_jax.run.orbax_quiet`); failed calls are followed by a collection so that none is left
to print after the checkpointer closes.

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
import time
import weakref
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from align_jax.run import checksums, orbax_quiet, storage

logger = logging.getLogger("align_jax")

CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"
_TMP_MARK = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"
_CHECKSUM_FORMAT = "align_jax.state_checksums/1"


class CheckpointError(OSError):
  """A checkpoint that cannot be written or restored; the message is one line naming the path."""


def state_checksums(state: Any) -> dict[str, int]:
  """``{path: checksum}`` of every array of a train state (see :mod:`align_jax.run.checksums`)."""
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


def _forget_cached_listings(path: str) -> None:
  """Orbax reaches ``gs://`` through etils.epath's own cached gcsfs client; after a folder was
  moved by :mod:`align_jax.run.storage`, its cached listing would still show the folder there."""
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


class KeepNewest:
  """Orbax retention (a ``preservation_policy``): keeps the ``keep`` highest steps, all if None.

  The highest step is kept whatever happens: ``keep`` < 1 is refused here, and the choice is made
  by step number, not by the order orbax lists its checkpoints in. So retention can never remove
  the newest checkpoint, the one a resume starts from.
  """

  def __init__(self, keep: int | None):
    if keep is not None and keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1 (got {keep}): retention always keeps the "
                       "newest checkpoint; set --config.keep_checkpoints=N with N >= 1")
    self.keep = keep

  def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
    """One bool per checkpoint (objects with a ``step``), in the order given; ``context`` (orbax's
    PreservationContext) is not needed."""
    del context
    newest = sorted({c.step for c in checkpoints}, reverse=True)
    kept = set(newest if self.keep is None else newest[:self.keep])
    return [c.step in kept for c in checkpoints]


class Checkpointer:
  """Saves every ``every`` steps into ``WORKDIR/checkpoints``, keeps the last ``keep`` (>= 1).

  Close it (:meth:`close`, or use it in a ``with`` block): while one is open, orbax's reports of
  abandoned operations after a failure are dropped (:mod:`align_jax.run.orbax_quiet`).
  """

  def __init__(self, workdir: str, *, every: int = 1, keep: int | None = None,
               async_save: bool = True, read_only: bool = False):
    """``read_only``: a reader of an existing (possibly still training) run, for evaluation and
    export: it creates no folder, removes no unfinished save, never saves and never moves a
    damaged checkpoint aside.

    Raises:
      ValueError: ``keep`` < 1 (retention would remove the checkpoint just saved).
    """
    retention = KeepNewest(keep)  # checked before anything is opened
    orbax_quiet.install_log_filter()
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
              preservation_policy=retention, enable_async_checkpointing=async_save,
              create=True, cleanup_tmp_directories=True))
    self._pending: int | None = None  # step of a save not yet known to have finished
    self.last_good: int | None = None  # newest checkpoint known to be complete
    self._abandoned = False  # an orbax call failed: its abandoned operations may still report
    orbax_quiet.acquire()
    # Released by close(), or when an unclosed checkpointer (a run stopped by an error) is
    # garbage-collected, so a long-lived process (notebook, tests) is not left filtered.
    self._release_filter = weakref.finalize(self, orbax_quiet.release)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def step_path(self, step: int) -> str:
    return storage.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """The finished checkpoint steps, oldest first (unfinished saves are never listed)."""
    return sorted(self.manager.all_steps())

  def saved_state(self, step: int) -> Any:
    """The saved train state's tree at ``step`` (nested dicts and lists; a leaf per array, with
    ``shape`` and ``dtype``), read from the checkpoint's metadata without reading any array.

    Raises:
      CheckpointError: the metadata cannot be read ("state: metadata: <cause>").
    """
    cause = None
    try:
      return self.manager.item_metadata(step)["state"].tree
    except Exception as error:  # pylint: disable=broad-except
      cause = describe_error(error)
    raise CheckpointError(f"state: metadata: {cause}")

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
    """Restores and verifies one step; raises with "<item>: <cause>" if it is not usable.

    ``abstract_state`` is the restore target, or a function of the step that gives it (read
    from that checkpoint's own metadata, whose failure then counts as damage).
    """
    def item(name: str, arg):
      cause = None
      try:
        return self.manager.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
      except Exception as error:  # pylint: disable=broad-except
        cause = f"{name}: {describe_error(error)}"
        logger.debug("restoring %s of checkpoint step %d failed", name, step, exc_info=True)
      # Raised outside the except block, so nothing keeps orbax's abandoned reads alive.
      self._abandoned = True
      orbax_quiet.collect_abandoned_operations()
      raise CheckpointError(cause)

    if not storage.exists(storage.join(self.step_path(step), "integrity")):
      raise CheckpointError("integrity: the state's checksums are missing, so the state cannot "
                            "be verified (a state/ copied in from elsewhere looks the same)")
    data = item("data", ocp.args.JsonRestore())
    if callable(abstract_state):
      abstract_state = abstract_state(step)
    state = item("state", ocp.args.StandardRestore(abstract_state))
    saved = item("integrity", ocp.args.JsonRestore())
    if not isinstance(saved, dict) or saved.get("format") != _CHECKSUM_FORMAT:
      raise CheckpointError(f"integrity: not a {_CHECKSUM_FORMAT} record")
    # Compared by path names, so a state restored as the saved tree (dicts and lists, see
    # saved_state) is checked as well as one restored into a TrainState.
    got = _by_path_name(state_checksums(state))
    expected = _by_path_name(saved.get("checksums") or {})
    bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
    if bad:
      raise CheckpointError(f"state: checksum mismatch in {len(bad)} of {len(got)} arrays "
                            f"(e.g. {bad[0]}): the files were damaged after the save")
    stored = _stored_step(state)
    if stored is not None and stored != step:
      raise CheckpointError(f"state: holds step {stored}, not {step} (state/ and integrity/ "
                            f"were copied in from checkpoint {stored})")
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

    ``abstract_state``: the restore target (see :meth:`restore`), or a function of the step that
    gives it. Damaged newer checkpoints are reported (one line each) and, unless this is a
    reader, moved aside; a reader (evaluation, export) leaves them in place and its one line names
    the step used and the steps left to pick with ``--step``. If none restores, nothing is moved
    and :class:`CheckpointError` says so in one line.
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
      if self.read_only:
        others = [s for s in sorted(steps) if s not in dict(failures)]
        for bad_step, bad_cause in failures:
          logger.warning("checkpoint step %d at %s cannot be restored (%s); left it in place and "
                         "used step %d instead (steps available with --step: %s)", bad_step,
                         self.step_path(bad_step), bad_cause, step,
                         ", ".join(map(str, others)))
      else:
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
          + (f" (steps {others} fail too)" if others else "") + "; nothing was changed"
          + ("" if self.read_only else f". To start over, move {self.directory} aside or use "
             "another --workdir"))
    return None

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores (state, data_state, step) of one step (default: the latest) onto the shardings
    in ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set, so each
    process reads only its own shards, or a function of the step that gives it); raises
    :class:`CheckpointError` naming the other steps if it is damaged."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      state, data = self._restore_step(abstract_state, step)
    except CheckpointError as error:
      cause = str(error)
    else:
      logger.info("restored checkpoint at step %d from %s", step, self.directory)
      return state, data, step
    others = ", ".join(str(s) for s in self.all_steps() if s != step) or "none"
    raise CheckpointError(f"checkpoint step {step} at {self.step_path(step)} cannot be restored "
                          f"({cause}); other steps available with --step: {others}")

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
      self._abandoned = True
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
    """Waits for the pending save (raises :class:`CheckpointError` if it failed) and closes."""
    if not self._release_filter.alive:
      return
    try:
      self._finish_pending()
      self.manager.close()
    finally:
      if self._abandoned:
        orbax_quiet.collect_abandoned_operations()  # still filtered
      self._release_filter()


def _stored_step(state: Any) -> int | None:
  """The step a restored train state holds (a TrainState's ``step``, or a saved tree's "step"
  entry), or None if it holds none."""
  value = state.get("step") if isinstance(state, dict) else getattr(state, "step", None)
  if value is None or np.ndim(value) != 0:
    return None
  if isinstance(value, jax.Array):  # replicated: every process holds the value
    value = value.addressable_data(0)
  return int(np.asarray(value))


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for restoring onto the layout of ``tree``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
