"""Orbax checkpoints of the trainable state and the data position, with automatic resume.

A checkpoint holds the step, the trainable params, the optimiser state, the RNG key and the input
source's state (JSON). Frozen encoder params are never saved: they are re-read from their source
(a Hugging Face checkpoint, or a seed for the demo encoders), so checkpoints stay small.

Saves are asynchronous and atomic (orbax writes to a temporary folder and renames it when done),
so a process killed at any moment leaves the last finished checkpoint intact, and the same command
resumes from it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from align_jax import storage

logger = logging.getLogger("align_jax")


class Checkpointer:
  """Saves every ``every`` steps into ``WORKDIR/checkpoints``, keeps the last ``keep``."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    self.every = every
    self.directory = storage.join(storage.normalize(workdir), "checkpoints")  # or a gs:// URL
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def maybe_save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Saves at multiples of ``every`` (or when forced); returns whether it saved."""
    if not force and step % self.every:
      return False
    if step in self.manager.all_steps():
      return False
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    return True

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores (state, data_state, step) onto the shardings in ``abstract_state``.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set, so each
    process reads only its own shards.
    """
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    logger.info("restored checkpoint at step %d from %s", step, self.directory)
    return restored["state"], restored["data"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for restoring onto the layout of ``tree``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
