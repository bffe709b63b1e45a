"""Projectors against hand-written numpy, the freeze-align parameter count, and the registry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.config import schema as config_lib
from align_jax.model import ops, projectors

RNG = np.random.default_rng(0)


def _model_config(**kw):
  m = config_lib.default_config().model
  m.update(kw)
  return m


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def test_masked_mean_matches_numpy():
  tokens = RNG.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  expected = np.stack([tokens[i][mask[i]].mean(0) for i in range(3)])
  np.testing.assert_allclose(ops.masked_mean(tokens, mask), expected, rtol=1e-6)


def test_freeze_align_parameter_count_matches_recipe():
  """d = 1024 on 1024-wide encoders: ~11.5M trainable params in total (RECIPES §1)."""
  m = _model_config(embed_dim=1024)
  tokens = {"tokens": jnp.zeros((1, 5, 1024)), "mask": jnp.ones((1, 5), bool)}
  image = projectors.make_projector("freeze_align_image", m).init(jax.random.PRNGKey(0), tokens)
  text = projectors.make_projector("freeze_align_text", m).init(jax.random.PRNGKey(0), tokens)
  token_projector = 2 * 1024 + 3 * (1024 * 1024 + 1024)  # LN + linear + mlp_in + mlp_out
  assert _count(image) == 2 * token_projector
  assert _count(text) == token_projector + 2 * (1024 * 1024 + 1024) + 2 * 1024
  assert _count(image) + _count(text) == 11_553_792
  # The exact layout checkpoints and exports hold (names and shapes).
  token = {"norm/scale": (1024,), "norm/bias": (1024,), "linear/kernel": (1024, 1024),
           "linear/bias": (1024,), "mlp_in/kernel": (1024, 1024), "mlp_in/bias": (1024,),
           "mlp_out/kernel": (1024, 1024), "mlp_out/bias": (1024,)}
  head = {"proj/kernel": (1024, 1024), "proj/bias": (1024,), "mlp/kernel": (1024, 1024),
          "mlp/bias": (1024,), "norm/scale": (1024,), "norm/bias": (1024,)}

  def layout(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    return {"/".join(k.key for k in path): leaf.shape for path, leaf in flat}

  assert layout(image) == {f"{t}/{k}": v for t in ("cls", "patch") for k, v in token.items()}
  assert layout(text) == {**{f"token/{k}": v for k, v in token.items()},
                          **{f"head/{k}": v for k, v in head.items()}}


def test_freeze_align_image_is_cls_plus_mean_of_patches():
  m = _model_config(embed_dim=6, dropout=0.0)
  x = RNG.normal(size=(2, 4, 5)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  module = projectors.make_projector("freeze_align_image", m)
  params = module.init(jax.random.PRNGKey(1), {"tokens": x, "mask": mask})["params"]
  out = module.apply({"params": params}, {"tokens": x, "mask": mask})

  def token_proj(v, p):
    h = _layer_norm(v, p["norm"])
    return _dense(h, p["linear"]) + _dense(jax.nn.gelu(_dense(h, p["mlp_in"])), p["mlp_out"])

  params = jax.tree.map(np.asarray, params)
  patches = token_proj(x[:, 1:], params["patch"])
  expected = token_proj(x[:, 0], params["cls"]) + np.stack(
      [patches[i][mask[i, 1:]].mean(0) for i in range(2)])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_freeze_align_text_head_matches_numpy():
  m = _model_config(embed_dim=6, dropout=0.0)
  x = RNG.normal(size=(2, 3, 5)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  module = projectors.make_projector("freeze_align_text", m)
  params = module.init(jax.random.PRNGKey(2), {"tokens": x, "mask": mask})["params"]
  out = module.apply({"params": params}, {"tokens": x, "mask": mask})
  p = jax.tree.map(np.asarray, params)
  h = _layer_norm(x, p["token"]["norm"])
  tok = _dense(h, p["token"]["linear"]) + _dense(
      jax.nn.gelu(_dense(h, p["token"]["mlp_in"])), p["token"]["mlp_out"])
  pooled = np.stack([tok[i][mask[i]].mean(0) for i in range(2)])
  proj = _dense(pooled, p["head"]["proj"])
  expected = _layer_norm(proj + _dense(jax.nn.gelu(proj), p["head"]["mlp"]), p["head"]["norm"])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_glu_matches_numpy_and_width():
  m = _model_config(embed_dim=3, glu_hidden_mult=2)
  x = RNG.normal(size=(4, 5)).astype(np.float32)
  module = projectors.make_projector("glu", m)
  params = module.init(jax.random.PRNGKey(3), {"pooled": x})["params"]
  p = jax.tree.map(np.asarray, params)
  assert p["gate"]["kernel"].shape == (5, 10)
  h = _layer_norm(x, p["norm"])
  expected = _dense(np.clip(_dense(h, p["gate"]), 0, 6) * _dense(h, p["value"]), p["out"])
  np.testing.assert_allclose(module.apply({"params": params}, {"pooled": x}), expected,
                             rtol=1e-5, atol=1e-5)


def test_pooled_projectors_accept_tokens_via_masked_mean():
  m = _model_config(embed_dim=4)
  x = RNG.normal(size=(2, 3, 5)).astype(np.float32)
  mask = np.array([[1, 0, 0], [1, 1, 0]], bool)
  module = projectors.make_projector("linear", m)
  params = module.init(jax.random.PRNGKey(4), {"pooled": x[:, 0]})
  np.testing.assert_allclose(
      module.apply(params, {"tokens": x, "mask": mask}),
      module.apply(params, {"pooled": ops.masked_mean(x, mask)}), rtol=1e-6)


def test_unknown_projector_and_missing_tokens():
  with pytest.raises(ValueError, match="unknown projector 'resnet'; choose one of"):
    projectors.make_projector("resnet", _model_config())
  module = projectors.make_projector("freeze_align_text", _model_config(embed_dim=4))
  with pytest.raises(ValueError, match="needs token features"):
    module.init(jax.random.PRNGKey(0), {"pooled": jnp.zeros((1, 3))})


# --- the pooled token projector: same function as the per-token form, less work -----------------

def _ln_jnp(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _dense_jnp(x, p):
  return x @ p["kernel"] + p["bias"]


def _token_reference(p, x, keep, rate):
  """The per-token form written out, with an explicit dropout keep mask (None: no dropout)."""
  d = _ln_jnp(x, p["norm"])
  if keep is not None:
    d = jnp.where(keep, d / (1.0 - rate), 0.0)
  return _dense_jnp(d, p["linear"]) + _dense_jnp(jax.nn.gelu(_dense_jnp(d, p["mlp_in"])),
                                                 p["mlp_out"])


def _dropout_keep(intermediates, *path):
  """The keep mask a Dropout module applied, read from its captured output."""
  node = intermediates
  for name in path:
    node = node[name]
  return node["Dropout_0"]["__call__"][0] != 0


def _allclose_trees(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                       atol=atol), a, b)


TOKEN_MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_token_projector_pooled_equals_per_token_values_and_gradients(rate):
  """masked_mean(per-token outputs) == the pooled form, values and grads (params and inputs)."""
  module = projectors.TokenProjector(embed_dim=6, dropout=rate)
  x = jnp.asarray(RNG.normal(size=(4, 5, 7)).astype(np.float32))
  mask = jnp.asarray(TOKEN_MASK)  # a short row, a full row, one token, and no tokens at all
  params = module.init(jax.random.PRNGKey(5), x)["params"]
  pooled_init = module.init(jax.random.PRNGKey(5), x, mask)["params"]
  jax.tree.map(np.testing.assert_array_equal, params, pooled_init)  # same layout, same init
  rngs = {"dropout": jax.random.PRNGKey(6)}
  cotangent = jnp.asarray(RNG.normal(size=(4, 6)).astype(np.float32))

  def pooled(p, v):
    return module.apply({"params": p}, v, mask, train=True, rngs=rngs)

  def per_token(p, v):
    return ops.masked_mean(module.apply({"params": p}, v, train=True, rngs=rngs), mask)

  out = pooled(params, x)
  np.testing.assert_allclose(out, per_token(params, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[3], 0.0)  # no tokens -> zeros, as masked_mean
  grads = jax.grad(lambda p, v: (pooled(p, v) * cotangent).sum(), argnums=(0, 1))(params, x)
  expected = jax.grad(lambda p, v: (per_token(p, v) * cotangent).sum(), argnums=(0, 1))(params, x)
  _allclose_trees(grads, expected, rtol=1e-5, atol=1e-6)

  # Against the per-token form written out with the dropout mask the module applied.
  _, state = module.apply({"params": params}, x, mask, train=True, rngs=rngs,
                          capture_intermediates=True, mutable=["intermediates"])
  keep = _dropout_keep(state["intermediates"]) if rate else None
  if rate:
    assert 0.55 < float(keep.mean()) < 0.85  # a real mask (rate 0.3), not all ones

  def reference(p, v):
    return ops.masked_mean(_token_reference(p, v, keep, rate), mask)

  np.testing.assert_allclose(out, reference(params, x), rtol=1e-5, atol=1e-6)
  expected = jax.grad(lambda p, v: (reference(p, v) * cotangent).sum(), argnums=(0, 1))(params, x)
  _allclose_trees(grads, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_freeze_align_towers_equal_per_token_form_with_a_fixed_dropout_mask(rate):
  """Both towers against the paper's per-token form (own jnp code), values and param gradients."""
  m = _model_config(embed_dim=6, dropout=rate)
  x = jnp.asarray(RNG.normal(size=(4, 6, 5)).astype(np.float32))
  image_mask = jnp.asarray(np.array([[1] * 6, [1] * 6, [1, 1, 1, 1, 0, 0], [1] * 6], bool))
  # (no all-padding text row here: the head's LayerNorm of a constant vector has 1/sqrt(eps)-large
  # gradients, which only compares rounding; the token projector test covers that row)
  text_mask = jnp.asarray(np.array([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0],
                                    [1, 1, 0, 0, 0, 1]], bool))
  rngs = {"dropout": jax.random.PRNGKey(8)}
  cotangent = jnp.asarray(RNG.normal(size=(4, 6)).astype(np.float32))

  def image_reference(p, keep):
    cls = _token_reference(p["cls"], x[:, 0], keep["cls"], rate)
    patches = _token_reference(p["patch"], x[:, 1:], keep["patch"], rate)
    return cls + ops.masked_mean(patches, image_mask[:, 1:])

  def text_reference(p, keep):
    pooled = ops.masked_mean(_token_reference(p["token"], x, keep["token"], rate),
                                    text_mask)
    h = p["head"]
    proj = _dense_jnp(pooled, h["proj"])
    residual = _dense_jnp(jax.nn.gelu(proj), h["mlp"])
    if keep["head"] is not None:
      residual = jnp.where(keep["head"], residual / (1.0 - rate), 0.0)
    return _ln_jnp(proj + residual, h["norm"])

  for name, mask, reference, dropouts in (
      ("freeze_align_image", image_mask, image_reference, ("cls", "patch")),
      ("freeze_align_text", text_mask, text_reference, ("token", "head"))):
    module = projectors.make_projector(name, m)
    features = {"tokens": x, "mask": mask}
    params = module.init(jax.random.PRNGKey(7), features)["params"]

    def apply(p):
      return module.apply({"params": p}, features, train=True, rngs=rngs)

    _, state = module.apply({"params": params}, features, train=True, rngs=rngs,
                            capture_intermediates=True, mutable=["intermediates"])
    keep = {k: _dropout_keep(state["intermediates"], k) if rate else None for k in dropouts}
    np.testing.assert_allclose(apply(params), reference(params, keep), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: (apply(p) * cotangent).sum())(params)
    expected = jax.grad(lambda p: (reference(p, keep) * cotangent).sum())(params)
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    _allclose_trees(grads, expected, rtol=1e-4, atol=1e-5)


def _flops_per_unit(fn, params, cotangent, grad, unit):
  """XLA's FLOP count of fn (or of its parameter gradient) in units of one reference matmul."""
  if grad:
    f = lambda p, c: jax.grad(lambda q: (fn(q) * c).sum())(p)  # noqa: E731
  else:
    f = lambda p, c: fn(p) * c  # noqa: E731
  cost = jax.jit(f).lower(params, cotangent).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / unit


def test_pooled_token_projector_does_a_third_of_the_matmul_flops():
  """XLA's FLOP counts per token, in [T, W] x [W, W] matmuls, training with dropout 0.1:
  forward 1 instead of 3, forward + backward 3 instead of 7 (XLA already folds the mean's
  broadcast cotangent into two of the per-token form's nine; an eager framework does all nine).
  Without a dropout mask LN folds into the Dense layers too: 2 per token."""
  tokens, width = 32, 256
  x = jnp.zeros((4, tokens, width))
  mask = jnp.ones((4, tokens), bool)
  cotangent = jnp.ones((4, width))
  unit = 2 * 4 * tokens * width * width
  rngs = {"dropout": jax.random.PRNGKey(1)}
  counts = {}
  for rate in (0.1, 0.0):
    module = projectors.TokenProjector(embed_dim=width, dropout=rate)
    params = module.init(jax.random.PRNGKey(0), x)["params"]

    def per_token(p, module=module):
      return ops.masked_mean(module.apply({"params": p}, x, train=True, rngs=rngs), mask)

    def pooled(p, module=module):
      return module.apply({"params": p}, x, mask, train=True, rngs=rngs)

    for name, fn in (("per_token", per_token), ("pooled", pooled)):
      for grad in (False, True):
        counts[rate, name, grad] = _flops_per_unit(fn, params, cotangent, grad, unit)
  assert 2.9 < counts[0.1, "per_token", False] < 3.3
  assert 6.8 < counts[0.1, "per_token", True] < 7.4
  assert 1.0 < counts[0.1, "pooled", False] < 1.0 + 2 / tokens + 0.15
  assert 3.0 < counts[0.1, "pooled", True] < 3.0 + 6 / tokens + 0.2  # + elementwise, fusion-dependent
  assert 2.0 < counts[0.0, "pooled", True] < 2.0 + 6 / tokens + 0.1


class _ReferenceGLU(nn.Module):
  """SAIL's head written with flax.linen.LayerNorm and Dense (the unfolded form)."""
  embed_dim: int
  hidden_mult: int

  @nn.compact
  def __call__(self, features):
    x = nn.LayerNorm(name="norm")(features["pooled"])
    hidden = self.hidden_mult * x.shape[-1]
    a = nn.Dense(hidden, name="gate")(x)
    b = nn.Dense(hidden, name="value")(x)
    return nn.Dense(self.embed_dim, name="out")(nn.relu6(a) * b)


class _ReferenceMLP(nn.Module):
  embed_dim: int
  hidden_dim: int

  @nn.compact
  def __call__(self, features):
    x = nn.LayerNorm(name="norm")(features["pooled"])
    return nn.Dense(self.embed_dim, name="out")(nn.gelu(nn.Dense(self.hidden_dim,
                                                                 name="hidden")(x)))


@pytest.mark.parametrize("name", ["glu", "mlp"])
def test_layer_norm_folded_into_dense_is_the_same_function_with_fewer_flops(name):
  """Same init, values and gradients as LayerNorm -> Dense; the backward skips grad @ W.T."""
  width, embed = 256, 64
  m = _model_config(embed_dim=embed, glu_hidden_mult=2, hidden_dim=2 * width, dropout=0.0)
  module = projectors.make_projector(name, m)
  reference = (_ReferenceGLU(embed, 2) if name == "glu" else _ReferenceMLP(embed, 2 * width))
  features = {"pooled": jnp.asarray(RNG.normal(size=(64, width)).astype(np.float32))}
  params = module.init(jax.random.PRNGKey(0), features)["params"]
  jax.tree.map(np.testing.assert_array_equal, params,  # names, shapes and initial values
               reference.init(jax.random.PRNGKey(0), features)["params"])
  # trained-looking LN params, so that the fold is exercised
  params = {**params, "norm": {"scale": jnp.asarray(RNG.uniform(0.5, 1.5, width), jnp.float32),
                               "bias": jnp.asarray(RNG.normal(size=width), jnp.float32)}}
  cotangent = jnp.asarray(RNG.normal(size=(64, embed)).astype(np.float32))

  def folded(p):
    return module.apply({"params": p}, features)

  def unfolded(p):
    return reference.apply({"params": p}, features)

  np.testing.assert_allclose(folded(params), unfolded(params), rtol=1e-4, atol=1e-5)
  grads = jax.grad(lambda p: (folded(p) * cotangent).sum())(params)
  expected = jax.grad(lambda p: (unfolded(p) * cotangent).sum())(params)
  _allclose_trees(grads, expected, rtol=1e-4, atol=1e-4)
  # FLOPs in [B, D] x [D, H] matmuls (H = 2D): GLU 4 + 3/4 instead of 6 + 3/4 (the LN output's
  # gradient through gate and value is gone); MLP 2 + 3/4 instead of 3 + 3/4
  unit = 2 * 64 * width * 2 * width
  got = _flops_per_unit(folded, params, cotangent, True, unit)
  was = _flops_per_unit(unfolded, params, cotangent, True, unit)
  saved = 2.0 if name == "glu" else 1.0
  assert abs((was - got) - saved) < 0.15, (got, was)
