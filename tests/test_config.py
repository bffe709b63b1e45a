"""Config schema: locked keys, variant strings and value checks that name the fix; every
package's checks registered and run; unknown keys found by comparing the tree with the schema."""

import ast
import os

import pytest

from align_jax.config import checks, errors, schema as config_lib
from align_jax.data import factory, reader_factory as readers
from align_jax.objectives import kinds
from align_jax.run import reader as run_dir
from align_jax.train import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    validation.validate(config, num_batch_devices=8)
  text = str(error.value)
  assert "use a multiple of 8, e.g. --config.batch_size=96" in text
  assert "unknown loss 'hinge'" in text
  assert "log_every must be positive" in text
  assert "data.shuffle_block_rows must be >= 1 (got 0)" in text
  validation.validate(config_lib.default_config(), num_batch_devices=8)


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
    validation.validate(config, num_batch_devices=8)
  assert str(error.value) == (
      f"invalid config:\n  - optim.learning_rate must be > 0 (got {learning_rate}): set "
      "--config.optim.learning_rate, e.g. 1e-3 (the default)")
  config.optim.learning_rate = 1e-6
  validation.validate(config, num_batch_devices=8)


# One bad value per check module: a module that validation does not import (so never registers)
# fails its case.
BAD_VALUE_OF_EACH_MODULE = {
    "align_jax.data.config_checks": [
        ({"data.source": "bogus"}, "unknown data source 'bogus'"),
        ({"data.verify_features": "never"}, "unknown data.verify_features 'never'"),
        ({"data.shuffle_block_rows": 0}, "data.shuffle_block_rows must be >= 1 (got 0)")],
    "align_jax.objectives.config_checks": [
        ({"loss.name": "hinge"}, "unknown loss 'hinge'"),
        ({"loss.temperature_min": 0.0}, "need 0 < loss.temperature_min")],
    "align_jax.train.config_checks": [
        ({"extract.dtype": "int8"}, "unknown extract.dtype 'int8'"),
        ({"total_steps": 0}, "total_steps must be positive (got 0)")],
    "align_jax.parallel.config_checks": [
        ({"batch_size": 100}, "batch_size 100 is not divisible by the 8 devices"),
        ({"mesh.dcn_shape": (0,)}, "mesh.dcn_shape (0,) must be () or one positive size")],
    "align_jax.run.config_checks": [
        ({"keep_checkpoints": 0}, "keep_checkpoints must be >= 1 (got 0)")],
    "align_jax.evaluate.config_checks": [
        ({"evals.x": {"every": 1}}, "evaluator 'x' has no type"),
        ({"evals.x": {"type": "bleu"}}, "config.evals.x.type is 'bleu'; choose one of "
                                        "'retrieval', 'zero_shot'")],
}


def _with(**overrides):
  config = config_lib.default_config()
  for key, value in overrides.items():
    block, _, leaf = key.rpartition(".")
    (config[block] if block else config)[leaf] = value
  return config


@pytest.mark.parametrize("module, overrides, message", [
    (module, overrides, message) for module, cases in BAD_VALUE_OF_EACH_MODULE.items()
    for overrides, message in cases])
def test_each_check_module_refuses_its_bad_value(module, overrides, message):
  with pytest.raises(ValueError) as error:
    validation.validate(_with(**overrides), num_batch_devices=8)
  assert str(error.value).startswith("invalid config:\n  - ") and message in str(error.value)
  assert str(error.value).count("\n  - ") == 1  # only this problem


def test_validation_imports_every_module_that_registers_checks():
  """Every align_jax module that registers with config.checks is in validation.MODULES (and so
  loaded before validate runs), and each has a bad-value case above."""
  registering = set()
  for folder, _, files in os.walk(os.path.join(ROOT, "align_jax")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        for node in ast.walk(ast.parse(open(path).read())):
          if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "checks" and node.attr in ("register", "register_choices")):
            registering.add(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
  listed = {module.__name__ for module in validation.MODULES}
  assert registering == listed == set(BAD_VALUE_OF_EACH_MODULE)
  assert checks.registered_modules() == listed


def test_choice_lists_are_the_registries():
  """The data sources are the data factory's (array sources + readers.READERS), the losses the
  loss kinds'; the one-line error of check_choices names them in that order."""
  assert factory.SOURCES == ("synthetic", "features") + tuple(readers.READERS)
  assert set(readers.READERS) == {"tfds", "webdataset", "manifest", "parquet", "synthetic_shapes"}
  with pytest.raises(ValueError) as error:
    validation.check_choices(_with(**{"data.source": "bogus", "loss.name": "hinge"}))
  assert str(error.value) == (
      "unknown data source 'bogus': set --config.data.source to one of "
      + ", ".join(repr(s) for s in factory.SOURCES) + "; unknown loss 'hinge': set "
      "--config.loss.name to one of " + ", ".join(repr(n) for n in kinds.NAMES))
  validation.check_choices(config_lib.default_config())


def test_unknown_keys_of_a_config_built_unlocked():
  with config_lib.built_unlocked():
    config = config_lib.default_config()
    assert not config.is_locked
    config.optim.lr = 1.0
    config.data.sorce = "x"
    config.batchsize = 8
    config.evals.mine = dict(type="retrieval", anything=1)  # free-form
  assert config_lib.unknown_keys(config) == ["batchsize", "data.sorce", "optim.lr"]
  assert config_lib.unknown_keys(config_lib.default_config()) == []
  config_lib.lock(config)
  assert config.is_locked and config.optim.is_locked and not config.evals.is_locked
  assert config_lib.default_config().is_locked  # outside the block: locked again


def test_locate_key_reads_the_config_files_source(tmp_path):
  path = tmp_path / "c.py"
  path.write_text("\n".join([
      "def get_config():",                     # 1
      "  config = base()",                     # 2
      "  m = config.optim",                    # 3
      "  m.lr = 1.0",                          # 4
      "  config.optim.lr = 2.0",               # 5
      "  config['data']['sorce'] = 'x'",       # 6
      "  config.update(batchsize=8)",          # 7
      "  x = config.model.img_encoder",        # 8
      "  return config"]))
  file = str(path)
  assert errors.locate_key(file, "optim.lr") == (5, "optim.lr")  # the whole path first
  assert errors.locate_key(file, "data.sorce") == (6, "data.sorce")
  assert errors.locate_key(file, "batchsize") == (7, "batchsize")
  assert errors.locate_key(file, "model.nothing") is None
  assert errors.locate_key(str(tmp_path / "missing.py"), "optim.lr") is None
  assert errors.read_key_path(file, "img_encoder") == "model.img_encoder"
  # the first the file sets, then the others (found or not)
  assert errors.unknown_key_message(["batchsize", "model.zzz", "optim.lr"], file) == (
      f"unknown config key 'optim.lr' in {file}:5; did you mean 'optim.learning_rate'? "
      "(also unknown: 'batchsize', 'model.zzz')")
