"""The run directory's config checks (:mod:`align_jax.config.checks`): checkpoint retention."""

from __future__ import annotations

import ml_collections

from align_jax.config import checks


@checks.register
def check_retention(config: ml_collections.ConfigDict, context: checks.Context) -> list[str]:
  del context  # retention does not depend on the mesh
  if config.keep_checkpoints is not None and config.keep_checkpoints < 1:
    return [f"keep_checkpoints must be >= 1 (got {config.keep_checkpoints}): retention always "
            "keeps the newest checkpoint; set --config.keep_checkpoints=N"]
  return []
