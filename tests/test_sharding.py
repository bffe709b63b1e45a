"""Mesh construction, the parameter rule table, and device-local encoder micro-batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from align_jax.parallel import mesh as sharding
from align_jax.train import loop as train
from train_utils import tiny_config


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes(devices):
  mesh = sharding.make_mesh(("data", "model"), (-1, 2))
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  with pytest.raises(ValueError, match="needs 3 devices, but 8 are present"):
    sharding.make_mesh(("data",), (3,))
  with pytest.raises(ValueError, match="differ in length"):
    sharding.make_mesh(("data", "model"), (8,))
  with pytest.raises(ValueError, match="does not have"):
    sharding.num_batch_shards(mesh, ("fsdp",))


def test_param_rules_first_match_wins_and_check_divisibility(devices):
  mesh = sharding.make_mesh(("data",), (8,))
  tree = {"encoder": {"kernel": np.zeros((16, 4)), "bias": np.zeros(4)},
          "head": {"kernel": np.zeros((4, 3))}}
  rules = [(r"encoder/kernel", ("data", None)), (r"kernel", (None, None))]
  out = sharding.param_shardings(tree, mesh, rules)
  assert out["encoder"]["kernel"].spec == P("data", None)
  assert out["encoder"]["bias"].spec == P()
  assert out["head"]["kernel"].spec == P(None, None)
  with pytest.raises(ValueError, match="head/kernel dimension 3 is not divisible"):
    sharding.param_shardings(tree, mesh, [(r"head", (None, "data"))])


def test_micro_batches_equal_one_call_and_stay_on_device(devices):
  mesh = sharding.make_mesh(("data",), (8,))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32))
  w = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32))
  fn = lambda inp: {"pooled": jnp.tanh(inp["v"] @ w), "tokens": inp["v"][:, None] * 2}
  xs = jax.device_put(x, sharding.batch_sharding(mesh, ("data",)))
  run = jax.jit(lambda i: sharding.map_micro_batches(fn, i, micro_batch=2, mesh=mesh,
                                                     batch_axes=("data",)))
  out = run({"v": xs})
  expected = fn({"v": x})
  np.testing.assert_allclose(out["pooled"], expected["pooled"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["tokens"], expected["tokens"], rtol=1e-6)
  hlo = run.lower({"v": xs}).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo  # each device keeps its rows
  with pytest.raises(ValueError, match="not divisible by micro-batch 3"):
    sharding.map_micro_batches(fn, {"v": x}, micro_batch=3, mesh=mesh, batch_axes=("data",))


def test_micro_batched_train_step_equals_whole_batch(devices):
  mesh = sharding.make_mesh(("data",), (8,))
  results = []
  for micro_batch in (0, 2):
    config = tiny_config(**{"model.encoder_micro_batch": micro_batch, "model.dropout": 0.0})
    trainer = train.build_trainer(config, mesh)
    state, metrics = trainer.train_step(trainer.state, trainer.frozen, trainer.next_batch())
    state, metrics = trainer.train_step(state, trainer.frozen, trainer.next_batch())
    results.append(float(metrics["train/loss"]))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_micro_batched_projectors_equal_whole_batch(devices):
  """Rematerialised projector chunks: same loss and same updated params as one call."""
  mesh = sharding.make_mesh(("data",), (8,))
  runs = []
  for micro_batch in (0, 2):
    config = tiny_config(**{"model.projector_micro_batch": micro_batch, "model.dropout": 0.0,
                            "model.image_projector": "mlp", "model.text_projector": "glu"})
    trainer = train.build_trainer(config, mesh)
    state, metrics = trainer.train_step(trainer.state, trainer.frozen, trainer.next_batch())
    state, metrics = trainer.train_step(state, trainer.frozen, trainer.next_batch())
    runs.append((float(metrics["train/loss"]), jax.tree.map(np.asarray, state.params)))
  np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), runs[0][1], runs[1][1])
