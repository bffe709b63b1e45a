"""Makes transformers 4.57's Flax T5 run on current JAX (``jnp.clip`` lost ``a_max``).

``FlaxT5Attention._relative_position_bucket`` calls ``jnp.clip(x, a_max=...)``, which JAX 0.10
removed, so every FlaxT5 / FlaxMT5 forward raises ``TypeError``. 4.57 is the last transformers
release with Flax models, so the fix cannot come from upstream: :func:`patch_flax_t5` replaces
that one static method with the same computation written with ``jnp.minimum`` (the only change).
It is idempotent and applied when a T5 encoder is loaded; tests compare the patched model with
PyTorch's T5EncoderModel.
"""

from __future__ import annotations

import jax.numpy as jnp


def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32,
                             max_distance=128):
  """T5's relative-position bucketing (transformers' Flax code, ``jnp.minimum`` for ``clip``)."""
  relative_buckets = 0
  if bidirectional:
    num_buckets //= 2
    relative_buckets += (relative_position > 0) * num_buckets
    relative_position = jnp.abs(relative_position)
  else:
    relative_position = -jnp.minimum(relative_position, 0)
  # Half of the buckets are exact increments, the other half logarithmic up to max_distance.
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  if_large = max_exact + (jnp.log(relative_position / max_exact) / jnp.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
  if_large = jnp.minimum(if_large, num_buckets - 1)
  relative_buckets += jnp.where(is_small, relative_position, if_large)
  return relative_buckets.astype("i4")


def patch_flax_t5() -> None:
  """Installs :func:`relative_position_bucket` on transformers' FlaxT5Attention (once)."""
  from transformers.models.t5 import modeling_flax_t5
  attention = modeling_flax_t5.FlaxT5Attention
  # The one method to replace; pylint: disable=protected-access
  attention._relative_position_bucket = staticmethod(relative_position_bucket)
