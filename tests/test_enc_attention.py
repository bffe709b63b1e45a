"""attention.attention against a numpy softmax reference: padding, causal, window, bias, GQA."""

import numpy as np
import jax.numpy as jnp
import pytest

from align_jax.encoders.attention import attention


def _reference(q, k, v, mask, causal, window, bias):
  b, t, n, h = q.shape
  groups = n // k.shape[2]
  k = np.repeat(k, groups, axis=2)
  v = np.repeat(v, groups, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  if bias is not None:
    logits = logits + bias
  allowed = np.ones((b, 1, t, k.shape[1]), bool)
  if mask is not None:
    allowed &= mask.astype(bool)[:, None, None, :]
  i = np.arange(t)[:, None]
  j = np.arange(k.shape[1])[None, :]
  if causal:
    allowed &= j <= i
  if window is not None:
    allowed &= j > i - window
  logits = np.where(allowed, logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("causal,window,use_bias,kv_heads", [
    (False, None, False, 4), (True, None, False, 4), (True, 3, False, 2), (False, None, True, 1),
    (True, None, True, 2)])
def test_attention_matches_numpy(causal, window, use_bias, kv_heads):
  rng = np.random.default_rng(0)
  b, t, n, h = 2, 7, 4, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, t, kv_heads, h)).astype(np.float32)
  v = rng.normal(size=(b, t, kv_heads, h)).astype(np.float32)
  mask = np.ones((b, t), np.int32)
  mask[1, 5:] = 0  # right padding in row 1
  bias = rng.normal(size=(1, n, t, t)).astype(np.float32) if use_bias else None
  out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask),
                  causal=causal, sliding_window=window,
                  bias=None if bias is None else jnp.asarray(bias))
  want = _reference(q, k, v, mask, causal, window, bias)
  np.testing.assert_allclose(np.asarray(out)[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out)[1, :5], want[1, :5], rtol=1e-5, atol=1e-5)


def test_attention_rejects_window_without_causal():
  x = jnp.zeros((1, 3, 2, 4))
  with pytest.raises(ValueError, match="sliding_window needs causal"):
    attention(x, x, x, sliding_window=2)
