"""Config schema: locked keys, variant strings and value checks that name the fix."""

import pytest

from align_jax.config import schema as config_lib
from align_jax.run import reader as run_dir


def test_required_keys_and_locking():
  config = config_lib.default_config()
  for key in ("total_steps", "batch_size", "seed", "log_every", "eval_every", "checkpoint_every"):
    assert key in config
  with pytest.raises(AttributeError, match="batch_size"):
    config.batchsize = 3  # locked: a typo cannot add a silent new key


def test_parse_arg_types_and_unknown_names():
  variant = config_lib.parse_arg("steps=10,loss=sigmoid,fast", steps=1, loss="softmax", fast=False)
  assert (variant.steps, variant.loss, variant.fast) == (10, "sigmoid", True)
  assert config_lib.parse_arg(None, steps=1).steps == 1
  with pytest.raises(ValueError, match=r"unknown config variant 'step'.*\['steps'\]"):
    config_lib.parse_arg("step=3", steps=1)


def test_validate_names_each_problem():
  config = config_lib.default_config()
  config.batch_size = 100
  config.loss.name = "hinge"
  config.log_every = 0
  config.data.shuffle_block_rows = 0
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, num_batch_devices=8)
  text = str(error.value)
  assert "use a multiple of 8, e.g. --config.batch_size=96" in text
  assert "unknown loss 'hinge'" in text
  assert "log_every must be positive" in text
  assert "data.shuffle_block_rows must be >= 1 (got 0)" in text
  config_lib.validate(config_lib.default_config(), num_batch_devices=8)


def test_config_json_round_trip(tmp_path):
  config = config_lib.default_config()
  config.total_steps = 7
  config.mesh.param_rules = ((r"kernel", ("data", None)),)
  config.evals.heldout = dict(type="retrieval", data=dict(split="heldout"), ks=(1, 5))
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  loaded = run_dir.read_config(str(tmp_path))
  assert loaded.total_steps == 7 and loaded.mesh.axes == ("data",)
  assert loaded.mesh.param_rules == ((r"kernel", ("data", None)),)
  assert loaded.evals.heldout.data.split == "heldout"
  assert loaded.to_dict() == run_dir.read_config(str(tmp_path)).to_dict()


@pytest.mark.parametrize("learning_rate", [0.0, -1e-3, float("nan")])
def test_learning_rate_must_be_positive(learning_rate):
  config = config_lib.default_config()
  config.optim.learning_rate = learning_rate
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, num_batch_devices=8)
  assert str(error.value) == (
      f"invalid config:\n  - optim.learning_rate must be > 0 (got {learning_rate}): set "
      "--config.optim.learning_rate, e.g. 1e-3 (the default)")
  config.optim.learning_rate = 1e-6
  config_lib.validate(config, num_batch_devices=8)
