"""Parity of align_jax's vision transformers (align_jax.encoders.vit) with transformers' PyTorch models.

Each family's tiny random checkpoint is made by PyTorch transformers (weights perturbed so layer
scales, biases and norms are not at their init values) and saved with ``save_pretrained``; our
loader reads the safetensors, our module runs it, and every hidden state, the final output and
SigLIP's pooled head output are compared: <= 1e-5 relative (max abs error / max abs reference) in
float32, 3e-2 in bfloat16.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from align_jax.encoders import attention as attention_lib, vit, weights  # noqa: E402

F32_TOL = 1e-5
BF16_TOL = 3e-2
_KW = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
           image_size=16, patch_size=4)
_NO_INTER = {k: v for k, v in _KW.items() if k != "intermediate_size"}

FAMILIES = {
  "dinov2": lambda t: t.Dinov2Model(t.Dinov2Config(layerscale_value=0.5, **_NO_INTER)),
  "dinov2_swiglu": lambda t: t.Dinov2Model(t.Dinov2Config(use_swiglu_ffn=True, **_NO_INTER)),
  "dinov3": lambda t: t.DINOv3ViTModel(t.DINOv3ViTConfig(num_register_tokens=2, **_KW)),
  "dinov3_gated": lambda t: t.DINOv3ViTModel(t.DINOv3ViTConfig(
    num_register_tokens=2, use_gated_mlp=True, hidden_act="silu", key_bias=True, **_KW)),
  "vit": lambda t: t.ViTModel(t.ViTConfig(**_KW)),
  "clip": lambda t: t.CLIPVisionModel(t.CLIPVisionConfig(**_KW)),
  "siglip": lambda t: t.SiglipVisionModel(t.SiglipVisionConfig(**_KW)),
}


def rel(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def save_torch(name: str, path: str):
  """A perturbed random PyTorch model of family ``name``, saved to ``path``; returns it."""
  torch.manual_seed(0)
  model = FAMILIES[name](transformers).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("vision")
  return {name: (str(root / name), save_torch(name, str(root / name))) for name in FAMILIES}


def torch_outputs(model, pixels_nchw: np.ndarray) -> dict[str, np.ndarray]:
  """HF hidden_states, the final output (CLIP: post_layernorm on every token) and SigLIP's pooler."""
  with torch.no_grad():
    out = model(pixel_values=torch.tensor(pixels_nchw), output_hidden_states=True)
    final = out.last_hidden_state
    if isinstance(model, transformers.CLIPVisionModel):
      final = getattr(model, "vision_model", model).post_layernorm(final)  # transformers 4 / 5
  result = {"hidden": [h.numpy() for h in out.hidden_states], "final": final.numpy()}
  if isinstance(model, transformers.SiglipVisionModel):
    result["map"] = out.pooler_output.numpy()
  return result


def run_ours(path: str, pixels_nchw: np.ndarray, dtype=None, num_layers=None, collect=True):
  cfg = vit.read_config(weights.read_config(path))
  grid = pixels_nchw.shape[-1] // cfg.patch_size
  params = vit.load_params(weights.read_state_dict(path), cfg, dtype=dtype, grid=grid)
  n = cfg.num_layers if num_layers is None else num_layers
  module = vit.VisionTransformer(cfg, grid, n, collect=collect,
                                 dtype=jnp.float32 if dtype is None else jnp.bfloat16)
  pixels = jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))
  return module.apply({"params": vit.slice_layers(params, n)}, pixels)


def pixels(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_float32_parity_every_hidden_state(checkpoints, name):
  path, model = checkpoints[name]
  x = pixels(16)
  ref = torch_outputs(model, x)
  ours = run_ours(path, x)
  assert len(ref["hidden"]) == ours["hidden"].shape[0] == 4
  for k, want in enumerate(ref["hidden"]):
    assert rel(ours["hidden"][k], want) <= F32_TOL, (name, k)
  assert rel(ours["final"], ref["final"]) <= F32_TOL
  if "map" in ref:
    assert rel(ours["map"], ref["map"]) <= F32_TOL


@pytest.mark.parametrize("name", ["dinov2", "dinov3", "dinov3_gated"])
def test_non_native_size(checkpoints, name):
  """DINOv2's position table resampled once at load time; DINOv3's RoPE for the larger grid."""
  path, model = checkpoints[name]
  x = pixels(24, seed=1)
  ref = torch_outputs(model, x)
  ours = run_ours(path, x)
  assert ours["final"].shape[1] == ref["final"].shape[1]
  assert rel(ours["final"], ref["final"]) <= F32_TOL
  for k, want in enumerate(ref["hidden"]):
    assert rel(ours["hidden"][k], want) <= F32_TOL, k


@pytest.mark.parametrize("name", ["dinov2", "dinov3_gated", "siglip"])
def test_bfloat16_within_tolerance(checkpoints, name):
  path, model = checkpoints[name]
  x = pixels(16)
  ref = torch_outputs(model, x)
  ours = run_ours(path, x, dtype=ml_dtypes.bfloat16, collect=False)
  assert ours["final"].dtype == jnp.bfloat16
  assert rel(ours["final"], ref["final"]) <= BF16_TOL
  assert rel(ours["final"], ref["final"]) > 1e-5  # it did compute in bfloat16
  if "map" in ref:
    assert rel(ours["map"], ref["map"]) <= BF16_TOL


def test_runs_only_layers_up_to_k(checkpoints):
  """A module built for k blocks gives HF's hidden_states[k] from the first k stacked blocks."""
  path, model = checkpoints["dinov3"]
  x = pixels(16)
  ref = torch_outputs(model, x)
  for k in (0, 1, 2):
    ours = run_ours(path, x, num_layers=k, collect=False)
    assert "final" not in ours
    assert rel(ours["last"], ref["hidden"][k]) <= F32_TOL, k
  cfg = vit.read_config(weights.read_config(path))
  params = vit.load_params(weights.read_state_dict(path), cfg)
  sliced = vit.slice_layers(params, 1)
  assert jax.tree.leaves(sliced["layers"])[0].shape[0] == 1
  assert jax.tree.leaves(params["layers"])[0].shape[0] == 3


def test_scan_keeps_one_block_in_the_program(checkpoints):
  """Depth does not grow the lowered program: 3 blocks lower to the same op count as 1 (scan)."""
  path, _ = checkpoints["vit"]
  cfg = vit.read_config(weights.read_config(path))
  params = vit.load_params(weights.read_state_dict(path), cfg)
  x = jnp.zeros((1, 16, 16, 3))
  count = lambda n: jax.jit(vit.VisionTransformer(cfg, 4, n).apply).lower(
    {"params": vit.slice_layers(params, n)}, x).as_text().count("dot_general")
  assert count(1) == count(2) > 0


def test_sharded_safetensors_and_msgpack_load_the_same(checkpoints, tmp_path):
  """Sharded safetensors (+ index) and a Flax msgpack give the single file's params."""
  path, model = checkpoints["clip"]
  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(sharded, weights.SHARD_INDEX))
  assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
  one, many = weights.read_state_dict(path), weights.read_state_dict(sharded)
  assert set(one) == set(many)
  for key in one:
    np.testing.assert_array_equal(one[key], many[key])
  # A Flax msgpack written with transformers' Flax names (kernel / scale / embedding leaves).
  from flax import serialization, traverse_util
  flat = {}
  for name, value in one.items():
    parts = name.split(".")
    if name.endswith("weight") and value.ndim == 2 and "embedding" not in name:
      flat[tuple(parts[:-1]) + ("kernel",)] = value.T
    elif name.endswith("weight") and value.ndim == 4:
      flat[tuple(parts[:-1]) + ("kernel",)] = np.transpose(value, (2, 3, 1, 0))
    elif name.endswith("weight") and value.ndim == 1:
      flat[tuple(parts[:-1]) + ("scale",)] = value
    elif "position_embedding" in name:
      flat[tuple(parts[:-1]) + ("embedding",)] = value
    else:
      flat[tuple(parts)] = value
  folder = tmp_path / "flax"
  folder.mkdir()
  (folder / weights.FLAX_MSGPACK).write_bytes(
    serialization.msgpack_serialize(traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in flat.items()})))
  from_msgpack = weights.read_state_dict(str(folder))
  assert set(from_msgpack) == set(one)
  for key in one:
    np.testing.assert_array_equal(from_msgpack[key], one[key])


def test_bfloat16_safetensors_read_as_bfloat16(tmp_path):
  from safetensors.numpy import save_file
  x = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
  save_file({"w": x, "i": np.arange(4, dtype=np.int64)}, str(tmp_path / "model.safetensors"))
  state = weights.read_state_dict(str(tmp_path))
  assert state["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(state["w"].astype(np.float32), x.astype(np.float32))
  np.testing.assert_array_equal(state["i"], np.arange(4))


def test_reverse_name_map_round_trip_loads_in_transformers(checkpoints, tmp_path):
  """from_flax(to_flax(state)) is a checkpoint transformers loads to the same outputs."""
  for name in ("siglip", "dinov3_gated"):
    path, model = checkpoints[name]
    cfg = vit.read_config(weights.read_config(path))
    original = weights.read_state_dict(path)
    params = vit.load_params(original, cfg)
    prefix = weights.find_prefix(original, vit.rules(cfg), cfg.num_layers)  # "vision_model." in 4.x
    state = weights.from_flax(params, vit.rules(cfg), cfg.num_layers, prefix)
    out = tmp_path / name
    out.mkdir()
    weights.write_safetensors(state, str(out / "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
      (out / "config.json").write_text(f.read())
    reloaded = type(model).from_pretrained(str(out)).eval()
    x = pixels(16)
    assert rel(torch_outputs(reloaded, x)["final"], torch_outputs(model, x)["final"]) == 0.0


def test_missing_weight_and_unsupported_family_one_line(checkpoints, tmp_path):
  path, _ = checkpoints["vit"]
  cfg = vit.read_config(weights.read_config(path))
  state = dict(weights.read_state_dict(path))
  del state["encoder.layer.1.attention.attention.key.weight"]
  with pytest.raises(ValueError, match="missing weight encoder.layer.1.attention.attention.key"):
    vit.load_params(state, cfg)
  with pytest.raises(ValueError, match="supported: dinov2, dinov3_vit, vit, clip"):
    vit.read_config({"model_type": "swin"})


def test_config_defaults_from_omitted_keys(checkpoints):
  """Keys a config.json leaves out (older saves write only non-defaults) take transformers' defaults."""
  path, model = checkpoints["dinov3"]
  with open(os.path.join(path, "config.json")) as f:
    saved = json.load(f)
  for key in ("key_bias", "layer_norm_eps", "rope_theta", "hidden_act"):
    saved.pop(key)
  cfg = vit.read_config(saved)
  defaults = transformers.DINOv3ViTConfig()
  assert (cfg.layer_norm_eps, cfg.rope_theta, cfg.act) == (
    defaults.layer_norm_eps, defaults.rope_theta, defaults.hidden_act)
  assert cfg.qkv_bias == (True, False, True, True)
  assert cfg.num_registers == 2 and cfg.intermediate_size == 37


# --- Through the public API: ImageEncoder.from_pretrained, every pooling, against PyTorch. ---

def _write_processor(path: str, size: int) -> None:
  """A square-resize processor (no crop) at the checkpoint's size, as SigLIP's."""
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "SiglipImageProcessor", "do_resize": True,
               "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
               "image_std": [0.5] * 3}, f)


def _reference_pool(ref: dict[str, np.ndarray], pooling: str, prefix: int) -> np.ndarray:
  tokens = ref["final"]
  return {"cls": tokens[:, 0], "mean": tokens[:, prefix:].mean(1),
          "cls+mean_patch": np.concatenate([tokens[:, 0], tokens[:, prefix:].mean(1)], -1),
          "map": ref.get("map")}[pooling]


@pytest.mark.parametrize("name,poolings", [
  ("dinov3", ("cls", "mean", "cls+mean_patch", "tokens")),
  ("siglip", ("map", "mean", "tokens"))])
def test_image_encoder_every_pooling_matches_pytorch(checkpoints, name, poolings):
  from align_jax import encoders
  path, model = checkpoints[name]
  _write_processor(path, 16)
  images = np.random.default_rng(3).integers(0, 256, (3, 20, 23, 3), dtype=np.uint8)
  for pooling in poolings:
    enc = encoders.ImageEncoder.from_pretrained(path, pooling=pooling)
    x = enc.preprocess(images)["pixel_values"]
    ref = torch_outputs(model, x.transpose(0, 3, 1, 2))
    out = enc.apply(enc.params, {"pixel_values": x})
    prefix = 3 if name == "dinov3" else 0  # class token + 2 registers; SigLIP: none
    assert enc.num_tokens == prefix + 16
    if pooling == "tokens":
      assert out["tokens"].shape == (3, enc.num_tokens, 32)
      assert rel(out["tokens"], ref["final"]) <= F32_TOL
    else:
      assert out["pooled"].dtype == jnp.float32
      assert rel(out["pooled"], _reference_pool(ref, pooling, prefix)) <= F32_TOL, pooling
  enc = encoders.ImageEncoder.from_pretrained(path, pooling="mean", layer=[1, -1])
  x = enc.preprocess(images)["pixel_values"]
  ref = torch_outputs(model, x.transpose(0, 3, 1, 2))
  want = 0.5 * (ref["hidden"][1] + ref["final"])[:, prefix:].mean(1)
  assert rel(enc.apply(enc.params, {"pixel_values": x})["pooled"], want) <= F32_TOL
  every = enc.apply_all_layers(enc.params, {"pixel_values": x})
  assert every.shape == (4, 3, 32)
  assert rel(every[2], ref["hidden"][2][:, prefix:].mean(1)) <= F32_TOL


def test_pooling_the_family_lacks_is_one_line(checkpoints):
  from align_jax import encoders
  path, _ = checkpoints["siglip"]
  _write_processor(path, 16)
  with pytest.raises(ValueError, match="no class token.*use --config.model.image_pooling=map"):
    encoders.ImageEncoder.from_pretrained(path, pooling="cls")
  with pytest.raises(ValueError, match="no attention-pool head"):
    encoders.ImageEncoder.from_pretrained(checkpoints["dinov3"][0], pooling="map")


def test_siglip_and_clip_preprocessing_equal_transformers_processor(tmp_path):
  """Our numpy steps from the saved preprocessor_config.json equal HF's slow processors."""
  from PIL import Image
  from align_jax.encoders import image_processing
  rng = np.random.default_rng(4)
  images = [Image.fromarray(rng.integers(0, 256, s + (3,), dtype=np.uint8))
            for s in ((40, 57), (61, 33), (10, 12))]
  for proc in (transformers.SiglipImageProcessor(size={"height": 24, "width": 24}),
               transformers.CLIPImageProcessor(size={"shortest_edge": 26}, crop_size=24),
               transformers.ViTImageProcessor(size={"height": 20, "width": 20})):
    folder = tmp_path / type(proc).__name__
    proc.save_pretrained(str(folder))
    config = image_processing.load_image_processor(str(folder), dict)
    assert isinstance(config, dict)
    ours = image_processing.ImageProcessor(config)(images)
    ref = proc(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ours, ref)


def test_dinov3_fast_processor_config_is_read():
  """DINOv3 ships DINOv3ViTImageProcessorFast's keys only: 224 square, bilinear, ImageNet."""
  from align_jax.encoders import image_processing
  config = {"image_processor_type": "DINOv3ViTImageProcessorFast", "size": {"height": 224,
            "width": 224}, "do_resize": True, "do_rescale": True, "do_normalize": True}
  proc = image_processing.ImageProcessor(config)
  assert proc.image_size == 224 and proc.mean == (0.485, 0.456, 0.406)
  assert proc.steps["resample"] == 2 and proc.steps["rescale_first"]
  flat = np.full((50, 70, 3), 128, np.uint8)  # a constant image stays constant after resize
  out = proc([flat])
  want = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out[0], np.broadcast_to(want, (224, 224, 3)), rtol=1e-5)
  with pytest.raises(ValueError, match="unsupported image processor 'SwinImageProcessor'"):
    image_processing.ImageProcessor({"image_processor_type": "SwinImageProcessor"})


# DINOv3's processor resizes float pixels with an antialiased bilinear filter; ours is PIL's (mode
# "F"), torch's is the one PIL's was ported to: they differ by float rounding only (measured up
# to 8e-6 after normalisation here, 5.5e-5 at 224 px). Resizing the uint8 image first instead
# (the slow processors' order) is off by 1.3e-2 to 1.7e-2.
DINOV3_ATOL = 3e-5
DINOV3_SHAPES = ((90, 120), (31, 45), (48, 48), (150, 40))  # down, up, same size, mixed


def _dinov3_inputs(tmp_path):
  """Random images and the processor config a DINOv3 checkpoint ships, read back from its file."""
  from align_jax.encoders import image_processing
  rng = np.random.default_rng(7)
  images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in DINOV3_SHAPES]
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({
      "image_processor_type": "DINOv3ViTImageProcessorFast", "size": {"height": 48, "width": 48},
      "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2}))
  config = image_processing.load_image_processor(str(tmp_path), dict)
  return images, image_processing.ImageProcessor(config)


def test_dinov3_preprocessing_equals_the_processors_torch_operations(tmp_path, torch):
  """DINOv3ViTImageProcessorFast's steps as torchvision 0.28 runs them on a float tensor: uint8 *
  rescale_factor, then ``F.resize`` = ``interpolate(bilinear, align_corners=False,
  antialias=True)`` (no call at the same size), then ``(x - mean) / std``."""
  images, ours = _dinov3_inputs(tmp_path)
  mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
  std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
  for image, out in zip(images, ours(images)):
    x = torch.from_numpy(image).permute(2, 0, 1)[None] * (1 / 255)
    if x.shape[-2:] != (48, 48):
      x = torch.nn.functional.interpolate(x, size=[48, 48], mode="bilinear", align_corners=False,
                                          antialias=True)
    ref = ((x[0] - mean) / std).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=DINOV3_ATOL)
    assert np.abs(out - ref).max() > 0 or image.shape[:2] == (48, 48)


def test_dinov3_preprocessing_equals_transformers_processor(tmp_path, torch):
  """Against transformers' DINOv3 processor itself, which needs torchvision (not pinned: its CPU
  wheel comes from PyTorch's index, README); skipped where torchvision is missing or does not
  import."""
  try:
    import torchvision  # noqa: F401
  except Exception as error:  # pylint: disable=broad-except  # e.g. a CUDA wheel beside CPU torch
    pytest.skip(f"torchvision unavailable ({type(error).__name__}: {error})")
  images, ours = _dinov3_inputs(tmp_path)
  proc = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
  # transformers 5 names the torchvision processor DINOv3ViTImageProcessor (4.x: ...Fast)
  assert type(proc).__name__ in ("DINOv3ViTImageProcessor", "DINOv3ViTImageProcessorFast")
  for image, out in zip(images, ours(images)):  # one at a time: the inputs differ in size
    ref = proc([image], return_tensors="pt")["pixel_values"][0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=DINOV3_ATOL)


def test_attention_lowers_to_cudnn_for_a_cuda_target(checkpoints, monkeypatch):
  """The vision tower lowered for CUDA in bfloat16 calls cuDNN's fused attention (custom call
  ``__cudnn$fmha``); lowered for this CPU it does not. There is no GPU here: the cuDNN version and
  compute-capability probes (which need one) are stubbed, as a CUDA 12 / cuDNN 9.10 H100 reports.
  """
  from jax._src.cudnn import fused_attention_stablehlo as fused
  path, _ = checkpoints["dinov3"]
  cfg = vit.read_config(weights.read_config(path))
  params = vit.load_params(weights.read_state_dict(path), cfg, dtype=ml_dtypes.bfloat16)
  x = jnp.zeros((2, 16, 16, 3), jnp.bfloat16)
  assert attention_lib.auto_implementation(jnp.bfloat16, cfg.head_dim, "gpu") == "cudnn"
  assert attention_lib.auto_implementation(jnp.float32, cfg.head_dim, "gpu") is None
  assert attention_lib.auto_implementation(jnp.bfloat16, cfg.head_dim, "cpu") is None
  cpu_text = jax.jit(vit.VisionTransformer(cfg, 4, 3, dtype=jnp.bfloat16).apply).lower(
    {"params": params}, x).as_text()
  assert "cudnn" not in cpu_text
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
  module = vit.VisionTransformer(cfg, 4, 3, dtype=jnp.bfloat16, attention_implementation="cudnn")
  gpu_text = jax.jit(module.apply).trace({"params": params}, x).lower(
    lowering_platforms=("cuda",)).as_text()
  assert gpu_text.count("__cudnn$fmha") >= 1
