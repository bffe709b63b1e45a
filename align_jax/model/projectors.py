"""Trainable projectors: the only weights align_jax trains, chosen by name from the config.

Every projector maps encoder *features* to one embedding per example. Features follow one
convention everywhere in align_jax (encoders, stored features, data):

* ``{"pooled": [B, D]}`` — one vector per example (CLS, mean, CLS+mean-patch, ...);
* ``{"tokens": [B, T, D], "mask": bool [B, T]}`` — every token state (CLS first for images).

Projectors that need one vector accept tokens too (they take the masked mean). The freeze-align
projectors need tokens. Embeddings are returned un-normalised; the model L2-normalises them.

Every projector computes in ``dtype`` (``config.model.projector_dtype``: float32, or bfloat16 for
mixed precision) with float32 parameters; means over tokens are accumulated in float32.

Less work, same function: a token projector followed by a (masked) mean over tokens is
``mean_t(lin(d_t) + fc2(GELU(fc1(d_t))))``, and linear maps commute with means, so
:class:`TokenProjector` given a ``mask`` pools ``d_t`` and ``GELU(fc1(d_t))`` first and applies
``lin`` and ``fc2`` once per example. Only LayerNorm, dropout, ``fc1`` and GELU run per token:
a third of the per-token matmul FLOPs, forward and backward (tests/test_projectors.py proves the
equality with the per-token form, values and gradients, with and without dropout). The other
projectors already pool before their first non-linearity, or have no token axis.

Where a LayerNorm feeds Dense layers directly (GLU, MLP, and the token projector when no dropout
mask sits between them), LN's scale and shift are folded into the Dense layers:
``Dense(n * s + t) = n @ (s[:, None] * W) + (t @ W + b)`` with ``n`` the normalised input. The
input is a frozen feature, so the backward pass no longer multiplies by ``W.T`` to reach the
LN's output: for SAIL's GLU heads a quarter of the step's matmul FLOPs (same parameters, same
function; tests/test_projectors.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from align_jax.model.ops import dense_dot_general, masked_mean, matmul, pooled

Features = dict

# config.model.projector_dtype -> compute dtype (parameters stay float32)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# flax.linen.Dense (same parameters, same function) whose kernel gradient is ops.matmul's
_Dense = functools.partial(nn.Dense, dot_general=dense_dot_general)


def _tokens(features: Features, projector: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  if "tokens" not in features:
    raise ValueError(f"projector {projector!r} needs token features; set the encoder's pooling "
                     "to 'tokens' (stored features: save [N, T, D] with a mask)")
  return features["tokens"], features["mask"]


def _pool(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Masked mean over tokens accumulated in float32 (whatever the compute dtype)."""
  return masked_mean(x.astype(jnp.float32), mask)


class _LayerNormParams(nn.Module):
  """A LayerNorm's ``scale`` and ``bias`` (flax.linen.LayerNorm's names, shapes and init)."""

  @nn.compact
  def __call__(self, width: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    return (self.param("scale", nn.initializers.ones, (width,), jnp.float32),
            self.param("bias", nn.initializers.zeros, (width,), jnp.float32))


class _DenseParams(nn.Module):
  """A Dense layer's ``kernel`` [in, out] and ``bias`` (flax.linen.Dense's names, shapes, init)."""
  features: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    return (self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features),
                       jnp.float32),
            self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32))


def _normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """LayerNorm without scale and shift, in float32 (flax.linen.LayerNorm's statistics)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.maximum(0.0, (x * x).mean(-1, keepdims=True) - mean * mean)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _dense(x: jnp.ndarray, dense: tuple, dtype) -> jnp.ndarray:
  kernel, bias = dense
  return matmul(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


def _folded_dense(n: jnp.ndarray, norm: tuple, dense: tuple, dtype) -> jnp.ndarray:
  """``Dense(LayerNorm(x))`` from ``n = _normalize(x)``, LN's scale and shift folded into Dense.

  ``(n * s + t) @ W + b = n @ (s[:, None] * W) + (t @ W + b)``: the gradients of s, t and W all
  come from ``n.T @ grad`` and the kernel, so no ``grad @ W.T`` back to the LN output is needed
  (``n`` depends only on the frozen input).
  """
  (scale, shift), (kernel, bias) = norm, dense
  return _dense(n, (scale[:, None] * kernel, shift @ kernel + bias), dtype)


class LinearProjector(nn.Module):
  """A single linear map of the pooled features."""
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Features, *, train: bool = False) -> jnp.ndarray:
    return _Dense(self.embed_dim, dtype=self.dtype, name="dense")(pooled(features))


class MLPProjector(nn.Module):
  """LayerNorm -> Dense(hidden) -> GELU -> Dropout -> Dense(embed) on the pooled features."""
  embed_dim: int
  hidden_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Features, *, train: bool = False) -> jnp.ndarray:
    x = pooled(features)
    norm = _LayerNormParams(name="norm")(x.shape[-1])
    hidden = _DenseParams(self.hidden_dim, name="hidden")(x.shape[-1])
    x = nn.gelu(_folded_dense(_normalize(x), norm, hidden, self.dtype))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return _Dense(self.embed_dim, dtype=self.dtype, name="out")(x)


class TokenProjector(nn.Module):
  """freeze-align's per-token projector: d = Dropout(LN(x)); Linear(d) + [Linear -> GELU -> Linear](d).

  ``__call__(x)`` maps every token ([..., D] -> [..., embed_dim]). ``__call__(x, mask)`` returns
  the masked mean over tokens of those outputs ([B, T, D], [B, T] -> [B, embed_dim]; zeros for a
  row without tokens, as :func:`align_jax.model.ops.masked_mean`), computed as ``linear(mean d) +
  mlp_out(mean GELU(mlp_in(d)))``: the same function with two of the three matmuls once per example
  instead of once per token. Parameters and dropout masks are the same in both forms. Without an
  active dropout mask, LN's scale and shift fold into ``linear`` and ``mlp_in``
  (:func:`_folded_dense`).
  """
  embed_dim: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None, *,
               train: bool = False) -> jnp.ndarray:
    width = x.shape[-1]
    norm = _LayerNormParams(name="norm")(width)
    linear = _DenseParams(self.embed_dim, name="linear")(width)
    mlp_in = _DenseParams(self.embed_dim, name="mlp_in")(width)
    mlp_out = _Dense(self.embed_dim, dtype=self.dtype, name="mlp_out")
    n = _normalize(x)
    if train and self.dropout > 0:  # the mask sits between LN and the Dense layers
      scale, shift = norm
      v = nn.Dropout(self.dropout, deterministic=False)((n * scale + shift).astype(self.dtype))
      first = lambda u, dense: _dense(u, dense, self.dtype)  # noqa: E731
    else:  # d = LN(x): scale and shift fold into linear and mlp_in
      v = n
      first = lambda u, dense: _folded_dense(u, norm, dense, self.dtype)  # noqa: E731
    hidden = nn.gelu(first(v, mlp_in))
    if mask is None:
      return first(v, linear) + mlp_out(hidden)
    # mean_t(W d_t + b) = W mean_t(d_t) + b when the row has tokens (0 when it has none)
    out = first(_pool(v, mask), linear) + mlp_out(_pool(hidden, mask))
    return jnp.where(mask.any(axis=-1, keepdims=True), out, jnp.zeros((), out.dtype))


class GlobalHead(nn.Module):
  """freeze-align's text head: p = Linear(x); LN(p + Dropout(Linear(GELU(p))))."""
  embed_dim: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    p = _Dense(self.embed_dim, dtype=self.dtype, name="proj")(x)
    residual = _Dense(self.embed_dim, dtype=self.dtype, name="mlp")(nn.gelu(p))
    residual = nn.Dropout(self.dropout, deterministic=not train)(residual)
    return nn.LayerNorm(dtype=self.dtype, name="norm")(p + residual)


class FreezeAlignImageProjector(nn.Module):
  """Image tower of freeze-align: token_proj_cls(CLS) + mean over patches of token_proj_patch(patch).

  The two token projectors have separate weights; token 0 is CLS, the rest are patches (pooled
  form: only LN, dropout, fc1 and GELU run per patch).
  """
  embed_dim: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Features, *, train: bool = False) -> jnp.ndarray:
    tokens, mask = _tokens(features, "freeze_align_image")
    cls = TokenProjector(self.embed_dim, self.dropout, self.dtype, name="cls")(
        tokens[:, 0], train=train)
    patches = TokenProjector(self.embed_dim, self.dropout, self.dtype, name="patch")(
        tokens[:, 1:], mask[:, 1:], train=train)
    return cls + patches


class FreezeAlignTextProjector(nn.Module):
  """Text tower of freeze-align: token projector on every token -> masked mean -> global head."""
  embed_dim: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Features, *, train: bool = False) -> jnp.ndarray:
    tokens, mask = _tokens(features, "freeze_align_text")
    x = TokenProjector(self.embed_dim, self.dropout, self.dtype, name="token")(
        tokens, mask, train=train)
    return GlobalHead(self.embed_dim, self.dropout, self.dtype, name="head")(x, train=train)


class GLUProjector(nn.Module):
  """SAIL's head: LN -> a, b = Linear(x), Linear(x) (width mult * D_in) -> Linear(relu6(a) * b)."""
  embed_dim: int
  hidden_mult: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Features, *, train: bool = False) -> jnp.ndarray:
    x = pooled(features)
    width = x.shape[-1]
    hidden = self.hidden_mult * width
    norm = _LayerNormParams(name="norm")(width)
    n = _normalize(x)  # LN's scale and shift fold into gate and value (_folded_dense)
    a = _folded_dense(n, norm, _DenseParams(hidden, name="gate")(width), self.dtype)
    b = _folded_dense(n, norm, _DenseParams(hidden, name="value")(width), self.dtype)
    return _Dense(self.embed_dim, dtype=self.dtype, name="out")(nn.relu6(a) * b)


PROJECTORS: dict[str, Callable[[ml_collections.ConfigDict, Any], nn.Module]] = {
    "linear": lambda m, dtype: LinearProjector(m.embed_dim, dtype),
    "mlp": lambda m, dtype: MLPProjector(m.embed_dim, m.hidden_dim, m.dropout, dtype),
    "freeze_align_image": lambda m, dtype: FreezeAlignImageProjector(m.embed_dim, m.dropout, dtype),
    "freeze_align_text": lambda m, dtype: FreezeAlignTextProjector(m.embed_dim, m.dropout, dtype),
    "glu": lambda m, dtype: GLUProjector(m.embed_dim, m.glu_hidden_mult, dtype),
}


def projector_dtype(model_config: ml_collections.ConfigDict):
  """The compute dtype ``config.model.projector_dtype`` names."""
  name = model_config.projector_dtype
  if name not in DTYPES:
    raise ValueError(f"unknown projector dtype {name!r}: set --config.model.projector_dtype to "
                     f"one of {sorted(DTYPES)}")
  return DTYPES[name]


def make_projector(name: str, model_config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the projector registered under ``name`` from ``config.model``."""
  if name not in PROJECTORS:
    raise ValueError(f"unknown projector {name!r}; choose one of {sorted(PROJECTORS)} "
                     "(config.model.image_projector / config.model.text_projector)")
  return PROJECTORS[name](model_config, projector_dtype(model_config))
