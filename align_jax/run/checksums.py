"""Checksums of pytrees of (sharded) arrays, computed on device: for checkpoints and feature stores.

``tree_checksums(tree)`` gives one uint32 per array, ``sum_i word_i * (2i + 1) mod 2**32`` over the
array's bits as 32-bit words: exact integer arithmetic, so the value is the same for any sharding,
device count or process count, and any single changed word changes it (odd weights are invertible
mod 2**32). It runs as one jitted reduction on the devices that hold the arrays, so checking a
multi-gigabyte encoder or train state costs one pass over device memory, not a host copy.
``tree_digest(tree)`` folds those, with every path, shape and dtype, into one sha256 hex string.

These are integrity checks (damaged or mixed-up files), not cryptographic signatures.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as a flat uint32 vector."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    unsigned = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))  # 8-byte types: two words each


def _checksum(x: jax.Array) -> jax.Array:
  words = _words(x)
  weights = jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.sum(words * weights, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda leaves: [_checksum(x) for x in leaves])


def tree_checksums(tree: Any) -> dict[str, int]:
  """``{path: checksum}`` of every array in ``tree`` (global jax arrays of any sharding, or numpy).

  One jitted computation per set of devices the arrays live on (normally one: the mesh).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(leaves):
    groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
  sums: dict[int, jax.Array] = {}
  for indices in groups.values():
    sums.update(zip(indices, _checksums_jit([leaves[i] for i in indices])))
  return {jax.tree_util.keystr(flat[i][0]): int(np.asarray(sums[i].addressable_data(0)))
          for i in range(len(flat))}


def tree_digest(tree: Any) -> str:
  """One sha256 hex digest of every array's path, shape, dtype and checksum."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = tree_checksums(tree)
  entries = []
  for path, x in flat:
    key = jax.tree_util.keystr(path)
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    entries.append([key, list(np.shape(x)), str(dtype), sums[key]])
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
