"""The evaluators' config checks (:mod:`align_jax.config.checks`): every ``config.evals`` entry
names a type of the evaluator registry."""

from __future__ import annotations

import ml_collections

from align_jax.config import checks
from align_jax.evaluate import evaluators


@checks.register
def check_evaluators(config: ml_collections.ConfigDict, context: checks.Context) -> list[str]:
  del context  # evaluators are built later, on the training mesh
  problems = []
  for name, evaluator in config.evals.items():
    if "type" not in evaluator:
      problems.append(f"evaluator {name!r} has no type: set config.evals.{name}.type to one of "
                      f"{', '.join(repr(t) for t in evaluators.EVALUATORS)}")
    elif evaluator.type not in evaluators.EVALUATORS:
      problems.append(f"config.evals.{name}.type is {evaluator.type!r}; choose one of "
                      f"{', '.join(repr(t) for t in evaluators.EVALUATORS)}")
  return problems
