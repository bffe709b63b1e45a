"""The trainer: one pure train step, the run's build (jitted by align_jax.train.step), the loop.

``train_and_evaluate(config, workdir)`` is the whole program (``main.py`` only parses flags), so a
notebook runs exactly what the command line runs. The step is

    train_step(state, frozen, batch) -> (state, metrics)

a pure function jitted once with in/out shardings over the mesh and the state donated. ``frozen``
(the encoders' params) is a separate argument that is never differentiated and never enters the
optimiser state or a checkpoint. The loss is computed under ``shard_map``: each device holds its
rows of the batch and sees the other tower of the whole global batch
(align_jax.objectives.contrastive).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import jax
import ml_collections
import optax
from clu import parameter_overview

from align_jax.run import checkpoint as checkpoint_lib
from align_jax.train import compilation_cache
from align_jax.train import validation
from align_jax.train import extract as feature_store
from align_jax.model import interfaces
from align_jax.parallel import peer_watch, preemption, processes as distributed
from align_jax.objectives import kinds as loss_kinds
from align_jax.model import two_tower as model_lib
from align_jax.train import optim
from align_jax.run import metrics as reporting
from align_jax.parallel import mesh as sharding
from align_jax.run import reader as run_dir, storage
from align_jax.train import step as step_builder
from align_jax.objectives import objective as objective_lib
from align_jax.train import fusemix
from align_jax.data import factory as data_factory
from align_jax.data import array_sources as data_features
from align_jax.evaluate import evaluators as evaluators_lib

logger = logging.getLogger("align_jax")




def make_train_step(model: model_lib.AlignModel, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh):
  """Returns the pure ``train_step(state, frozen, batch) -> (state, metrics)``."""
  kind = loss_kinds.get(config.loss)  # the loss and its logit params (align_jax.objectives.kinds)
  # Each off by default: FuseMix on the frozen features (align_jax.train.fusemix); the objective
  # (align_jax.objectives.objective: multi-positive / CWCL losses, STRUCTURE), the kind's sharded
  # loss when all are off.
  mix_features = fusemix.make_feature_mixer(config, mesh)
  objective_fn = objective_lib.make_objective(config, mesh, kind)
  schedule = optim.learning_rate_schedule(config)

  def train_step(state: step_builder.TrainState, frozen: dict, batch: dict):
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    image, text = model.encode(frozen, batch)  # frozen: outside the differentiated function
    image, text = mix_features(state.rng, state.step, image, text)

    def objective(params):
      z_image, z_text = model.project(params, image, text, train=True, rng=dropout_rng)
      values = kind.loss_args(params["logit"])
      loss, extra = objective_fn(z_image, z_text, values, image, text)
      return loss, {**values, **extra}

    (loss, values), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = {**params, "logit": kind.clamp(params["logit"])}
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
               "train/param_norm": optax.tree.norm(params),
               "train/learning_rate": schedule(state.step),
               **{f"train/{k}": v for k, v in values.items()}}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def _check_finite(pending: list[tuple[int, dict]], hint: str = "") -> None:
  """Stops at a non-finite loss; ``hint`` adds a cause (a store whose digests were not rechecked)."""
  for step, metrics in pending:
    loss = float(metrics["train/loss"])
    if not math.isfinite(loss):
      raise FloatingPointError(
          f"non-finite loss ({loss}) at step {step}; stopping. Lower config.optim.learning_rate, "
          f"check the input features, or resume from the last checkpoint{hint}")


@dataclasses.dataclass
class Trainer:
  """Everything a run needs, built once from the config (the loop, tests and notebooks share it)."""
  config: ml_collections.ConfigDict
  mesh: Any
  model: model_lib.AlignModel
  source: interfaces.PairSource  # next / get_state / set_state / skipped
  frozen: dict
  state: step_builder.TrainState
  state_shardings: Any
  batch_sharding: Any
  train_step: Callable  # jitted: (state, frozen, global batch) -> (state, metrics); donates state

  def next_batch(self) -> dict:
    """The source's next rows for this process, as one global batch on the mesh."""
    return sharding.host_to_global(next(self.source), self.batch_sharding)


def build_trainer(config: ml_collections.ConfigDict, mesh=None) -> Trainer:
  """Validates the config and builds mesh, model, input, frozen params, state and jitted step."""
  mesh = sharding.mesh_from_config(config.mesh) if mesh is None else mesh
  batch_axes = tuple(config.mesh.batch_axes)
  validation.validate(config, sharding.num_batch_shards(mesh, batch_axes), jax.process_count())
  data_features.check_feature_encoders(config)  # stored features: no encoder runs again
  model = model_lib.build_model(config, mesh)
  tx = optim.make_optimizer(config)
  source = data_factory.make_train_source(config, model)
  step = step_builder.build(config, mesh, model, tx, make_train_step(model, tx, config, mesh),
                            source=source)
  return Trainer(config=config, mesh=mesh, model=model, source=source, frozen=step.frozen,
                 state=step.state, state_shardings=step.state_shardings,
                 batch_sharding=step.batch_sharding, train_step=step.train_step)


def finished_step(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """The step of the run's newest checkpoint if it is at or after ``config.total_steps`` and
  restores with matching checksums (the run is complete), else None.

  A damaged final checkpoint gives None: the resume then reports it, moves it aside and trains
  from the one before (align_jax.run.checkpoint).
  """
  steps = run_dir.steps(workdir)
  if not steps or steps[-1] < config.total_steps:
    return None
  level = logger.level
  logger.setLevel(max(level, logging.WARNING))  # no "restored checkpoint" line: only the verdict
  try:
    run_dir.restore_params(workdir, steps[-1])  # reads and verifies it (small: the projectors)
  except Exception:  # pylint: disable=broad-except  # damaged in any way: not known complete
    return None
  finally:
    logger.setLevel(level)
  return steps[-1]


def _finish_saves_after_error(checkpointer: checkpoint_lib.Checkpointer) -> None:
  """Before a run stops on an error (a non-finite loss, bad data), a save still in flight finishes.

  orbax writes asynchronously on daemon threads, which end with the process: without this wait a
  save started a step before the error could be cut off, and the restart would fall back to the
  save before it. One process only: with several, the save's commit waits at a barrier for
  every process, which the others (stopped by the same error, or by a lost-peer watch) may never
  reach.
  """
  if jax.process_count() != 1:
    return
  try:
    checkpointer.close()
  except Exception as error:  # pylint: disable=broad-except  # the run's own error is reported
    logger.warning("while stopping: the pending checkpoint save failed too: %s", error)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns the last train and eval metrics.

  ``mesh`` defaults to the one ``config.mesh`` describes over all devices. A run that is already
  complete (a checkpoint at ``total_steps``) says so in one line and returns the last value of
  every metric in its ``metrics.jsonl``, building nothing.
  """
  storage.check_writable(workdir)  # a bad bucket or path: one line now, not after the build
  compilation_cache.enable(config.get("compilation_cache_dir", ""))  # before the first compile
  done = finished_step(config, workdir)
  if done is not None:
    logger.info("run complete: checkpoint step %d of %d in %s; metrics in %s (`align-jax plot %s` "
                "draws them); raise --config.total_steps to train further", done,
                config.total_steps, run_dir.checkpoints_dir(workdir),
                storage.join(workdir, reporting.METRICS_FILE), workdir)
    return reporting.last_metrics(workdir)
  # data.source=features: the store must match the config and the run (one line), and is recorded
  store_fingerprint = feature_store.check_training_store(config, workdir)
  if store_fingerprint is not None:
    config = config.copy_and_resolve_references()
    config.data.store_fingerprint = store_fingerprint
  unverified_store = (store_fingerprint is not None and config.data.verify_features != "always")
  finite_hint = feature_store.DAMAGED_STORE_HINT if unverified_store else ""
  trainer = build_trainer(config, mesh)
  state, frozen, source = trainer.state, trainer.frozen, trainer.source
  config = config.copy_and_resolve_references()  # the hub commits the encoder ids resolved to
  for tower, commit in trainer.model.encoder_revisions().items():
    config.model[f"{tower}_encoder_revision"] = commit
  if jax.process_index() == 0:  # the run's config, for evaluation, export and AlignedModel.load
    run_dir.write_config(workdir, config)
  logger.info("%s", reporting.parameters_line(state.params))
  logger.debug("trainable parameters:\n%s",
               parameter_overview.get_parameter_overview(state.params, include_stats=False))

  checkpointer = checkpoint_lib.Checkpointer(
      workdir, every=config.checkpoint_every, keep=config.keep_checkpoints,
      async_save=config.async_checkpointing)
  start_step = 0
  restored = checkpointer.restore_latest(checkpoint_lib.abstract_like(state))  # skips damaged ones
  if restored is not None:
    state, data_state, start_step = restored
    source.set_state(data_state)
  writer = reporting.MetricsWriter(workdir, config.total_steps, resume_step=start_step)
  evaluators = evaluators_lib.build_evaluators(config, trainer.model, trainer.mesh)

  def evaluate(step):
    results = {}
    for evaluator in evaluators:
      if step == 0 or evaluator.is_due(step, step == config.total_steps):
        results.update(evaluator.run(state.params, frozen))
    if results:
      writer.write(step, results)
      logger.info("step %d eval: %s", step, " ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return results

  if start_step == 0 and config.eval_at_start:
    evaluate(0)
  elif 0 < start_step < config.total_steps and start_step % config.checkpoint_every:
    evaluate(start_step)  # saved at a preemption, before that step's due evaluations (below)
  last = {}
  pending: list[tuple[int, dict]] = []
  window_start, window_steps = time.time(), 0
  preempted_at = None

  def last_checkpoint() -> str:  # for a lost peer's one line (align_jax.parallel.peer_watch)
    saved = checkpointer.last_good if checkpointer.last_good is not None else start_step or None
    return (f"the last checkpoint known complete is step {saved} ({checkpointer.step_path(saved)})"
            if saved is not None else "no checkpoint was saved by this run yet")

  peer_watch.set_progress(last_checkpoint)
  one_at_a_time = distributed.one_program_at_a_time()
  try:
    with preemption.PreemptionWatch() as watch:
      for step in range(start_step + 1, config.total_steps + 1):
        state, metrics = trainer.train_step(state, frozen, trainer.next_batch())
        # XLA:CPU with several processes: no second program while this one runs. The first step
        # is waited for anyway: compiled and run once, the ETA is timed from there.
        if one_at_a_time or step == start_step + 1:
          jax.block_until_ready(metrics)
        if step == start_step + 1:
          writer.start_clock(step)
        checkpointer.check(collective=step % config.log_every == 0)  # a failed async save stops here
        pending.append((step, metrics))
        window_steps += 1
        is_last = step == config.total_steps
        if step % config.log_every == 0 or is_last:
          _check_finite(pending, finite_hint)
          elapsed = time.time() - window_start
          last = {k: float(v) for k, v in pending[-1][1].items()}
          last["train/examples_per_sec"] = window_steps * config.batch_size / max(elapsed, 1e-9)
          last.update(source.skipped())  # data/skipped_<reason> counters
          writer.write(step, last)
          writer.progress(step, last)
          pending, window_start, window_steps = [], time.time(), 0
        regular_save = step % config.checkpoint_every == 0 or is_last
        preempted = watch.reached(step)  # every process answers the same at every step
        # A preemption saves at once; evaluations due at this step run after the restart.
        if not (preempted and not regular_save) and any(
            evaluator.is_due(step, is_last) for evaluator in evaluators):
          _check_finite(pending, finite_hint)
          last.update(evaluate(step))
        if regular_save or preempted:
          _check_finite(pending, finite_hint)
          checkpointer.maybe_save(step, state, source.get_state(), force=is_last or preempted)
        if preempted:
          preempted_at = step
          break
  except BaseException:
    _finish_saves_after_error(checkpointer)
    raise
  checkpointer.close()
  writer.close()
  if preempted_at is not None:
    logger.warning("preempted: saved a checkpoint at step %d of %d in %s; run the same command "
                   "to continue", preempted_at, config.total_steps, workdir)
  return last

