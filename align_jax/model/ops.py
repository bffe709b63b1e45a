"""Array helpers shared by the frozen encoders and the trainable projectors.

The features convention (``{"pooled": [B, D]}`` or ``{"tokens": [B, T, D], "mask": bool [B, T]}``,
described in :mod:`align_jax.model.projectors`) needs one masked mean, used when an encoder pools
its tokens (:mod:`align_jax.encoders.pooling`) and when a projector pools token features: it lives
here, in a module that depends on neither side.

:func:`matmul` is the projectors' ``x @ W`` with a gradient XLA:CPU computes fast (the
measurements: benchmarks/README.md, "Train step on stored features vs PyTorch").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Mean over the tokens where ``mask`` is true: [B, T, D], [B, T] -> [B, D].

  As sentence-transformers' mean pooling; an all-padding row gives zeros.
  """
  weights = mask.astype(tokens.dtype)[..., None]
  return (tokens * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


def pooled(features: dict, dtype=None) -> jnp.ndarray:
  """One vector per example of encoder features: ``pooled`` as is, or the masked mean of
  ``tokens`` (the features convention of :mod:`align_jax.model.projectors`); ``dtype``: cast
  first."""
  if "pooled" in features:
    x = features["pooled"]
    return x if dtype is None else x.astype(dtype)
  tokens = features["tokens"]
  return masked_mean(tokens if dtype is None else tokens.astype(dtype), features["mask"])


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """Unit-norm rows, computed in float32 (a zero row stays zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# XLA:CPU's matmul contracting the left operand's first axis (``x^T @ g``) is slower than the
# same product with ``x^T`` copied first once ``g`` has >= this many columns; below it the copy
# can cost more than it saves (benchmarks/README.md, "Train step on stored features vs PyTorch",
# the "x^T @ g" table of benchmarks/glu_projector_grad.py).
CPU_TRANSPOSE_COPY_MIN_COLUMNS = 2048


@jax.custom_vjp
def matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """``x @ kernel`` for ``x`` [..., K] and ``kernel`` [K, N]; the same value and gradient as ``@``.

  Only how the kernel's gradient ``x^T @ g`` is computed differs, and only on CPU with a wide
  kernel (N >= ``CPU_TRANSPOSE_COPY_MIN_COLUMNS``): ``x^T`` is materialised first (a copy of the
  activation, small next to the product), which makes SAIL's GLU kernel gradients
  (``[4096, 2048]^T @ [4096, 16384]``) faster in XLA:CPU (benchmarks/README.md, "Train step on
  stored features vs PyTorch"). Other platforms take autodiff's form.
  """
  return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
  return jnp.dot(x, kernel), (x, kernel)


def _kernel_grad_copied(x2d, g2d):
  return jnp.dot(jax.lax.optimization_barrier(x2d.T), g2d)  # the barrier keeps the copy


def _kernel_grad(x2d, g2d):
  return jnp.dot(x2d.T, g2d)


def _matmul_bwd(residuals, g):
  x, kernel = residuals
  x2d, g2d = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  if g2d.shape[-1] >= CPU_TRANSPOSE_COPY_MIN_COLUMNS:
    kernel_grad = jax.lax.platform_dependent(x2d, g2d, cpu=_kernel_grad_copied,
                                             default=_kernel_grad)
  else:
    kernel_grad = _kernel_grad(x2d, g2d)
  return jnp.dot(g, kernel.T).astype(x.dtype), kernel_grad.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """:func:`matmul` in ``jax.lax.dot_general``'s signature, for ``flax.linen.Dense(dot_general=)``.

  Dense contracts the input's last axis with the kernel's first; any other contraction is an
  error here rather than a silently different product.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dense = (tuple(lhs_contract), tuple(rhs_contract)) == ((lhs.ndim - 1,), (0,))
  if not dense or lhs_batch or rhs_batch:
    raise ValueError(f"dense_dot_general handles Dense's contraction only, got {dimension_numbers}")
  if precision is not None or preferred_element_type is not None:
    raise ValueError("dense_dot_general computes at the default precision in the operands' dtype")
  return matmul(lhs, rhs)
