"""Relative-position buckets of T5 and MPNet (host-side numpy, for a static text length).

Both place the key-minus-query distance ``j - i`` in ``num_buckets`` buckets: exact for small
distances, logarithmic up to ``max_distance``, one last bucket beyond; bidirectional tables give
keys after the query their own half of the buckets. The float32 logarithm is the one PyTorch
computes, so the buckets (and the learned bias rows they pick) are the same.
"""

from __future__ import annotations

import math

import numpy as np


def relative_position_buckets(query_length: int, key_length: int, bidirectional: bool = True,
                              num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """Bucket index [query_length, key_length] (int32) of each key's offset from each query."""
  relative = (np.arange(key_length, dtype=np.int64)[None, :]
              - np.arange(query_length, dtype=np.int64)[:, None])
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative)
  else:
    distance = -np.minimum(relative, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
  large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  buckets += np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)
