"""Evaluators read the split they name, for every source; a missing split is an error.

The held-out sets here differ from the training sets in size and content, so an evaluator that
silently read the training data would report other numbers: each test checks the logged eval
numbers against an evaluation forced onto the held-out files, and that the training files give
different ones.
"""

import json
import os

import jax
import ml_collections
import pytest
from PIL import Image

from align_jax.train import extract as feature_store, loop as train
from align_jax.model import two_tower as model_lib
from align_jax.run import reader as run_dir
from align_jax.parallel import mesh as sharding
from align_jax.data import factory, reader_factory as readers, synthetic_images
from align_jax.evaluate import evaluators as evaluators_lib
from train_utils import tiny_config, tiny_online_config


@pytest.fixture(scope="module")
def online_config(tmp_path_factory):
  config = tiny_online_config(tmp_path_factory.mktemp("models"))
  config.total_steps, config.log_every, config.eval_every = 4, 2, 4
  config.evals.heldout = dict(type="retrieval", data=dict(split="heldout"), batch_size=64,
                              ks=(1, 5))
  return config


def _logged_evals(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {k: v for r in rows if "eval/i2t@1" in r for k, v in r.items() if k.startswith("eval/")}


def _evaluate(config, data, params):
  """The retrieval metrics of ``params`` on exactly ``data`` (an evaluator forced onto it)."""
  mesh = sharding.make_mesh(("data",), (8,))
  model = model_lib.build_model(config, mesh)
  evaluator = evaluators_lib.RetrievalEvaluator(
      "check", ml_collections.ConfigDict(dict(type="retrieval", data=data, batch_size=64,
                                              ks=(1, 5))), config, model, mesh)
  frozen = jax.device_put(model.frozen_params(), sharding.replicated(mesh))
  return evaluator, evaluator.run(params, frozen)


def _features_config(config, path):
  config = config.copy_and_resolve_references()
  config.data.source, config.data.path = "features", str(path)
  config.model.image_encoder = config.model.text_encoder = "features"
  return config


def test_train_from_features_evaluates_the_held_out_store(online_config, tmp_path):
  store = tmp_path / "feats"
  feature_store.extract_features(online_config, str(store), shard_batches=1, dtype="float32")
  held_out = json.loads((store / "heldout" / "manifest.json").read_text())
  assert held_out["split"] == "heldout" and held_out["num_images"] == 256
  assert json.loads((store / "manifest.json").read_text())["num_images"] == 40

  config = _features_config(online_config, store)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  logged = _logged_evals(workdir)
  params = run_dir.restore_params(workdir).params
  evaluator, on_heldout = _evaluate(config, {"path": str(store / "heldout")}, params)
  assert evaluator.source.num_pairs == 256
  assert logged == pytest.approx(on_heldout, abs=1e-6)
  _, on_train = _evaluate(config, {"path": str(store)}, params)
  assert on_train != pytest.approx(on_heldout, abs=1e-3)  # the training set scores otherwise


def test_missing_feature_split_is_an_error(online_config, tmp_path):
  store = tmp_path / "feats"
  feature_store.extract_features(online_config, str(store), shard_batches=1, dtype="float32",
                                 eval_splits=False)
  config = _features_config(online_config, store)
  mesh = sharding.make_mesh(("data",), (8,))
  with pytest.raises(FileNotFoundError, match=rf"no stored features at {store}/heldout "
                     r"\(data.source='features', split 'heldout'\)"):
    evaluators_lib.build_evaluators(config, model_lib.build_model(config, mesh), mesh)
  # An evaluator that names the training store as its own and asks for "heldout": refused too.
  config.evals.heldout.data = dict(path=str(store), split="heldout")
  with pytest.raises(ValueError, match="holds split 'train', not the 'heldout' asked for"):
    evaluators_lib.build_evaluators(config, model_lib.build_model(config, mesh), mesh)


def _write_manifest(folder, split, records):
  folder.mkdir(exist_ok=True)
  with open(folder / f"{split}.jsonl", "w") as f:
    for i, record in enumerate(records):
      name = f"{split}_{i}.png"
      Image.fromarray(record.image).save(folder / name)
      f.write(json.dumps({"image": name, "caption": record.captions}) + "\n")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
  folder = tmp_path_factory.mktemp("manifests")
  train_reader = synthetic_images.ShapesReader(split="train", num_records=32, image_size=16)
  heldout_reader = synthetic_images.ShapesReader(split="heldout", image_size=16)
  _write_manifest(folder, "train", [train_reader.read(i) for i in range(32)])
  _write_manifest(folder, "heldout", [heldout_reader.read(i) for i in range(0, 256, 8)][:24])
  return folder


def test_manifest_evaluator_reads_the_held_out_manifest(online_config, manifests, devices):
  config = online_config.copy_and_resolve_references()
  config.data.source, config.data.path = "manifest", str(manifests / "{split}.jsonl")
  mesh = sharding.make_mesh(("data",), (8,))
  model = model_lib.build_model(config, mesh)
  (evaluator,) = evaluators_lib.build_evaluators(config, model, mesh)
  assert evaluator.data.path == str(manifests / "heldout.jsonl")
  assert len(readers.make_reader(evaluator.data)) == 24  # the held-out images, not the 32 train
  assert len(factory.make_train_source(config, model).reader) == 32


@pytest.mark.slow
def test_train_from_manifest_evaluates_the_held_out_manifest(online_config, manifests, tmp_path):
  config = online_config.copy_and_resolve_references()
  config.data.source, config.data.path = "manifest", str(manifests / "{split}.jsonl")
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  logged = _logged_evals(workdir)
  params = run_dir.restore_params(workdir).params
  evaluator, on_heldout = _evaluate(config, {"path": str(manifests / "heldout.jsonl")}, params)
  assert evaluator.data.path == str(manifests / "heldout.jsonl")
  assert logged == pytest.approx(on_heldout, abs=1e-6)
  _, on_train = _evaluate(config, {"path": str(manifests / "train.jsonl")}, params)
  assert on_train != pytest.approx(on_heldout, abs=1e-3)


def test_split_of_a_split_less_manifest_is_an_error(online_config, manifests):
  config = online_config.copy_and_resolve_references()
  config.data.source, config.data.path = "manifest", str(manifests / "train.jsonl")
  with pytest.raises(ValueError) as error:
    factory.eval_data_config(config, {"split": "heldout"}, name="heldout")
  assert str(error.value) == (
      "config.evals.heldout asks for split 'heldout', but data.source='manifest' has no splits: "
      f"data.path '{manifests}/train.jsonl' is the training data. Set "
      "config.evals.heldout.data.path to the 'heldout' files, or write '{split}' in data.path "
      "(e.g. 'captions_{split}.jsonl')")
  own = factory.eval_data_config(config, {"path": str(manifests / "heldout.jsonl")})
  assert own.path == str(manifests / "heldout.jsonl")


def test_webdataset_and_tfds_splits():
  config = tiny_config(**{"data.source": "webdataset",
                          "data.urls": "/data/cc-{split}-{000..009}.tar"})
  data = factory.eval_data_config(config, {"split": "validation"})
  assert data.urls == "/data/cc-validation-{000..009}.tar"
  assert factory.resolve_split(config.data).urls == "/data/cc-train-{000..009}.tar"
  config.data.urls = "/data/cc-{000..009}.tar"
  with pytest.raises(ValueError, match="data.source='webdataset' has no splits: data.urls"):
    factory.eval_data_config(config, {"split": "validation"}, name="val")
  config = tiny_config(**{"data.source": "tfds", "data.name": "coco_captions"})
  assert factory.eval_data_config(config, {"split": "test"}).split == "test"  # TFDS's own split


def test_synthetic_split_that_does_not_exist_is_an_error(devices):
  config = tiny_config()
  config.evals.heldout.data = dict(split="validation")
  mesh = sharding.make_mesh(("data",), (8,))
  with pytest.raises(ValueError, match=r"unknown synthetic split 'validation'"):
    evaluators_lib.build_evaluators(config, model_lib.build_model(config, mesh), mesh)


def test_raw_data_evaluator_on_a_features_run_fails_before_training(devices):
  config = tiny_config()
  config.evals.coco = dict(type="retrieval",
                           data=dict(source="tfds", name="coco_captions", split="test"))
  mesh = sharding.make_mesh(("data",), (8,))
  with pytest.raises(ValueError, match=r"^config.evals.coco: data.source 'tfds' yields raw images "
                     r"and captions, so config.model.image_encoder must be a Hugging Face"):
    evaluators_lib.build_evaluators(config, model_lib.build_model(config, mesh), mesh)
