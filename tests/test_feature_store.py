"""Feature store: shards + manifest, resume after a crash, and the same loss as online training."""

import json

import jax
import numpy as np
import pytest

from align_jax.train import extract as feature_store
from align_jax.objectives import kinds as loss_kinds
from align_jax.model import two_tower as model_lib
from align_jax.parallel import mesh as sharding
from align_jax.data import array_sources as features, pipeline, factory
from train_utils import (extract_interrupted_after_one_shard, extract_small_shards,
                         tiny_config, tiny_online_config)


@pytest.fixture(scope="module")
def online_config(tmp_path_factory):
  return tiny_online_config(tmp_path_factory.mktemp("models"))


def test_manifest_counts_and_checksums(online_config, tmp_path, devices):
  manifest = extract_small_shards(online_config, tmp_path)
  assert (manifest["num_images"], manifest["num_texts"]) == (40, 80)  # 2 captions per image
  assert [s["num_images"] for s in manifest["shards"]] == [16, 16, 8]
  assert manifest["image_encoder"] == online_config.model.image_encoder
  on_disk = json.loads((tmp_path / "manifest.json").read_text())
  for shard in on_disk["shards"]:
    for name, entry in shard["files"].items():
      path = tmp_path / shard["name"] / name
      assert feature_store._sha256(str(path)) == entry["sha256"]
      assert entry["bytes"] == path.stat().st_size
      assert entry["shape"] == list(np.load(path).shape)
  image, text, text_to_image = features.load_stored_features(str(tmp_path))
  assert image["tokens"].shape[:2] == (40, 17) and text["tokens"].shape[:2] == (80, 12)
  np.testing.assert_array_equal(text_to_image, np.repeat(np.arange(40), 2))


def test_crash_and_resume_gives_the_same_store(online_config, tmp_path, monkeypatch, devices):
  extract_small_shards(online_config, tmp_path / "whole")
  extract_interrupted_after_one_shard(online_config, tmp_path / "resumed", monkeypatch)
  extract_small_shards(online_config, tmp_path / "resumed")
  whole = features.load_stored_features(str(tmp_path / "whole"))
  resumed = features.load_stored_features(str(tmp_path / "resumed"))
  for a, b in zip(jax.tree.leaves(whole[:2]), jax.tree.leaves(resumed[:2])):
    np.testing.assert_array_equal(a[np.arange(len(a))], b[np.arange(len(b))])
  np.testing.assert_array_equal(whole[2], resumed[2])


def test_stored_and_online_give_the_same_loss(online_config, tmp_path, devices):
  extract_small_shards(online_config, tmp_path)
  mesh = sharding.make_mesh(("data",), (8,))
  model = model_lib.build_model(online_config, mesh)
  frozen = model.frozen_params()
  source = pipeline.make_pair_source(
      online_config.data, global_batch_size=16, seed=0, train=False,
      image_transform=factory.make_image_transform(model, online_config.data, train=False),
      tokenize=model.text_encoder.preprocess, process_index=0, process_count=1)
  batch = next(iter(source))
  online = {"image": batch["image"], "text": batch["text"]}  # text: each image's first caption
  image, text, text_to_image = features.load_stored_features(str(tmp_path))
  rows = np.arange(16)
  first_caption = np.searchsorted(text_to_image, rows)
  stored = {"image": {k: v[rows] for k, v in image.items()},
            "text": {k: v[first_caption] for k, v in text.items()}}
  params = model.init(jax.random.PRNGKey(0), frozen, online)
  kind = loss_kinds.get(online_config.loss)
  loss_fn = kind.sharded_loss(mesh, ("data",))

  def loss(m, f, b):
    z_image, z_text = m.embed(params, f, b)
    return float(loss_fn(z_image, z_text, kind.loss_args(params["logit"])))

  stored_model = model_lib.build_model(tiny_config(**{
      "model.image_projector": "freeze_align_image", "model.text_projector": "freeze_align_text",
      "model.image_encoder": "features", "model.text_encoder": "features"}), mesh)
  online_loss = loss(model, frozen, online)
  stored_loss = loss(stored_model, {"image": {}, "text": {}}, stored)
  np.testing.assert_allclose(stored_loss, online_loss, rtol=1e-5)
