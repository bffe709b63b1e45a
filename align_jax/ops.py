"""Array helpers shared by the frozen encoders and the trainable projectors.

The features convention (``{"pooled": [B, D]}`` or ``{"tokens": [B, T, D], "mask": bool [B, T]}``,
described in :mod:`align_jax.projectors`) needs one masked mean, used when an encoder pools its
tokens (:mod:`align_jax.encoders.pooling`) and when a projector pools token features: it lives
here, in a module that depends on neither side.
"""

from __future__ import annotations

import jax.numpy as jnp


def masked_mean(tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Mean over the tokens where ``mask`` is true: [B, T, D], [B, T] -> [B, D].

  As sentence-transformers' mean pooling; an all-padding row gives zeros.
  """
  weights = mask.astype(tokens.dtype)[..., None]
  return (tokens * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
