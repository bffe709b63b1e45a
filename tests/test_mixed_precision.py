"""model.projector_dtype = bfloat16: bf16 matmuls, float32 params / optimiser state / loss; the demo
tracks float32 and learns."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.config import schema as config_lib
from align_jax.model import projectors
from align_jax.train import loop as train
from configs import demo
from train_utils import tiny_config

RNG = np.random.default_rng(0)


def _model_config(**kw):
  m = config_lib.default_config().model
  m.update(dict(embed_dim=16, hidden_dim=32, glu_hidden_mult=2, dropout=0.0), **kw)
  return m


def _features(name):
  if name.startswith("freeze_align"):
    lengths = np.array([3, 6, 1, 5])
    return {"tokens": RNG.normal(size=(4, 6, 12)).astype(np.float32),
            "mask": np.arange(6)[None] < lengths[:, None]}
  return {"pooled": RNG.normal(size=(4, 12)).astype(np.float32)}


def _dot_operand_dtypes(jaxpr):
  """dtypes of the operands of every dot_general over examples ([B, ...] x weights) in a jaxpr.

  Dots of parameters alone (the LayerNorm shift folded into a Dense bias: [D] x [D, H], once per
  step) stay float32 and are left out.
  """
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and eqn.invars[0].aval.ndim >= 2:
      found += [v.aval.dtype for v in eqn.invars]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if hasattr(sub, "jaxpr"):
          found += _dot_operand_dtypes(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
        elif hasattr(sub, "eqns"):
          found += _dot_operand_dtypes(sub)
  return found


@pytest.mark.parametrize("name", sorted(projectors.PROJECTORS))
def test_bfloat16_projectors_compute_in_bfloat16_with_float32_params(name):
  features = _features(name)
  module16 = projectors.make_projector(name, _model_config(projector_dtype="bfloat16"))
  module32 = projectors.make_projector(name, _model_config())
  params = module16.init(jax.random.PRNGKey(0), features)["params"]
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  jax.tree.map(np.testing.assert_array_equal, params,  # same init, same layout as float32
               module32.init(jax.random.PRNGKey(0), features)["params"])

  def apply16(p):
    return module16.apply({"params": p}, features)

  dots = _dot_operand_dtypes(jax.make_jaxpr(apply16)(params).jaxpr)
  assert dots and set(dots) == {jnp.dtype(jnp.bfloat16)}, dots
  out16, out32 = apply16(params), module32.apply({"params": params}, features)
  assert out16.dtype == jnp.bfloat16 and out32.dtype == jnp.float32
  scale = float(jnp.abs(out32).max())
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.03 * scale)
  grads = jax.grad(lambda p: apply16(p).astype(jnp.float32).sum())(params)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_unknown_projector_dtype_names_the_flag():
  with pytest.raises(ValueError, match="--config.model.projector_dtype to one of"):
    projectors.make_projector("mlp", _model_config(projector_dtype="float8"))


def test_bfloat16_step_keeps_float32_state_and_loss(devices):
  config = tiny_config(**{"model.projector_dtype": "bfloat16"})
  trainer = train.build_trainer(config)
  state = trainer.state
  for _ in range(2):
    state, metrics = trainer.train_step(state, trainer.frozen, trainer.next_batch())
  floats = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert floats == {jnp.dtype(jnp.float32)}
  assert metrics["train/loss"].dtype == jnp.float32
  assert np.isfinite(float(metrics["train/loss"]))


def _demo_run(workdir, dtype):
  config = demo.get_config("steps=50")
  config.model.projector_dtype = dtype
  config.log_every = 10
  config.eval_every = config.checkpoint_every = 50
  config.eval_at_start = False
  config.async_checkpointing = False
  last = train.train_and_evaluate(config, str(workdir))
  with open(workdir / "metrics.jsonl") as f:
    losses = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
  return losses, last


def test_bfloat16_demo_tracks_float32_and_learns(tmp_path, devices):
  """50 demo steps: bf16 losses within 0.5% of float32 at every logged step; recall >> chance."""
  losses32, last32 = _demo_run(tmp_path / "float32", "float32")
  losses16, last16 = _demo_run(tmp_path / "bfloat16", "bfloat16")
  assert sorted(losses16) == sorted(losses32) == [10, 20, 30, 40, 50]
  steps = sorted(losses32)
  np.testing.assert_allclose([losses16[s] for s in steps], [losses32[s] for s in steps],
                             rtol=5e-3)
  assert losses16[50] < 0.5 * losses16[10]  # it trains
  for key in ("eval/i2t@1", "eval/t2i@1"):  # chance: 0.001 among 1,000 held-out pairs
    assert last16[key] > 0.3, (key, last16[key])
    assert abs(last16[key] - last32[key]) < 0.05, (key, last16[key], last32[key])
