"""The Protocols of align_jax.model.interfaces: every encoder kind and source satisfies them, as data."""

import ml_collections
import numpy as np
import pytest

from align_jax.encoders import factory as encoder_factory
from align_jax.model import interfaces, two_tower as model_lib
from align_jax.data import factory, array_sources as features, pipeline, transforms
from align_jax.testing import tiny_checkpoints as tiny

import helpers_data as hd
from train_utils import tiny_config


@pytest.fixture(scope="module")
def hf_encoders(tmp_path_factory):
  """A tiny Hugging Face image and text encoder (Flax checkpoints, no torch)."""
  from align_jax import encoders
  root = tmp_path_factory.mktemp("interfaces")
  image = encoders.ImageEncoder.from_pretrained(
      tiny.make_tiny_dinov2(str(root / "dinov2"), save_format="flax"))
  text = encoders.TextEncoder.from_pretrained(
      tiny.make_tiny_bert(str(root / "bert"), save_format="flax"), max_length=8)
  return image, text


def test_every_encoder_kind_is_a_frozen_encoder_with_its_input_kind(hf_encoders):
  config = tiny_config()
  kinds = {
      "image": (hf_encoders[0], interfaces.RAW),
      "text": (hf_encoders[1], interfaces.RAW),
      "random_mlp": (encoder_factory.build_encoder("random_mlp", config, "image"), interfaces.VECTORS),
      "features": (encoder_factory.build_encoder("features", config, "text"), interfaces.FEATURES),
  }
  for name, (encoder, kind) in kinds.items():
    assert isinstance(encoder, interfaces.FrozenEncoder), name
    assert encoder.input_kind == kind, name
    assert isinstance(encoder, interfaces.RawInputEncoder) == (kind == interfaces.RAW), name
    assert isinstance(encoder, interfaces.VectorInputEncoder) == (kind == interfaces.VECTORS), name
  mlp = kinds["random_mlp"][0]
  assert mlp.input_dim == config.data.image_input_dim
  assert not isinstance(object(), interfaces.FrozenEncoder)


def test_raw_input_check_reads_input_kind(hf_encoders):
  """The image-caption pipeline's guard accepts the HF encoders and names a non-raw tower."""
  config = tiny_config()
  data = ml_collections.ConfigDict({"source": "manifest"})
  image, text = hf_encoders
  factory.check_raw_encoders(model_lib.AlignModel(image, text, None, None, config.loss), data)
  features_encoder = encoder_factory.build_encoder("features", config, "text")
  with pytest.raises(ValueError, match="config.model.text_encoder must be a Hugging Face"):
    factory.check_raw_encoders(
        model_lib.AlignModel(image, features_encoder, None, None, config.loss), data)


def _assert_source_contract(source):
  assert isinstance(source, interfaces.PairSource)
  assert iter(source) is source
  state = source.get_state()
  first = next(source)
  assert set(first) >= {"image", "text"}
  source.set_state(state)
  again = next(source)
  for tower in ("image", "text"):
    assert set(again[tower]) == set(first[tower])
    for key in first[tower]:
      np.testing.assert_array_equal(again[tower][key], first[tower][key])
  assert isinstance(source.skipped(), dict)


def test_array_and_image_caption_sources_are_pair_sources(tmp_path):
  config = tiny_config()
  _assert_source_contract(features.make_array_source(
      config.data, split="train", global_batch_size=8, seed=0))
  names = hd.write_image_folder(str(tmp_path / "images"), 6)
  path = hd.write_manifest(str(tmp_path / "train.jsonl"),
                           [{"image": n, "caption": [hd.caption(i)]} for i, n in enumerate(names)])
  data = ml_collections.ConfigDict({"source": "manifest", "path": path,
                                    "image_root": str(tmp_path / "images"), "num_workers": 0})
  source = pipeline.make_pair_source(
      data, global_batch_size=4, seed=0, image_transform=transforms.make_image_transform(
          8, train=True), tokenize=hd.fake_tokenize, process_index=0, process_count=1)
  _assert_source_contract(source)
  source.close()


def test_an_iterator_without_state_is_not_a_pair_source():
  assert not isinstance(iter([{"image": {}, "text": {}}]), interfaces.PairSource)
