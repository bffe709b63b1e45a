"""The data keys' checks (:mod:`align_jax.config.checks`): the source, feature verification and
the rows per shuffle block and captions per image."""

from __future__ import annotations

import ml_collections

from align_jax.config import checks
from align_jax.data import factory, feature_store as feature_files

checks.register_choices(__name__, "data.source", factory.SOURCES, what="data source")
checks.register_choices(__name__, "data.verify_features", feature_files.VERIFY_MODES)


@checks.register
def check_data(config: ml_collections.ConfigDict, context: checks.Context) -> list[str]:
  del context  # the data keys do not depend on the mesh
  d, problems = config.data, []
  if d.shuffle_block_rows < 1:
    problems.append(f"data.shuffle_block_rows must be >= 1 (got {d.shuffle_block_rows})")
  if d.captions_per_image < 1 or d.num_captions < 1:
    problems.append(f"data.captions_per_image and data.num_captions must be >= 1 (got "
                    f"{d.captions_per_image}, {d.num_captions})")
  return problems
