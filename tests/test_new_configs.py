"""configs/dinov3_qwen3.py and configs/siglip2_nvembed.py from config files alone.

Each test writes config-only encoder folders (config.json, tokenizer / processor files, no
weights) of the same model types and structure as the real towers, tiny: DINOv3 (registers,
RoPE) + Qwen3, and a two-tower SigLIP config (its vision tower, MAP head) + NV-Embed (a
bidirectional Mistral and the latent-attention pooler). The configs build abstractly (no weights
read), their FSDP rules split the 7B tower's stacked (scanned) matrices as the docstring says,
and ``python -m align_jax.cli.aot --topology=cpu:8`` compiles each at a small batch.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from align_jax.model import two_tower as model_lib
from align_jax.parallel import mesh as sharding
from align_jax.encoders import weights
from align_jax.testing import tiny_checkpoints as tiny
from configs import dinov3_qwen3, siglip2_nvembed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
_VISION = dict(_TINY, image_size=16, patch_size=4)


def _processor(folder, kind, mean, std):
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": kind, "do_resize": True, "size": {"height": 16,
               "width": 16}, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
               "do_normalize": True, "image_mean": mean, "image_std": std}, f)


def _drop_weights(folder):
  for name in os.listdir(folder):
    if name.endswith(".safetensors"):
      os.remove(os.path.join(folder, name))
  return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  import transformers
  root = tmp_path_factory.mktemp("new_configs")
  out = {}
  out["dinov3"] = str(root / "dinov3")
  transformers.DINOv3ViTConfig(num_register_tokens=4, **_VISION).save_pretrained(out["dinov3"])
  _processor(out["dinov3"], "DINOv3ViTImageProcessorFast", [0.485, 0.456, 0.406],
             [0.229, 0.224, 0.225])
  out["siglip"] = str(root / "siglip")
  transformers.SiglipConfig(text_config=dict(_TINY), vision_config=dict(_VISION)
                            ).save_pretrained(out["siglip"])
  _processor(out["siglip"], "SiglipImageProcessor", [0.5] * 3, [0.5] * 3)
  # Qwen3: a tiny Llama-style tokenizer (left padding, as Qwen3-Embedding) and a Qwen3 config.
  out["qwen3"] = _drop_weights(tiny.make_tiny_llama(str(root / "qwen3"), save_format="flax"))
  with open(os.path.join(out["qwen3"], "config.json")) as f:
    vocab = json.load(f)["vocab_size"]
  transformers.Qwen3Config(vocab_size=vocab, num_key_value_heads=2, head_dim=16,
                           max_position_embeddings=64, **_TINY).save_pretrained(out["qwen3"])
  out["nvembed"] = _drop_weights(tiny.make_tiny_nvembed(str(root / "nvembed"),
                                                        save_format="flax"))
  for folder in out.values():
    assert not any(n.endswith((".safetensors", ".msgpack")) for n in os.listdir(folder))
  return out


def _variant(folders, image, text):
  return (f"image={folders[image]},text={folders[text]},size=16,length=12,batch=64,micro=2,"
          "steps=2")


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_dinov3_qwen3_builds_from_config_files_alone(folders, monkeypatch):
  monkeypatch.setattr(weights, "read_state_dict", lambda *a, **k: pytest.fail("weights read"))
  config = dinov3_qwen3.get_config(_variant(folders, "dinov3", "qwen3"))
  model = model_lib.build_model(config, abstract=True)
  image, text = model.image_encoder, model.text_encoder
  assert (image.config.model_type, text.config.model_type) == ("dinov3_vit", "qwen3")
  assert image.output_dim == 64 and text.output_dim == 32  # CLS + mean patch; last token
  frozen = _flat(model.frozen_params())
  assert frozen["text/layers/q_norm/weight"].shape == (2, 16)  # Qwen3's q/k norms, stacked
  assert all(str(x.dtype) == "bfloat16" for x in frozen.values())


def test_siglip2_nvembed_builds_and_its_rules_shard_every_text_matrix(folders, monkeypatch):
  monkeypatch.setattr(weights, "read_state_dict", lambda *a, **k: pytest.fail("weights read"))
  config = siglip2_nvembed.get_config(_variant(folders, "siglip", "nvembed"))
  model = model_lib.build_model(config, abstract=True)
  assert model.text_encoder.config.model_type == "nvembed"
  assert model.text_encoder.pooling == "latent" and model.image_encoder.pooling == "map"
  frozen = model.frozen_params()
  mesh = sharding.make_mesh(("data",), (8,))
  specs = sharding.param_shardings({"text": frozen["text"]}, mesh,
                                   siglip2_nvembed.FROZEN_RULES)
  leaves = _flat({"text": frozen["text"]})
  for name, spec in _flat(specs).items():
    split = "data" in tuple(spec.spec)
    matrix = name.endswith(("/kernel", "/embedding", "/latents"))
    assert split == matrix, name
    if leaves[name].ndim == 3:  # the Mistral's stacked (scanned) layers
      assert name.startswith("text/model/layers/") and spec.spec[0] is None, name
  assert {n.split("/")[1] for n in leaves} == {"model", "pooler"}


@pytest.mark.slow
@pytest.mark.parametrize("config_file, image, text", [
    ("configs/dinov3_qwen3.py", "dinov3", "qwen3"),
    ("configs/siglip2_nvembed.py", "siglip", "nvembed")])
def test_aot_cli_compiles_on_cpu8_from_config_only_folders(folders, config_file, image, text):
  result = subprocess.run(
      [sys.executable, "-m", "align_jax.cli.aot",
       f"--config={config_file}:{_variant(folders, image, text)}", "--topology=cpu:8"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "topology cpu:8: 8 devices (cpu), 1 host(s), mesh {'data': 8}" in result.stdout
  assert "compiled train_step in" in result.stdout and "peak ~" in result.stdout
