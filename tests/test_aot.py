"""Ahead-of-time compile check: the demo's real train step compiles for 8 simulated devices with
XLA's memory numbers equal to the shard sizes; TPU topologies either compile (libtpu present) or
stop with the clear "needs libtpu" message; encoder folders with only config.json (+ tokenizer)
compile with frozen params shaped exactly as loading would give; a step over the chip's memory
stops with the numbers."""

import dataclasses
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from align_jax.train import aot
from align_jax.model import two_tower as model_lib
from configs import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tpu_description_available() -> bool:
  """Whether jax.experimental.topologies can describe a TPU slice here (needs libtpu)."""
  from jax.experimental import topologies
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another libtpu process
  try:
    topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                 chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                 num_slices=1, wrap=(False, False, False))
  except (RuntimeError, NotImplementedError):
    return False
  return True


def _shard_bytes(struct) -> int:
  """Bytes one device holds of a sharded ShapeDtypeStruct."""
  shard = struct.sharding.shard_shape(struct.shape)
  return math.prod(shard) * np.dtype(struct.dtype).itemsize


@pytest.fixture(scope="module")
def demo_report(devices):
  del devices  # the 8 simulated devices conftest provides
  return aot.compile_train_step(demo.get_config(), "cpu:8")


def test_cpu8_compile_reports_exact_argument_and_donated_bytes(demo_report):
  config = demo.get_config()
  report = demo_report
  assert (report.num_devices, report.num_processes, report.mesh_shape) == (8, 1, {"data": 8})
  state, frozen, batch = report.compiled.args_info[0]  # as the compiled step takes them
  nbytes = lambda info: math.prod(info.shape) * np.dtype(info.dtype).itemsize
  assert all(info.donated for info in jax.tree.leaves(state))
  assert not any(info.donated for info in jax.tree.leaves((frozen, batch)))
  assert {info.shape[0] for info in jax.tree.leaves(batch)} == {config.batch_size}
  # per device: params and optimiser state are replicated (no rules), batch rows split 8 ways
  expected_state = sum(nbytes(info) for info in jax.tree.leaves(state))
  frozen_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(
      model_lib.build_model(config).frozen_params()))
  batch_bytes = (config.data.image_input_dim + config.data.text_input_dim) * 4 * (
      config.batch_size // 8)
  assert report.argument_bytes == expected_state + frozen_bytes + batch_bytes
  assert report.alias_bytes == expected_state  # the state is donated: updated in place
  assert report.output_bytes >= expected_state
  assert report.peak_bytes < 2**30
  assert "memory per device: arguments" in report.summary()


def test_cpu8_flops_match_the_matmuls_of_one_device_share(demo_report):
  """FLOPs per device ~ frozen forward + trainable forward/backward + the global-batch logits."""
  config = demo.get_config()
  rows, batch = config.batch_size // 8, config.batch_size
  width, out = config.model.encoder_width, config.model.encoder_output_dim
  hidden, embed = config.model.hidden_dim, config.model.embed_dim
  frozen = sum(2 * rows * (d_in * width + width * out)
               for d_in in (config.data.image_input_dim, config.data.text_input_dim))
  trainable = 3 * 2 * 2 * rows * (out * hidden + hidden * embed)  # fwd + 2x bwd, two towers
  logits = 3 * 2 * rows * batch * embed  # local rows x global batch, fwd + bwd
  estimate = frozen + trainable + logits
  assert 0.5 * estimate < demo_report.flops < 2.0 * estimate, (demo_report.flops, estimate)


def test_config_that_does_not_fit_the_topology_raises(devices):
  config = demo.get_config()
  config.batch_size = 100
  with pytest.raises(ValueError, match="batch_size 100 is not divisible by the 8 devices"):
    aot.compile_train_step(config, "cpu:8")
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
    aot.topology_devices("cpu:16")


@pytest.mark.parametrize("name, topology_name, devices_, wrap, core", [
    ("v4-32", "v4:2x2x4", 16, (False, False, False), "megacore"),
    ("v4-128", "v4:4x4x4", 64, (True, True, True), "megacore"),
    ("v5p-256", "v5:4x4x8", 128, (True, True, True), "megacore"),
    ("v5e-256", "v5e:16x16", 256, (True, True, False), "default"),
    ("v5litepod-8", "v5e:2x4", 8, (False, False, False), "default"),
    ("v6e-64", "v6e:8x8", 64, (False, False, False), "default"),
])
def test_tpu_accelerator_types_map_to_libtpu_topologies(name, topology_name, devices_, wrap,
                                                        core):
  spec = aot.tpu_topology(name)
  assert (spec.topology_name, spec.num_devices, spec.wrap, spec.chip_config_name) == (
      topology_name, devices_, wrap, core)


@pytest.mark.parametrize("name, message", [("v5e-48", "unsupported size 'v5e-48'"),
                                           ("v4-31", "unsupported size 'v4-31'"),
                                           ("tpu9-8", "unknown topology 'tpu9-8'")])
def test_bad_topology_names_raise(name, message):
  with pytest.raises(ValueError, match=message):
    aot.tpu_topology(name)


def test_tpu_topology_compiles_or_names_libtpu():
  """With libtpu the v5e-256 step compiles; without, the CLI names what is missing, no traceback."""
  env = dict(os.environ, XLA_FLAGS="")
  result = subprocess.run(
      [sys.executable, "-m", "align_jax.cli.aot", "--config=configs/demo.py", "--topology=v5e-256",
       "--config.batch_size=1024"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  if _tpu_description_available():
    assert result.returncode == 0, result.stderr[-2000:]
    assert "topology v5e-256: 256 devices (TPU v5 lite), 64 host(s)" in result.stdout
    assert "memory per device: arguments" in result.stdout
  else:
    assert result.returncode != 0
    assert "needs libtpu" in result.stderr and "jax[tpu]==0.10.2" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    with pytest.raises(aot.TopologyUnavailableError, match="needs libtpu"):
      aot.topology_devices("v5e-256")


# ----------------------------------------------------------------- from config files alone

_WEIGHT_NAMES = ("model.safetensors", "flax_model.msgpack", "flax_model.msgpack.index.json",
                 "pytorch_model.bin", "model.safetensors.index.json")


def _config_only(folder: str, dest) -> str:
  """A copy of a checkpoint folder without its weights: config.json, tokenizer/processor files."""
  dest.mkdir()
  for name in os.listdir(folder):
    if name.endswith((".json", ".txt")) and name not in _WEIGHT_NAMES:
      shutil.copy(os.path.join(folder, name), dest / name)
  assert (dest / "config.json").exists()
  assert not any((dest / name).exists() for name in _WEIGHT_NAMES)
  assert not any(os.path.getsize(dest / name) > 2**20 for name in os.listdir(dest))
  return str(dest)


@pytest.fixture(scope="module")
def checkpoint_pairs(tmp_path_factory):
  """Tiny DINOv2 (grid 7, patch 4) and BERT / RoBERTa: full folders and config-only copies."""
  from align_jax.testing import tiny_checkpoints as tiny
  root = tmp_path_factory.mktemp("aot_encoders")
  full = {"dinov2": tiny.make_tiny_dinov2(str(root / "dinov2"), image_size=28, save_format="flax"),
          "bert": tiny.make_tiny_bert(str(root / "bert"), save_format="flax"),
          "roberta": tiny.make_tiny_roberta(str(root / "roberta"), save_format="flax")}
  return {name: (folder, _config_only(folder, root / f"{name}_config_only"))
          for name, folder in full.items()}


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)


@pytest.mark.parametrize("image_size, dtype", [(36, "bfloat16"), (28, "float32")])
def test_abstract_image_params_equal_the_loaded_ones(checkpoint_pairs, monkeypatch, image_size,
                                                    dtype):
  from align_jax import encoders
  from align_jax.encoders import weights
  full, config_only = checkpoint_pairs["dinov2"]
  loaded = encoders.ImageEncoder.from_pretrained(full, pooling="tokens", image_size=image_size,
                                                 dtype=dtype)
  monkeypatch.setattr(weights, "read_state_dict", lambda *a, **k: pytest.fail("weights were read"))
  abstract = encoders.ImageEncoder.from_pretrained(config_only, pooling="tokens",
                                                   image_size=image_size, dtype=dtype,
                                                   abstract=True)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.params))
  assert _shapes(abstract.params) == _shapes(loaded.params)
  grid = image_size // 4  # 36 px: the 7x7 table resampled to 9x9 at load time
  assert abstract.params["embed"]["pos"].shape == (1, 1 + grid * grid, 32)
  assert {x.dtype for x in jax.tree.leaves(abstract.params)} == {np.dtype(dtype)}
  assert (abstract.image_size, abstract.num_tokens, abstract.output_dim) == (
      loaded.image_size, loaded.num_tokens, loaded.output_dim)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_abstract_text_params_equal_the_loaded_ones(checkpoint_pairs, monkeypatch, family):
  from align_jax import encoders
  from align_jax.encoders import weights
  full, config_only = checkpoint_pairs[family]
  loaded = encoders.TextEncoder.from_pretrained(full, pooling="tokens", max_length=16,
                                                dtype="bfloat16")
  monkeypatch.setattr(weights, "read_state_dict", lambda *a, **k: pytest.fail("weights were read"))
  abstract = encoders.TextEncoder.from_pretrained(config_only, pooling="tokens", max_length=16,
                                                  dtype="bfloat16", abstract=True)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.params))
  assert _shapes(abstract.params) == _shapes(loaded.params)
  np.testing.assert_array_equal(abstract.preprocess(["a cat"])["input_ids"],
                                loaded.preprocess(["a cat"])["input_ids"])


def test_loading_real_weights_from_a_config_only_folder_still_says_no_weights(checkpoint_pairs):
  from align_jax import encoders
  with pytest.raises(ValueError, match="has no weights"):
    encoders.TextEncoder.from_pretrained(checkpoint_pairs["bert"][1], max_length=16)


def _online_config(image: str, text: str):
  """The paper recipe's shape in miniature: token pooling, token projectors, micro-batches."""
  config = demo.get_config()
  config.batch_size = 32  # 4 rows per device on cpu:8, in micro-batches of 2
  config.data.source = "synthetic_shapes"
  m = config.model
  m.image_encoder, m.text_encoder = image, text
  m.image_size, m.max_text_length = 36, 16
  m.image_pooling = m.text_pooling = "tokens"
  m.image_projector, m.text_projector = "freeze_align_image", "freeze_align_text"
  m.encoder_dtype = "bfloat16"
  m.encoder_micro_batch = m.projector_micro_batch = 2
  m.embed_dim = 16
  return config


def test_compile_from_config_only_folders_shapes_frozen_params_as_loaded(checkpoint_pairs,
                                                                       devices, monkeypatch):
  from align_jax.encoders import weights
  (image_full, image_cfg), (text_full, text_cfg) = (checkpoint_pairs["dinov2"],
                                                    checkpoint_pairs["roberta"])
  loaded = model_lib.build_model(_online_config(image_full, text_full)).frozen_params()
  monkeypatch.setattr(weights, "read_state_dict", lambda *a, **k: pytest.fail("weights were read"))
  report = aot.compile_train_step(_online_config(image_cfg, text_cfg), "cpu:8")
  assert report.mesh_shape == {"data": 8} and report.peak_bytes > 0
  _, frozen, batch = report.compiled.args_info[0]
  assert _shapes(frozen) == _shapes(loaded)
  assert batch["image"]["pixel_values"].shape == (32, 36, 36, 3)
  assert batch["text"]["input_ids"].shape == (32, 16)
  frozen_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(loaded))  # replicated
  assert report.argument_bytes > frozen_bytes


def test_a_step_over_the_chips_memory_fails_with_the_numbers(demo_report, monkeypatch):
  monkeypatch.setitem(aot.HBM_BYTES, "cpu", 2**20)  # pretend the CPU device has 1 MiB
  with pytest.raises(aot.DoesNotFitError) as error:
    aot.compile_train_step(demo.get_config(), "cpu:8")
  message = str(error.value)
  assert "\n" not in message
  assert f"peak ~{demo_report.peak_bytes / 2**30:.2f} GiB per device" in message
  assert "> 0.000976562 GiB HBM of a cpu; lower --config.batch_size" in message
  small = dataclasses.replace(demo_report, hbm_bytes=demo_report.peak_bytes - 1)
  assert small.fits is False
  with pytest.raises(aot.DoesNotFitError, match="does not fit on cpu:8"):
    small.check_fits()
  enough = dataclasses.replace(demo_report, hbm_bytes=demo_report.peak_bytes)
  assert enough.fits is True
  enough.check_fits()


def test_slices_in_the_topology_name():
  spec = aot.tpu_topology("2xv5e-256")
  assert (spec.topology_name, spec.num_slices, spec.num_devices) == ("v5e:16x16", 2, 512)
  assert aot.tpu_topology("v5p-128").num_slices == 1
  assert aot.with_slices("v5e-256", 2) == "2xv5e-256"
  assert aot.with_slices("v5e-256", 1) == "v5e-256"
  for topology in ("cpu:8", "2xv5e-256"):
    with pytest.raises(ValueError, match="--num_slices=2 needs a single-slice TPU --topology"):
      aot.with_slices(topology, 2)


def _aot_cli(*args):
  env = dict(os.environ, XLA_FLAGS="", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  return subprocess.run([sys.executable, "-m", "align_jax.cli.aot", "--config=configs/demo.py", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not _tpu_description_available(), reason="needs libtpu (jax[tpu])")
def test_two_slices_compile_and_too_big_fails_in_one_line():
  result = _aot_cli("--topology=v5e-16", "--num_slices=2", "--config.batch_size=1024")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "topology 2xv5e-16: 32 devices (TPU v5 lite) in 2 slices" in result.stdout
  assert "mesh {'data': 32}" in result.stdout and "of 16 GiB HBM" in result.stdout
  # gathered logits of a 262,144 batch on 4 chips: 64k x 262k float32 = 64 GiB per chip
  result = _aot_cli("--topology=v5e-4", "--config.batch_size=262144", "--config.loss.impl=gathered")
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: train_step does not fit on v5e-4 (TPU v5 lite): XLA: "
                              "RESOURCE_EXHAUSTED"), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
