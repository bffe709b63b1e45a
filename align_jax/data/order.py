"""The order every source reads its records in: a function of (seed, epoch, process) only.

Array sources (:class:`align_jax.data.array_sources.ArrayPairSource`) and image sources
(:class:`align_jax.data.pipeline.StreamPlan`) share it: one definition of which record each
stream position holds and which process reads it (array sources then sort each batch's rows,
which the losses do not see; image sources replace a bad record by the process's next one).

* Epochs: the global stream is the concatenation of epochs; global position ``q`` holds record
  ``permutation(seed, e)[q mod N]`` with ``e = q div N``, the permutation being numpy's
  ``default_rng([seed, e]).permutation(N)`` (or record order, without shuffling). Epoch ``e``
  therefore visits every record exactly once, and any position can be computed without replaying
  the stream: the state of a source is a position, and a resumed run is bit-exact.
* Blocks (array sources' ``data.shuffle_block_rows = R > 1``): the permutation is of the
  ``ceil(N / R)`` blocks of ``R`` consecutive records (records ``r * R .. r * R + R - 1``), each
  block's records kept together in record order; with ``R = 1`` it is the record permutation
  above, unchanged. Still a pure function of (seed, position) and still every record once per
  epoch, but the records of one block always share a batch (when ``R`` divides the batch):
  contiguous reads, a faster gather from memory (benchmarks/README.md, "Stored-feature loader
  speed").
* Processes: the global batch that starts at position ``s`` (``B = P * b`` rows) is cut into
  ``P`` contiguous slices of ``b``; process ``p`` takes the one from ``s + p * b``
  (:func:`process_start`). Within an epoch the processes' records are disjoint and together
  complete.
"""

from __future__ import annotations

import numpy as np


def process_start(global_start: int, local_batch: int, process_index: int) -> int:
  """Global position of process ``process_index``'s first row of the batch at ``global_start``."""
  return global_start + process_index * local_batch


class EpochOrder:
  """Global stream position -> record index (see the module docstring).

  Each epoch's permutation is computed once and kept (the last two epochs: a batch spans at most
  an epoch end); the cache is swapped whole, so loader threads may share one instance, and it is
  not pickled (each worker rebuilds it).
  """

  def __init__(self, num_records: int, seed: int, shuffle: bool = True, block: int = 1):
    if num_records <= 0:
      raise ValueError(f"an order needs at least one record, got {num_records}")
    if int(block) < 1:
      raise ValueError(f"a shuffle block holds at least one record, got {block}")
    self.num_records, self.seed, self.shuffle = int(num_records), seed, shuffle
    self.block = int(block)
    self._cache: tuple[tuple[int, np.ndarray], ...] = ()

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_cache"] = ()
    return state

  def epoch(self, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s record indices in visiting order (int32 below 2**31 records)."""
    cache = self._cache  # One read: other threads may swap it meanwhile.
    for cached_epoch, order in cache:
      if cached_epoch == epoch:
        return order
    index_dtype = np.int32 if self.num_records < 2**31 else np.int64
    if self.shuffle:  # blocks of `block` records; block = 1 is the plain record permutation
      blocks = np.random.default_rng([self.seed, epoch]).permutation(
          -(-self.num_records // self.block))
      order = blocks if self.block == 1 else (
          blocks[:, None] * self.block + np.arange(self.block)).reshape(-1)
      order = order[order < self.num_records] if self.num_records % self.block else order
    else:
      order = np.arange(self.num_records)
    order = order.astype(index_dtype, copy=False)
    self._cache = cache[-1:] + ((epoch, order),)
    return order

  def record(self, position: int) -> int:
    """The record at global position ``position``."""
    epoch, slot = divmod(position, self.num_records)
    if not self.shuffle:
      return slot
    return int(self.epoch(epoch)[slot])

  def records(self, start: int, count: int) -> np.ndarray:
    """The records at global positions ``start .. start + count - 1`` (int64)."""
    out = np.empty(count, np.int64)
    done = 0
    while done < count:
      epoch, offset = divmod(start + done, self.num_records)
      n = min(count - done, self.num_records - offset)
      out[done:done + n] = self.epoch(epoch)[offset:offset + n]
      done += n
    return out
