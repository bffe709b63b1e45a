"""Contrastive losses: numpy float64 references, 8 devices == 1 device, blockwise == gathered."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from align_jax.objectives import contrastive as losses
from train_utils import aligned_unit_pairs

SCALARS = {"softmax": (0.07,), "sigmoid": (10.0, -4.0)}
LOSS_FNS = {"softmax": losses.softmax_loss, "sigmoid": losses.sigmoid_loss}


def _np_lse(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _np_softmax(img, txt, temperature):
  """float64 loss and analytic gradients (img, txt, temperature)."""
  b = img.shape[0]
  logits = img @ txt.T / temperature
  diag = np.diag(logits)
  loss = 0.5 * (np.mean(_np_lse(logits, 1) - diag) + np.mean(_np_lse(logits, 0) - diag))
  p_row = np.exp(logits - _np_lse(logits, 1)[:, None])
  p_col = np.exp(logits - _np_lse(logits, 0)[None, :])
  g = (p_row + p_col - 2 * np.eye(b)) / (2 * b)  # d loss / d logits
  return loss, (g @ txt / temperature, g.T @ img / temperature, -np.sum(g * logits) / temperature)


def _np_sigmoid(img, txt, scale, bias):
  """float64 loss and analytic gradients (img, txt, scale, bias)."""
  b = img.shape[0]
  raw = img @ txt.T
  z = 2 * np.eye(b) - 1
  zl = z * (scale * raw + bias)
  loss = np.sum(np.logaddexp(0.0, -zl)) / b  # -log_sigmoid(x) = log(1 + e^-x)
  g = -z / (1 + np.exp(zl)) / b  # d loss / d logits
  return loss, (scale * g @ txt, scale * g.T @ img, np.sum(g * raw), np.sum(g))


NP_REFS = {"softmax": _np_softmax, "sigmoid": _np_sigmoid}


def _value_and_grads(fn, img, txt, scalars, **kw):
  argnums = tuple(range(2 + len(scalars)))
  f = jax.jit(jax.value_and_grad(lambda *a: fn(*a, **kw), argnums=argnums))
  value, grads = f(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                   *(jnp.float32(s) for s in scalars))
  return float(value), [np.asarray(g, np.float64) for g in grads]


def _assert_close(got, want, rtol=2e-5, atol=2e-6):
  (v1, g1), (v2, g2) = got, want
  np.testing.assert_allclose(v1, v2, rtol=rtol, atol=atol)
  for a, b in zip(g1, g2, strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * max(1.0, np.abs(b).max()))


def _mesh(shape=(8,), names=("data",)):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_numpy_reference_gradients_match_finite_differences(name):
  img, txt = aligned_unit_pairs(6, 4)
  scalars = SCALARS[name]
  args = [img, txt, *scalars]
  loss_of = lambda *a: NP_REFS[name](*a)[0]
  _, grads = NP_REFS[name](*args)
  eps = 1e-6
  for k, grad in enumerate(grads):
    for idx in ([(0, 0), (3, 2), (5, 1)] if k < 2 else [()]):
      plus = [np.array(a, np.float64) for a in args]
      minus = [np.array(a, np.float64) for a in args]
      plus[k][idx] += eps
      minus[k][idx] -= eps
      fd = (loss_of(*plus) - loss_of(*minus)) / (2 * eps)
      np.testing.assert_allclose(np.asarray(grad)[idx], fd, rtol=1e-6, atol=1e-8)


def test_softmax_exact_answer_for_orthonormal_pairs():
  # img = txt = identity rows: positives have logit 1/t, negatives 0.
  b, t = 8, 0.5
  eye = jnp.eye(b, dtype=jnp.float32)
  want = np.log(np.exp(1 / t) + b - 1) - 1 / t
  for impl in losses.IMPLS:
    np.testing.assert_allclose(losses.softmax_loss(eye, eye, t, impl=impl), want, rtol=1e-6)


@pytest.mark.parametrize("impl", losses.IMPLS)
@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_matches_numpy_float64(name, impl):
  img, txt = aligned_unit_pairs(24, 8)
  got = _value_and_grads(LOSS_FNS[name], img, txt, SCALARS[name], impl=impl, block_size=5)
  _assert_close(got, NP_REFS[name](img, txt, *SCALARS[name]))


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_blockwise_equals_gathered_for_several_block_sizes(name):
  img, txt = aligned_unit_pairs(30, 8, seed=1)
  fn, scalars = LOSS_FNS[name], SCALARS[name]
  want = _value_and_grads(fn, img, txt, scalars, impl="gathered")
  for block_size in (4, 7, 10, 30, 64):  # 4 and 7 do not divide 30; 64 exceeds the batch
    _assert_close(_value_and_grads(fn, img, txt, scalars, impl="blockwise",
                                   block_size=block_size), want)


@pytest.mark.parametrize("impl,block_size", [("gathered", None), ("blockwise", 4),
                                             ("blockwise", 6)])
@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_eight_devices_equal_one_device(devices, name, impl, block_size):
  del devices  # the fixture asserts there are 8
  img, txt = aligned_unit_pairs(48, 8, seed=2)  # 6 rows per device; block 4 leaves a padded remainder
  fn, scalars = LOSS_FNS[name], SCALARS[name]
  want = _value_and_grads(fn, img, txt, scalars, impl="gathered")
  mesh = _mesh()
  batch = NamedSharding(mesh, P("data"))
  img8 = jax.device_put(jnp.asarray(img, jnp.float32), batch)
  txt8 = jax.device_put(jnp.asarray(txt, jnp.float32), batch)
  sharded = losses.shard_loss(fn, mesh, ("data",), impl=impl, block_size=block_size)
  got = _value_and_grads(sharded, img8, txt8, scalars)
  _assert_close(got, want)
  # The whole-batch form on globally sharded arrays (axis_name=None) agrees as well.
  _assert_close(_value_and_grads(fn, img8, txt8, scalars, impl=impl, block_size=block_size), want)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_two_batch_axes_equal_one_device(name):
  img, txt = aligned_unit_pairs(40, 8, seed=3)
  fn, scalars = LOSS_FNS[name], SCALARS[name]
  want = _value_and_grads(fn, img, txt, scalars, impl="gathered")
  mesh = _mesh((2, 4), ("replica", "data"))
  for impl in losses.IMPLS:
    sharded = losses.shard_loss(fn, mesh, ("replica", "data"), impl=impl, block_size=3)
    _assert_close(_value_and_grads(sharded, img, txt, scalars), want)


@pytest.mark.parametrize("impl", losses.IMPLS)
def test_bfloat16_inputs_give_float32_logits(impl):
  img, txt = aligned_unit_pairs(16, 8, seed=4)
  img16, txt16 = jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16)
  for name, fn in LOSS_FNS.items():
    got = fn(img16, txt16, *SCALARS[name], impl=impl, block_size=5)
    assert got.dtype == jnp.float32
    want, _ = NP_REFS[name](np.asarray(img16, np.float64), np.asarray(txt16, np.float64),
                            *SCALARS[name])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    grads = jax.grad(lambda i, t, n=name, f=fn: f(i, t, *SCALARS[n], impl=impl))(img16, txt16)
    assert grads.dtype == jnp.bfloat16


def test_bad_input_raises_clear_errors():
  img, txt = jnp.ones((8, 4)), jnp.ones((8, 4))
  with pytest.raises(ValueError, match="gathered.*blockwise"):
    losses.softmax_loss(img, txt, 0.1, impl="chunked")
  with pytest.raises(ValueError, match="valid names"):
    losses.sigmoid_loss(img, txt, 10.0, -10.0, impl="ring")
  with pytest.raises(ValueError, match="same shape"):
    losses.softmax_loss(img, jnp.ones((6, 4)), 0.1)
  mesh = _mesh()
  with pytest.raises(ValueError, match="not axes of the mesh"):
    losses.shard_loss(losses.softmax_loss, mesh, ("batch",))
  with pytest.raises(ValueError, match="multiple of 8"):
    losses.shard_loss(losses.softmax_loss, mesh)(jnp.ones((12, 4)), jnp.ones((12, 4)), 0.1)
