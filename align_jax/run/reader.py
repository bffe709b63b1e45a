"""A training run's folder, read back: its checkpoint steps, the params at a step, its config.

A run directory ``WORKDIR`` (a local folder or a URL such as ``gs://bucket/run``) holds
``config.json`` (the run's config, written by the trainer) and ``checkpoints/<step>/``
(:mod:`align_jax.run.checkpoint`). Everything that reads a finished or running run -- standalone
evaluation, the benchmark suite, export, ``AlignedModel.load`` and the tests -- goes through this
module, which goes through :mod:`align_jax.run.storage` for files and a read-only
:class:`align_jax.run.checkpoint.Checkpointer` for checkpoints (so every restore is verified against
the checksums saved with it, and reading never creates, moves or removes anything)::

    run_dir.steps(workdir)                        # [10, 20]
    run_dir.restore_params(workdir, step=10)      # (params as host numpy, 10, ".../checkpoints/10")
    run_dir.restore_params(workdir, shardings=fn) # params placed on a mesh as they are read
    run_dir.read_config(workdir)                  # the run's ConfigDict, tuples as in the schema
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np

from align_jax.run import checkpoint as checkpoint_lib
from align_jax.config import schema as config_lib
from align_jax.run import storage

CONFIG_FILE = "config.json"
_CONFIG_FIX = ("pass the run's config explicitly, or train with a current align_jax (it writes "
               "config.json into the workdir)")


class RestoredParams(NamedTuple):
  """The trainable params of one checkpoint, its step and its folder."""
  params: Any
  step: int
  path: str


def checkpoints_dir(workdir: str) -> str:
  """``WORKDIR/checkpoints`` (absolute for a local folder)."""
  return storage.join(storage.normalize(workdir), checkpoint_lib.CHECKPOINTS)


def steps(workdir: str) -> list[int]:
  """The finished checkpoint steps of a run, oldest first ([] if it has none)."""
  if not storage.isdir(checkpoints_dir(workdir)):  # checked first: nothing is created
    return []
  reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    return reader.all_steps()
  finally:
    reader.close()


def restore_params(workdir: str, step: int | None = None, *,
                   shardings: Any | Callable[[Any], Any] | None = None) -> RestoredParams:
  """The trainable params (projectors and logit params) of a run's checkpoint.

  The checkpoint's tree is read from its own metadata, so no model, optimiser or mesh of the run
  that saved it is needed; its checksums are verified. Only the params are returned. Without
  ``step``, a damaged latest checkpoint falls back to the newest one that restores, as a resumed
  training run does, but read-only: one warning line names the damaged step, the step used and
  the steps available with ``--step``; nothing is moved (the run may still be training).

  Args:
    workdir: the run's folder.
    step: the checkpoint step; None for the latest.
    shardings: where the params go. None: host numpy arrays (of the saved dtypes). A pytree of
      ``jax.sharding.Sharding`` like the params, or a function from the params' tree of
      ``jax.ShapeDtypeStruct`` to one (e.g. :func:`align_jax.train.step.params_shardings`):
      each array is read straight onto its sharding, each process reading only its own shards.

  Raises:
    FileNotFoundError: no checkpoint in the run, or none at ``step`` (lists the ones there).
    align_jax.run.checkpoint.CheckpointError: the checkpoint at ``step`` is damaged, or without
      ``step`` none restores (one line naming it and the other steps).
  """
  directory = checkpoints_dir(workdir)
  missing = FileNotFoundError(
      f"no checkpoint in {directory}; train first (python main.py --config=... "
      f"--workdir={workdir}), pass the workdir of a run, or load an exported folder")
  if not storage.isdir(directory):
    raise missing
  reader = checkpoint_lib.Checkpointer(workdir, read_only=True)

  def target(at_step: int) -> Any:
    """Restore target of one checkpoint, from its own metadata: host arrays, or ``shardings``."""
    saved = reader.saved_state(at_step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            saved)
    if shardings is not None:
      params, placed = abstract["params"], shardings
      if callable(placed):
        placed = placed(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
      abstract["params"] = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, placed)
    return abstract

  try:
    available = reader.all_steps()
    if not available:
      raise missing
    if step is None:  # the newest that restores; damaged newer ones are reported, left in place
      state, _, step = reader.restore_latest(target)
    elif step not in available:
      raise FileNotFoundError(f"no checkpoint at step {step} in {directory}; available steps: "
                              f"{available}")
    else:
      state, _, step = reader.restore(target, step)
  finally:
    reader.close()
  params = state["params"]
  if shardings is None:
    params = jax.tree.map(np.asarray, params)
  return RestoredParams(params, int(step), reader.step_path(step))


def write_config(folder: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``FOLDER/config.json`` (replaced whole), for :func:`read_config`."""
  storage.write_text(storage.join(folder, CONFIG_FILE), config.to_json_best_effort(indent=2))


def read_config(folder: str, *, fix: str = _CONFIG_FIX) -> ml_collections.ConfigDict:
  """The config in ``FOLDER/config.json`` (a run or an export), as the ConfigDict it was.

  Keys the file lacks keep the schema's defaults (:func:`align_jax.config.schema.default_config`);
  keys the schema lacks are added (the free-form ``evals`` entries). JSON has no tuples, so lists
  become tuples where the schema has tuples (mesh axes, sharding rules).

  Args:
    folder: the run's or export's folder.
    fix: what the error for a missing file tells the user to do.

  Raises:
    FileNotFoundError: no ``config.json`` in the folder.
    ValueError: the file is not JSON, or does not match the schema.
  """
  path = storage.join(folder, CONFIG_FILE)
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path} is missing: {fix}")
  try:
    saved = json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not valid JSON ({error}); pass the run's config explicitly or "
                     "rewrite the file") from None
  config = config_lib.default_config()

  def merge(node: ml_collections.ConfigDict, values: dict):
    for key, value in values.items():
      if key not in node:
        with node.unlocked():
          node[key] = value  # free-form parts (evals entries)
      elif isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
        merge(node[key], value)
      else:
        if isinstance(node[key], tuple) and isinstance(value, list):
          value = _tuples(value)
        node[key] = value

  if not isinstance(saved, dict):
    raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not a config object; pass "
                     "the run's config explicitly")
  try:
    merge(config, saved)
  except (AttributeError, KeyError, TypeError) as error:
    raise ValueError(f"{path} does not match align_jax's config schema ({error}); pass the "
                     "config explicitly") from None
  return config


def _tuples(value):
  """Nested lists -> nested tuples (e.g. sharding rules)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
