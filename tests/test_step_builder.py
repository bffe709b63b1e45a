"""align_jax.train.step: abstract (AOT) and real (training) inputs are the same, batch spec."""

import jax
import numpy as np
import pytest

from align_jax.model import two_tower as model_lib
from align_jax.train import loop as train, optim, step as step_builder
from align_jax.parallel import mesh as sharding
from align_jax.data import factory as data_factory
from train_utils import tiny_config, tiny_online_config


def _parts(config, mesh, abstract_model=False):
  model = model_lib.build_model(config, mesh, abstract=abstract_model)
  tx = optim.make_optimizer(config)
  return model, tx, train.make_train_step(model, tx, config, mesh)


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype), x.sharding), tree)


@pytest.mark.parametrize("param_rules", [(), ((r"hidden/kernel", ("data", None)),)])
def test_abstract_inputs_equal_the_real_ones(devices, param_rules):
  config = tiny_config(**{"mesh.param_rules": param_rules})
  mesh = sharding.mesh_from_config(config.mesh)
  model, tx, step_fn = _parts(config, mesh)
  source = data_factory.make_train_source(config, model)
  real = step_builder.build(config, mesh, model, tx, step_fn, source=source)
  abstract_model, tx, step_fn = _parts(config, mesh, abstract_model=True)
  shapes = step_builder.build(config, mesh, abstract_model, tx, step_fn, abstract_only=True)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes.state))
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(real.state))
  assert jax.tree.structure(shapes.state) == jax.tree.structure(real.state)
  assert _shapes(shapes.state) == _shapes(real.state)
  assert _shapes(shapes.frozen) == _shapes(real.frozen)
  assert shapes.state_shardings == real.state_shardings
  assert _shapes(shapes.batch) == _shapes(real.batch)
  if param_rules:  # the rule reached the state: Adam's moments are split like their params
    kernels = [x for path, x in jax.tree_util.tree_flatten_with_path(real.state)[0]
               if jax.tree_util.keystr(path).endswith("['image']['hidden']['kernel']")]
    assert len(kernels) == 3  # the param, and Adam's mu and nu
    assert {x.sharding.spec for x in kernels} == {jax.sharding.PartitionSpec("data", None)}
  # The real step runs on the real inputs; the abstract one lowers to the same computation.
  batch = sharding.host_to_global(next(source), real.batch_sharding)
  assert _shapes(batch) == _shapes(real.batch)
  lowered_real = real.train_step.lower(real.state, real.frozen, batch).as_text()
  lowered_abstract = shapes.train_step.lower(shapes.state, shapes.frozen, shapes.batch).as_text()
  assert lowered_real == lowered_abstract
  state, metrics = real.train_step(real.state, real.frozen, batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics["train/loss"]))


def test_initial_state_equals_init_on_the_first_real_batch(devices):
  """The state is initialised from the batch's shapes; a real batch gives the same params."""
  config = tiny_config()
  mesh = sharding.mesh_from_config(config.mesh)
  model, tx, _ = _parts(config, mesh)
  source = data_factory.make_train_source(config, model)
  frozen, _ = step_builder.place_frozen(model, mesh, config)
  batch_sharding = sharding.batch_sharding(mesh, tuple(config.mesh.batch_axes))
  spec = step_builder.batch_spec(config, model, batch_sharding, source)
  state, _ = step_builder.init_state(model, tx, config, mesh, frozen, spec)
  first = sharding.host_to_global(next(source), batch_sharding)
  direct = jax.jit(step_builder.make_init(model, tx))(jax.random.PRNGKey(config.seed), frozen,
                                                      first)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state,
               direct)


def test_batch_spec_peeks_without_moving_the_source(devices):
  config = tiny_config()
  mesh = sharding.mesh_from_config(config.mesh)
  model, _, _ = _parts(config, mesh)
  source = data_factory.make_train_source(config, model)
  batch_sharding = sharding.batch_sharding(mesh, tuple(config.mesh.batch_axes))
  from_source = step_builder.batch_spec(config, model, batch_sharding, source)
  from_config = step_builder.batch_spec(config, model, batch_sharding)
  assert _shapes(from_source) == _shapes(from_config)
  first = next(source)
  assert _shapes(sharding.host_to_global(first, batch_sharding)) == _shapes(from_source)
  again = data_factory.make_train_source(config, model)
  jax.tree.map(np.testing.assert_array_equal, next(again), first)  # the peek was put back


def test_batch_spec_of_raw_images_matches_a_real_batch(devices, tmp_path):
  config = tiny_online_config(str(tmp_path))
  mesh = sharding.mesh_from_config(config.mesh)
  model, _, _ = _parts(config, mesh)
  source = data_factory.make_train_source(config, model)
  batch_sharding = sharding.batch_sharding(mesh, tuple(config.mesh.batch_axes))
  spec = step_builder.batch_spec(config, model, batch_sharding)
  real = sharding.host_to_global(next(source), batch_sharding)
  assert _shapes(spec) == _shapes(real)
  assert spec["image"]["pixel_values"].shape == (16, 16, 16, 3)
