"""Evaluate a finished (or running) training run's checkpoint outside the training loop.

    python main.py --mode=evaluate --config=configs/X.py --workdir=DIR [--step=N]

is ``evaluate_checkpoint(config, workdir, step)``: it restores the trainable params (projectors and
logit params) of ``DIR/checkpoints/<step>`` (the latest by default) onto the mesh, rebuilds the
frozen encoders from the config (they are never checkpointed), runs every evaluator of
``config.evals`` exactly as training does, and writes ``DIR/eval_results.json``::

    {"step": 600, "checkpoint": "DIR/checkpoints/600", "results": {"eval/i2t@1": 0.9, ...}}

The config may add evaluators the run did not have (e.g. a zero-shot suite after training on
captions) or change their data; the params and the encoders must match the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from align_jax import config as config_lib
from align_jax import model as model_lib
from align_jax import sharding
from align_jax import storage
from align_jax.evaluate import evaluators as evaluators_lib

logger = logging.getLogger("align_jax")

RESULTS_FILE = "eval_results.json"


def restore_params(workdir: str, step: int | None = None) -> tuple[Any, int, str]:
  """The trainable params of a checkpoint, as host numpy arrays, with its step and folder.

  Args:
    workdir: the training run's folder (checkpoints live in ``workdir/checkpoints``).
    step: the checkpoint step; None for the latest.

  Raises:
    FileNotFoundError: no checkpoint in the folder, or none at ``step`` (lists the ones there).
  """
  directory = storage.join(storage.normalize(workdir), "checkpoints")
  missing = FileNotFoundError(f"no checkpoint in {directory}; train first (python main.py "
                              f"--config=... --workdir={workdir}) or pass the workdir of a run.")
  if not storage.isdir(directory):  # checked first: the manager would create the folder
    raise missing
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise missing
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint at step {step} in {directory}; available steps: "
                              f"{steps}.")
    # Only the train state (not the data position); without a target orbax returns host arrays.
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  params = jax.tree.map(np.asarray, restored["state"]["params"])
  return params, step, storage.join(directory, str(step))


def _on_mesh(params: Any, mesh, rules) -> Any:
  """Host params laid out on the mesh by the training run's parameter rules."""
  # Rules match paths of the train state, whose params sit under "params/".
  shardings = sharding.param_shardings({"params": params}, mesh, rules)["params"]
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      params, shardings)


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint ready to evaluate: the model, its params and frozen params on the mesh."""
  model: Any
  params: Any
  frozen: Any
  mesh: Any
  step: int
  checkpoint: str


def restore_for_evaluation(config: ml_collections.ConfigDict, workdir: str,
                           step: int | None = None, mesh=None) -> Restored:
  """Validates ``config``, restores a checkpoint's trainable params and builds the frozen encoders.

  Args:
    config: the run's config (the encoders and projectors must match the checkpoint's).
    workdir: the training run's folder.
    step: checkpoint step; None for the latest.
    mesh: defaults to the one ``config.mesh`` describes over all devices.

  Raises:
    FileNotFoundError: no checkpoint (at ``step``) in ``workdir/checkpoints``.
    ValueError: the config is invalid.
  """
  mesh = sharding.mesh_from_config(config.mesh) if mesh is None else mesh
  config_lib.validate(config, sharding.num_batch_shards(mesh, tuple(config.mesh.batch_axes)),
                      jax.process_count())
  host_params, step, folder = restore_params(workdir, step)
  params = _on_mesh(host_params, mesh, config.mesh.param_rules)
  model = model_lib.build_model(config, mesh)
  frozen_host = model.frozen_params()
  frozen = jax.device_put(
      frozen_host, sharding.param_shardings(frozen_host, mesh, config.mesh.frozen_param_rules))
  return Restored(model, params, frozen, mesh, int(step), folder)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                        mesh=None) -> dict:
  """Runs every evaluator of ``config.evals`` on a checkpoint; writes ``workdir/eval_results.json``.

  Args:
    config: the run's config (the encoders and projectors must match the checkpoint's).
    workdir: the training run's folder.
    step: checkpoint step to evaluate; None for the latest.
    mesh: defaults to the one ``config.mesh`` describes over all devices.

  Returns:
    ``{"step": int, "checkpoint": folder, "results": {metric key: float}}``, as written.

  Raises:
    FileNotFoundError: no checkpoint (at ``step``) in ``workdir/checkpoints``.
    ValueError: ``config.evals`` is empty, or the config is invalid.
  """
  if not config.evals:
    raise ValueError("config.evals is empty: add an evaluator, e.g. --config.evals or "
                     "config.evals.imagenet = dict(type='zero_shot', data=dict(...)).")
  if storage.is_url(workdir):  # an unreachable bucket: one line now, not after gcsfs's retries
    storage.check_writable(workdir)
  run = restore_for_evaluation(config, workdir, step, mesh)
  results: dict[str, float] = {}
  for evaluator in evaluators_lib.build_evaluators(config, run.model, run.mesh):
    results.update(evaluator.run(run.params, run.frozen))
  logger.info("step %d eval: %s", run.step, " ".join(f"{k}={v:.4f}" for k, v in results.items()))
  report = {"step": int(run.step), "checkpoint": run.checkpoint, "results": results}
  if jax.process_index() == 0:  # replaced whole (atomic locally and on object stores)
    storage.write_text(storage.join(workdir, RESULTS_FILE), json.dumps(report, indent=2))
  return report
