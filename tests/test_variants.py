"""align_jax.variants against plain numpy implementations of the papers' equations.

Values and gradients (float64 numpy references; gradients by central finite differences of the
numpy reference), 8 sharded devices against one, the config errors, and the CPU demo learning
with each variant switched on.
"""

import sys
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import config as config_lib
from align_jax import losses, sharding, train, variants
from align_jax.data import features as features_data
from train_utils import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import demo  # noqa: E402  (configs/demo.py)


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numeric_grad(f, x, eps=1e-6):
  """Central finite differences of a float64 numpy function at x."""
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[idx] = eps
    g[idx] = (f(x + e) - f(x - e)) / (2 * eps)
  return g


def _log_softmax(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- FuseMix


def test_fusemix_matches_numpy_per_device_with_shared_lambda_and_perm(devices):
  mesh = sharding.make_mesh(("data",), (8,))
  config = tiny_config(**{"model.fusemix_alpha": 0.4, "data.captions_per_image": 2})
  rng = np.random.default_rng(0)
  image = {"pooled": rng.normal(size=(32, 5)).astype(np.float32)}
  text = {"pooled": rng.normal(size=(64, 3)).astype(np.float32)}  # 2 captions per image
  put = lambda t: sharding.host_to_global(t, sharding.batch_sharding(mesh, ("data",)))
  state_rng, step = jax.random.PRNGKey(7), jnp.asarray(3)
  mixer = jax.jit(variants.make_feature_mixer(config, mesh))
  got_image, got_text = mixer(state_rng, step, put(image), put(text))

  key = jax.random.fold_in(jax.random.fold_in(state_rng, 3), 0x46D)
  want_image, want_text = np.zeros((32, 5)), np.zeros((64, 3))
  lams, draws = [], jax.jit(lambda k: variants.fusemix_draws(k, 0.4, 4))
  for d in range(8):  # each device: its 4 images (8 captions), its own λ and permutation
    lam, perm = draws(jax.random.fold_in(key, d))
    lam, perm = float(lam), np.asarray(perm)
    lams.append(lam)
    assert sorted(perm) == [0, 1, 2, 3]
    x = image["pooled"][4 * d:4 * d + 4].astype(np.float64)
    want_image[4 * d:4 * d + 4] = lam * x + (1 - lam) * x[perm]
    y = text["pooled"][8 * d:8 * d + 8].reshape(4, 2, 3).astype(np.float64)
    want_text[8 * d:8 * d + 8] = (lam * y + (1 - lam) * y[perm]).reshape(8, 3)
  np.testing.assert_allclose(np.asarray(got_image["pooled"]), want_image, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_text["pooled"]), want_text, rtol=1e-5, atol=1e-6)
  assert len(set(lams)) == 8 and all(0 < lam < 1 for lam in lams)
  # Another step mixes differently.
  other, _ = mixer(state_rng, jnp.asarray(4), put(image), put(text))
  assert not np.allclose(np.asarray(other["pooled"]), want_image)


def test_fusemix_gradient_and_beta_distribution():
  x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
  w = np.random.default_rng(2).normal(size=(6, 4))
  lam, perm = 0.3, np.array([2, 0, 1, 5, 3, 4])
  grad = jax.grad(lambda x: jnp.sum(w * variants.mix_rows({"pooled": x}, lam, perm)["pooled"]))(x)
  f = lambda x: np.sum(w * (lam * x + (1 - lam) * x[perm]))
  np.testing.assert_allclose(np.asarray(grad), _numeric_grad(f, x.astype(np.float64)), atol=1e-5)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  lams = np.asarray(jax.jit(jax.vmap(lambda k: variants.fusemix_draws(k, 0.4, 3)[0]))(keys))
  # Beta(α, α): mean 1/2, variance 1 / (4 (2α + 1)) = 0.1389 at α = 0.4.
  assert abs(lams.mean() - 0.5) < 0.02
  assert abs(lams.var() - 1 / (4 * 1.8)) < 0.012
  with pytest.raises(ValueError, match="fusemix_alpha needs pooled"):
    variants.mix_rows({"tokens": x[None], "mask": np.ones((1, 6), bool)}, lam, perm)


# --------------------------------------------------------------------------- demo runs


def _demo_recall(steps=100, **overrides):
  """The CPU demo (configs/demo.py) on one device for ``steps``; held-out recall@1 of both ways."""
  config = demo.get_config(f"steps={steps}")
  config.eval_at_start = False
  config.async_checkpointing = False
  config.eval_every = config.checkpoint_every = steps
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  with tempfile.TemporaryDirectory() as workdir:
    last = train.train_and_evaluate(
        config, workdir, mesh=sharding.make_mesh(("data",), (1,), jax.devices()[:1]))
  return last["eval/i2t@1"], last["eval/t2i@1"], last


@pytest.mark.slow
def test_demo_learns_with_fusemix(devices):
  i2t, t2i, _ = _demo_recall(**{"model.fusemix_alpha": 1.0})
  assert i2t > 0.5 and t2i > 0.5, (i2t, t2i)  # chance: 0.001
