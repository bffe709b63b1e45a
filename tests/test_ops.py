"""ops.matmul: the projectors' ``x @ W``, with a CPU-fast kernel gradient, equals ``@`` exactly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.model import ops


def _value_and_grads(matmul, x, kernel, cotangent):
  def f(x, kernel):
    return jnp.sum(matmul(x, kernel).astype(jnp.float32) * cotangent)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, kernel)


@pytest.mark.parametrize("x_shape, columns", [
    ((64, 48), 32),  # narrow kernel: autodiff's form
    ((8, 6, 48), 32),  # token features [B, T, K]
    ((64, 48), ops.CPU_TRANSPOSE_COPY_MIN_COLUMNS),  # wide kernel: x^T copied first on CPU
    ((4, 16, 48), ops.CPU_TRANSPOSE_COPY_MIN_COLUMNS),
])
def test_matmul_value_and_gradients_equal_plain_matmul(x_shape, columns):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
  kernel = jnp.asarray(rng.standard_normal((x_shape[-1], columns), dtype=np.float32))
  cotangent = jnp.asarray(rng.standard_normal(x_shape[:-1] + (columns,), dtype=np.float32))
  value, (dx, dk) = _value_and_grads(ops.matmul, x, kernel, cotangent)
  ref_value, (ref_dx, ref_dk) = _value_and_grads(jnp.dot, x, kernel, cotangent)
  # numpy reference for the kernel gradient: sum over every leading axis of x^T g
  np_dk = np.asarray(x, np.float64).reshape(-1, x_shape[-1]).T @ np.asarray(
      cotangent, np.float64).reshape(-1, columns)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dk, np_dk, rtol=1e-4, atol=1e-3)
  assert dx.shape == x.shape and dk.shape == kernel.shape


def test_wide_kernel_gradient_copies_the_transpose_on_cpu_only():
  x = jnp.ones((16, 8))
  kernel = jnp.ones((8, ops.CPU_TRANSPOSE_COPY_MIN_COLUMNS))
  grad = jax.grad(lambda k: ops.matmul(x, k).sum())
  assert "optimization_barrier" in jax.jit(grad).lower(kernel).as_text()
  assert "optimization_barrier" not in jax.jit(grad).lower(kernel[:, :32]).as_text()  # narrow
  # the same function lowered for a GPU keeps autodiff's form (no copy)
  gpu_text = jax.jit(grad).trace(kernel).lower(lowering_platforms=("cuda",)).as_text()
  assert "optimization_barrier" not in gpu_text


def test_bfloat16_gradients_keep_the_operand_dtypes():
  x = jnp.ones((4, 8), jnp.bfloat16)
  kernel = jnp.ones((8, ops.CPU_TRANSPOSE_COPY_MIN_COLUMNS), jnp.bfloat16)
  dx, dk = jax.grad(lambda x, k: ops.matmul(x, k).astype(jnp.float32).sum(), argnums=(0, 1))(
      x, kernel)
  assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(dk, np.float32), 4.0)
  np.testing.assert_array_equal(np.asarray(dx, np.float32), float(kernel.shape[1]))


def test_dense_dot_general_in_flax_dense_equals_the_default_dense():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3, 12), dtype=np.float32))
  plain = nn.Dense(7)
  ours = nn.Dense(7, dot_general=ops.dense_dot_general)
  params = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(0), x))

  def value_and_grad(module):
    return jax.value_and_grad(lambda p: (module.apply(p, x) ** 2).sum())(params)
  (v_plain, g_plain), (v_ours, g_ours) = value_and_grad(plain), value_and_grad(ours)
  np.testing.assert_allclose(v_ours, v_plain, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_ours, g_plain)


def test_dense_dot_general_rejects_other_contractions():
  a, b = jnp.ones((3, 4)), jnp.ones((3, 5))
  with pytest.raises(ValueError, match="Dense's contraction only"):
    ops.dense_dot_general(a, b, (((0,), (0,)), ((), ())))
  with pytest.raises(ValueError, match="default precision"):
    ops.dense_dot_general(a, b.T, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
