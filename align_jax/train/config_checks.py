"""The trainer's config checks (:mod:`align_jax.config.checks`): the schedule, the optimiser and
the feature store's dtype (``--mode=extract_features``, :mod:`align_jax.train.extract`)."""

from __future__ import annotations

import ml_collections

from align_jax.config import checks
from align_jax.train import extract

checks.register_choices(__name__, "extract.dtype", extract.STORE_DTYPES)


@checks.register
def check_schedule(config: ml_collections.ConfigDict, context: checks.Context) -> list[str]:
  del context  # the schedule and the optimiser do not depend on the mesh
  problems = []
  for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
    if config[key] <= 0:
      problems.append(f"{key} must be positive (got {config[key]}): set --config.{key}=N")
  if not config.optim.learning_rate > 0:
    problems.append(f"optim.learning_rate must be > 0 (got {config.optim.learning_rate}): set "
                    "--config.optim.learning_rate, e.g. 1e-3 (the default)")
  if config.optim.warmup_steps < 0:
    problems.append("optim.warmup_steps must be >= 0")
  return problems
