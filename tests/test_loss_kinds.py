"""Loss kinds: each name's logit params (init, clamp), loss arguments, sharded loss and
probabilities against numpy float64 references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.config import schema as config_lib
from align_jax.objectives import kinds as loss_kinds, multi_positive
from align_jax.parallel import mesh as sharding
from train_utils import aligned_unit_pairs


def _loss_config(**values):
  config = config_lib.default_config()
  config.loss.update(values)
  return config.loss


def _f32_log(x):
  return float(np.float32(math.log(x)))


def _np_softmax_loss(img, txt, temperature):
  """CLIP's loss in float64: mean of both directions' cross-entropies against the diagonal."""
  logits = img @ txt.T / temperature
  i2t = -np.log(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
  t2i = -np.log(np.exp(logits.T) / np.exp(logits.T).sum(axis=1, keepdims=True))
  return 0.5 * (np.mean(np.diag(i2t)) + np.mean(np.diag(t2i)))


def _np_sigmoid_loss(img, txt, scale, bias):
  """SigLIP's loss in float64: -sum log sigmoid(label * logit) / B, label +1 on the diagonal."""
  labels = 2 * np.eye(img.shape[0]) - 1
  logits = scale * img @ txt.T + bias
  return np.sum(np.log1p(np.exp(-labels * logits))) / img.shape[0]


def test_every_name_builds_its_kind():
  for name in loss_kinds.NAMES:
    kind = loss_kinds.get(_loss_config(name=name))
    assert kind.name == name and isinstance(kind, loss_kinds.LossKind)


def test_unknown_name_is_one_line_naming_the_flag():
  with pytest.raises(ValueError, match=r"unknown loss 'hinge': set --config.loss.name to one of "
                                       r"'softmax', 'sigmoid'"):
    loss_kinds.get(_loss_config(name="hinge"))


def test_softmax_init_and_clamp_at_both_bounds():
  kind = loss_kinds.get(_loss_config(name="softmax", temperature_init=0.05, temperature_min=0.01,
                                     temperature_max=0.2))
  params = kind.init_params()
  assert set(params) == {"log_temperature"}
  assert params["log_temperature"].dtype == jnp.float32 and params["log_temperature"].shape == ()
  assert float(params["log_temperature"]) == _f32_log(0.05)
  clamp = jax.jit(kind.clamp)
  below = clamp({"log_temperature": jnp.float32(math.log(0.001))})
  above = clamp({"log_temperature": jnp.float32(math.log(3.0))})
  inside = clamp({"log_temperature": jnp.float32(math.log(0.1))})
  assert float(below["log_temperature"]) == _f32_log(0.01)
  assert float(above["log_temperature"]) == _f32_log(0.2)
  assert float(inside["log_temperature"]) == _f32_log(0.1)
  # the bounds themselves are kept
  assert float(clamp({"log_temperature": jnp.float32(_f32_log(0.2))})["log_temperature"]) == (
      _f32_log(0.2))


def test_sigmoid_init_and_clamp_at_both_bounds():
  kind = loss_kinds.get(_loss_config(name="sigmoid", scale_init=20.0, bias_init=-7.5,
                                     scale_max=50.0))
  params = kind.init_params()
  assert set(params) == {"log_scale", "bias"}
  assert all(v.dtype == jnp.float32 and v.shape == () for v in params.values())
  assert float(params["log_scale"]) == _f32_log(20.0)
  assert float(params["bias"]) == -7.5
  clamp = jax.jit(kind.clamp)
  above = clamp({"log_scale": jnp.float32(math.log(80.0)), "bias": jnp.float32(30.0)})
  assert float(above["log_scale"]) == _f32_log(50.0)  # the upper bound: scale_max
  assert float(above["bias"]) == 30.0  # the bias is not bounded
  # no lower bound on the scale (SigLIP): a small scale and a very negative bias stay as they are
  below = clamp({"log_scale": jnp.float32(-20.0), "bias": jnp.float32(-1e6)})
  assert float(below["log_scale"]) == -20.0 and float(below["bias"]) == -1e6


@pytest.mark.parametrize("name,logit,want", [
    ("softmax", {"log_temperature": np.float32(math.log(0.07))}, {"temperature": 0.07}),
    ("sigmoid", {"log_scale": np.float32(math.log(12.0)), "bias": np.float32(-3.25)},
     {"scale": 12.0, "bias": -3.25}),
])
def test_loss_args(name, logit, want):
  kind = loss_kinds.get(_loss_config(name=name))
  assert tuple(kind.arg_names) == tuple(want)
  traced = jax.jit(kind.loss_args)({k: jnp.asarray(v) for k, v in logit.items()})
  host = kind.host_loss_args(logit)
  assert set(traced) == set(host) == set(want)
  for key, value in want.items():
    assert isinstance(host[key], float)
    assert host[key] == pytest.approx(value, rel=1e-6)
    assert float(traced[key]) == pytest.approx(value, rel=1e-6)
  other = "sigmoid" if name == "softmax" else "softmax"
  with pytest.raises(ValueError, match=f"loss {other!r} has .* config of the run"):
    loss_kinds.get(_loss_config(name=other)).loss_args(logit)


@pytest.mark.parametrize("impl", ["gathered", "blockwise"])
@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_sharded_loss_matches_numpy(devices, name, impl):
  kind = loss_kinds.get(_loss_config(name=name, impl=impl, block_size=8, temperature_init=0.1,
                                     scale_init=5.0, bias_init=-2.0))
  img, txt = aligned_unit_pairs(32, 6)
  mesh = sharding.make_mesh(("data",), (8,))
  args = kind.loss_args(kind.init_params())
  got = jax.jit(kind.sharded_loss(mesh, ("data",)))(jnp.float32(img), jnp.float32(txt), args)
  if name == "softmax":
    want = _np_softmax_loss(img, txt, 0.1)
  else:
    want = _np_sigmoid_loss(img, txt, 5.0, -2.0)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_multi_positive_loss_is_the_variant(name):
  kind = loss_kinds.get(_loss_config(name=name, temperature_init=0.2, scale_init=4.0,
                                     bias_init=-2.0))
  img, _ = aligned_unit_pairs(6, 5)
  _, txt = aligned_unit_pairs(12, 5, seed=1)
  args = kind.loss_args(kind.init_params())
  got = float(multi_positive.multi_positive_loss(kind, jnp.float32(img), jnp.float32(txt), args,
                                                  2))
  if name == "softmax":
    want = float(multi_positive.multi_positive_softmax_loss(jnp.float32(img), jnp.float32(txt),
                                                            0.2, 2))
  else:
    want = float(multi_positive.multi_positive_sigmoid_loss(jnp.float32(img), jnp.float32(txt), 4.0,
                                                      -2.0, 2))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # k = 1 is the plain loss
  img, txt = aligned_unit_pairs(8, 5, seed=2)
  one = float(multi_positive.multi_positive_loss(kind, jnp.float32(img), jnp.float32(txt), args,
                                                  1))
  ref = _np_softmax_loss(img, txt, 0.2) if name == "softmax" else _np_sigmoid_loss(img, txt, 4.0,
                                                                                  -2.0)
  np.testing.assert_allclose(one, ref, rtol=2e-5)


def test_softmax_probabilities_match_numpy():
  kind = loss_kinds.get(_loss_config(name="softmax"))
  image, _ = aligned_unit_pairs(5, 4, seed=3)
  classes, _ = aligned_unit_pairs(3, 4, seed=4)
  probs = kind.probabilities(image, classes, {"temperature": 0.25})
  logits = image @ classes.T / 0.25
  want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  assert probs.dtype == np.float32 and probs.shape == (5, 3)
  np.testing.assert_allclose(probs, want, rtol=1e-6)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
  # a small temperature: large logits stay finite (shifted by the row maximum)
  sharp = kind.probabilities(image, classes, {"temperature": 1e-3})
  assert np.all(np.isfinite(sharp))
  np.testing.assert_array_equal(np.argmax(sharp, axis=1), np.argmax(logits, axis=1))


def test_sigmoid_probabilities_match_numpy():
  kind = loss_kinds.get(_loss_config(name="sigmoid"))
  image, _ = aligned_unit_pairs(5, 4, seed=5)
  classes, _ = aligned_unit_pairs(3, 4, seed=6)
  probs = kind.probabilities(image, classes, {"scale": 7.0, "bias": -2.5})
  want = np.exp(-np.logaddexp(0.0, -(7.0 * image @ classes.T - 2.5)))  # sigmoid, another form
  assert probs.dtype == np.float32 and probs.shape == (5, 3)
  np.testing.assert_allclose(probs, want, rtol=1e-6)


@pytest.mark.parametrize("name,keys", [("softmax", {"log_temperature"}),
                                       ("sigmoid", {"log_scale", "bias"})])
def test_model_init_keeps_the_checkpoint_layout(name, keys):
  """``params["logit"]`` keeps the names existing checkpoints and exports hold."""
  from align_jax.model import two_tower as model_lib
  from train_utils import tiny_config
  config = tiny_config(**{"loss.name": name})
  model = model_lib.build_model(config)
  frozen = model.frozen_params()
  batch = {"image": {"values": np.zeros((2, config.data.image_input_dim), np.float32)},
           "text": {"values": np.zeros((2, config.data.text_input_dim), np.float32)}}
  params = model.init(jax.random.PRNGKey(0), frozen, batch)
  assert set(params) == {"image", "text", "logit"} and set(params["logit"]) == keys
  want = loss_kinds.get(config.loss).init_params()
  for key in keys:
    assert float(params["logit"][key]) == float(want[key])
