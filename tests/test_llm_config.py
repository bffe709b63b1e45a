"""configs/dinov2_llm.py with tiny random checkpoints: a decoder-LLM text tower, FSDP-sharded.

The config's rules (``LLM_FROZEN_RULES``, ``SAIL_GLU_PARAM_RULES``) are applied as written; the tiny
Llama's width (32) divides the 8 simulated devices, as Mistral-7B's 4,096 divides a pod's.
"""

import os

import jax
import numpy as np
import pytest

from align_jax.train import aot, extract as feature_store
from align_jax.parallel import mesh as sharding
from align_jax.data import array_sources as features, reader_factory as readers, synthetic_images
from align_jax.data import records as records_lib
from align_jax.encoders import TextEncoder
from align_jax.testing import tiny_checkpoints as tiny
from configs import dinov2_llm
from train_utils import run_train_steps


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("llm_config")
  corpus = [" ".join(synthetic_images.vocabulary())] * 4
  return (tiny.make_tiny_dinov2(str(root / "dinov2"), image_size=16, patch_size=4,
                                save_format="flax"),
          tiny.make_tiny_llama(str(root / "llama"), save_format="flax", corpus=corpus))


@pytest.mark.parametrize("family", ["gemma", "mistral", "t5"])
def test_rules_shard_every_matrix_of_each_family(tmp_path, family, devices):
  """LLM_FROZEN_RULES name every text-tower matrix of Llama / Mistral / Gemma and T5 (only T5's
  small relative-position table [buckets, heads] and the 1-D norms stay replicated)."""
  folder = getattr(tiny, f"make_tiny_{family}")(str(tmp_path / family), save_format="flax")
  pooling = "mean" if family == "t5" else "last"
  params = {"text": TextEncoder.from_pretrained(folder, pooling=pooling, max_length=12).params}
  mesh = sharding.make_mesh(("data",), (8,))
  shardings = sharding.param_shardings(params, mesh, dinov2_llm.LLM_FROZEN_RULES)
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(shardings)):
    name = "/".join(str(k.key) for k in path)
    split = "data" in tuple(spec.spec)
    matrix = name.endswith(("/kernel", "/embedding"))  # stacked per-layer kernels are 3-D
    assert split == (matrix and "relative_attention_bias" not in name), name
    if leaf.ndim == 3:
      assert spec.spec[0] is None  # the stacked layer axis is never split


def _config(folders, **variant):
  image, text = folders
  arg = ",".join(f"{k}={v}" for k, v in dict(dict(image=image, text=text, batch=16, micro=1,
                                                  length=12, steps=2), **variant).items())
  config = dinov2_llm.get_config(arg)
  config.model.image_size = 16  # the tiny DINOv2's own resolution
  config.model.embed_dim = 16
  config.data.source = "synthetic_shapes"
  config.data.num_pairs = 40
  config.data.num_workers = 0
  config.data.num_threads = 2
  config.optim.warmup_steps = 1
  config.async_checkpointing = False
  config.evals = {}
  return config


def test_online_step_with_sharded_llm_on_eight_devices_equals_one(folders, devices):
  config = _config(folders)
  config.model.encoder_dtype = "float32"  # bfloat16 sums in another order differ by ~1e-3
  mesh8, mesh1 = sharding.make_mesh(("data",), (8,)), sharding.make_mesh(("data",), (1,),
                                                                        devices[:1])
  trainer8, losses8, state8, before = run_train_steps(config, mesh8, 2)
  _, losses1, state1, _ = run_train_steps(config, mesh1, 2)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state8.params,
               state1.params)
  text = trainer8.frozen["text"]
  layer = text["layers"]  # per-layer params stacked on axis 0 (scanned), never split
  # Every text-tower matrix holds 1/8 of its model-width axis per device; norms are replicated.
  for kernel, axis in ((layer["q_proj"]["kernel"], 1),
                       (layer["k_proj"]["kernel"], 1),
                       (layer["o_proj"]["kernel"], 2),
                       (layer["gate_proj"]["kernel"], 1),
                       (layer["down_proj"]["kernel"], 2),
                       (text["embed_tokens"]["embedding"], 1)):
    shard = list(kernel.shape)
    shard[axis] //= 8
    assert kernel.sharding.shard_shape(kernel.shape) == tuple(shard)
  norm = layer["input_layernorm"]["weight"]
  assert norm.sharding.shard_shape(norm.shape) == norm.shape
  gate = state8.params["text"]["gate"]["kernel"]  # the trainable GLU head: hidden axis split
  assert gate.sharding.shard_shape(gate.shape) == (gate.shape[0], gate.shape[1] // 8)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, trainer8.frozen))


@pytest.mark.slow
def test_config_compiles_on_cpu8_with_one_eighth_of_the_text_tower_per_device(folders, devices):
  """``python -m align_jax.cli.aot --config=configs/dinov2_llm.py --topology=cpu:8`` on tiny models."""
  del devices
  config = _config(folders, batch=64, micro=2)
  report = aot.compile_train_step(config, "cpu:8")
  state, frozen, batch = report.compiled.args_info[0]
  shardings = report.compiled.input_shardings[0][1]
  q_proj = shardings["text"]["layers"]["q_proj"]["kernel"]  # [layers, in, out], stacked
  assert tuple(q_proj.spec) == (None, "data", None)

  def device_bytes(infos, shards):
    return sum(np.prod(s.shard_shape(i.shape)) * np.dtype(i.dtype).itemsize
               for i, s in zip(jax.tree.leaves(infos), jax.tree.leaves(shards)))
  text_bytes = device_bytes(frozen["text"], shardings["text"])
  full_text = sum(np.prod(i.shape) * np.dtype(i.dtype).itemsize
                  for i in jax.tree.leaves(frozen["text"]))
  paths = jax.tree_util.tree_flatten_with_path(frozen["text"])[0]
  norms = sum(np.prod(i.shape) * np.dtype(i.dtype).itemsize  # norm weights: 1-D, or stacked 2-D
              for p, i in paths if not str(p[-1].key) in ("kernel", "embedding"))
  assert {np.dtype(i.dtype) for i in jax.tree.leaves(frozen["text"])} == {np.dtype("bfloat16")}
  assert text_bytes == (full_text - norms) // 8 + norms  # bfloat16, 1/8 of every matrix
  image_bytes = device_bytes(frozen["image"], shardings["image"])
  assert report.argument_bytes > text_bytes + image_bytes


def test_feature_extraction_with_a_decoder_text_layer_and_prefix(folders, tmp_path, devices):
  """--mode=extract_features through the sharded LLM: stored features = the encoder's own."""
  del devices
  config = _config(folders)
  config.model.text_layer = 1
  config.model.text_prefix = "caption: "
  config.model.encoder_dtype = "float32"
  manifest = feature_store.extract_features(config, str(tmp_path), shard_batches=1,
                                            dtype="float32")
  assert (manifest["text_layer"], manifest["text_prefix"]) == (1, "caption: ")
  encoder = TextEncoder.from_pretrained(config.model.text_encoder, pooling="last",
                                        max_length=12, layer=1, prefix="caption: ")
  reader = readers.make_reader(config.data)
  ids = np.concatenate([np.load(os.path.join(tmp_path, s["name"], "image_ids.npy"))
                        for s in manifest["shards"]])
  records = [reader.read(int(i)) for i in ids]
  captions = [c for r in records for c in records_lib.decode_captions(r.captions, key=r.key)]
  _, text, text_to_image = features.load_stored_features(str(tmp_path))
  stored = np.asarray(text["pooled"][np.arange(len(captions))])
  assert stored.shape == (80, 32) and len(text_to_image) == 80
  np.testing.assert_allclose(stored, encoder.encode(captions, batch_size=16), atol=1e-5)


@pytest.mark.slow
def test_a_larger_decoder_is_never_gathered_whole(folders, tmp_path, devices):
  """D = 1024, 8 layers (~90M text params, 180 MB in bfloat16): per device, the step's arguments
  and temporaries together stay below one replicated copy of the text tower (XLA gathers the
  sharded weights layer by layer, inside the encoder micro-batch loop, not all at once)."""
  del devices
  text = tiny.make_tiny_decoder(str(tmp_path / "mistral_mid"), "mistral", save_format="flax",
                                hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=2, intermediate_size=2816,
                                max_position_embeddings=256)
  config = _config((folders[0], text), batch=64, micro=2)
  report = aot.compile_train_step(config, "cpu:8")
  frozen = report.compiled.args_info[0][1]
  full_text = sum(np.prod(i.shape) * np.dtype(i.dtype).itemsize
                  for i in jax.tree.leaves(frozen["text"]))
  assert full_text > 170 * 2**20
  assert report.argument_bytes + report.temp_bytes < full_text
