"""Evaluate a finished (or running) training run's checkpoint outside the training loop.

    python main.py --mode=evaluate --config=configs/X.py --workdir=DIR [--step=N]

is ``evaluate_checkpoint(config, workdir, step)``: it restores the trainable params (projectors and
logit params) of ``DIR/checkpoints/<step>`` onto the mesh (by default the latest; if that one is
damaged, the newest that restores, named in one warning line and nothing moved: see
:func:`align_jax.run.reader.restore_params`), rebuilds the
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

from align_jax.train import validation
from align_jax.model import two_tower as model_lib
from align_jax.run import reader as run_dir
from align_jax.parallel import mesh as sharding
from align_jax.train import step as step_builder
from align_jax.run import storage
from align_jax.evaluate import evaluators as evaluators_lib

logger = logging.getLogger("align_jax")

RESULTS_FILE = "eval_results.json"


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
    step: checkpoint step; None for the latest that restores.
    mesh: defaults to the one ``config.mesh`` describes over all devices.

  Raises:
    FileNotFoundError: no checkpoint (at ``step``) in ``workdir/checkpoints``.
    align_jax.run.checkpoint.CheckpointError: the checkpoint at ``step`` is damaged, or none restores.
    ValueError: the config is invalid.
  """
  mesh = sharding.mesh_from_config(config.mesh) if mesh is None else mesh
  validation.validate(config, sharding.num_batch_shards(mesh, tuple(config.mesh.batch_axes)),
                      jax.process_count())
  # Read straight onto the mesh, laid out by the training run's parameter rules.
  params, step, folder = run_dir.restore_params(
      workdir, step, shardings=lambda shapes: step_builder.params_shardings(shapes, mesh, config))
  model = model_lib.build_model(config, mesh)
  frozen, _ = step_builder.place_frozen(model, mesh, config)
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
