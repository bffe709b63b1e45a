"""Sharded embedding of fixed-size global batches, shared by every evaluator.

Retrieval (:mod:`align_jax.evaluate.evaluators`) and zero-shot classification
(:mod:`align_jax.evaluate.zero_shot`) both embed an evaluation set with the jitted towers, the
batch sharded over the mesh, and bring the result back whole to every host; this module is that
one loop's pieces, so neither evaluator imports the other.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from align_jax.parallel import mesh as sharding


def host_gather(x) -> np.ndarray:
  """A (possibly multi-host) global array, whole, on every host (eval sets are small)."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Embedder:
  """Jitted, sharded image / text embedding of fixed-size global batches.

  ``batch_size`` is rounded up to a multiple of the mesh's batch shards; ``local`` is this
  process's rows of each global batch.
  """

  def __init__(self, model, config, mesh, batch_size: int):
    batch_axes = tuple(config.mesh.batch_axes)
    shards = sharding.num_batch_shards(mesh, batch_axes)
    self.batch_size = -(-batch_size // shards) * shards  # a multiple of the batch shards
    self.local = self.batch_size // jax.process_count()
    self.sharding = sharding.batch_sharding(mesh, batch_axes)
    self.images = jax.jit(model.embed_images)
    self.texts = jax.jit(model.embed_texts)

  def local_rows(self, global_batch: dict) -> dict:
    """This process's rows of a batch every process holds whole."""
    start = jax.process_index() * self.local
    return jax.tree.map(lambda x: x[start:start + self.local], global_batch)

  def to_device(self, local_batch: dict) -> dict:
    return sharding.host_to_global(local_batch, self.sharding)
