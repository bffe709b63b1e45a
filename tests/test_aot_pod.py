"""benchmarks/aot_pod.py without a TPU compile: its analytic FLOP formulas (a hand count, and the
matmul FLOPs of the real align_jax encoder modules at tiny shapes, counted from their jaxprs:
every ``dot_general`` and convolution, a scanned stack's body once per layer), its config-only
encoder folders (the published towers' parameter counts) and its config names."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import aot_pod  # noqa: E402

from align_jax.encoders import decoder, nvembed, vit  # noqa: E402
from align_jax.testing import tiny_checkpoints as tiny  # noqa: E402

_VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            patch_size=4, image_size=12)
_DECODER = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def _subjaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def _matmul_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general and convolution in ``jaxpr`` (scan bodies x length)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      rhs_free = math.prod(n for i, n in enumerate(rhs) if i not in rc and i not in rb)
      total += 2 * math.prod(lhs) * rhs_free
    elif name == "conv_general_dilated":
      out, kernel = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
      total += 2 * math.prod(out) * math.prod(kernel) // kernel[spec[0]]
    repeat = eqn.params["length"] if name == "scan" else 1
    total += repeat * sum(_matmul_flops(sub) for sub in _subjaxprs(eqn.params))
  return total


def _module_flops(module, *args, **kwargs) -> int:
  params = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
  apply = lambda p, a, k: module.apply(p, *a, **k)
  return _matmul_flops(jax.make_jaxpr(apply)(params, args, kwargs).jaxpr)


def test_layer_flops_equals_a_hand_count():
  # 3 tokens, width 4, MLP 5, 8-wide queries, 2-wide keys / values, gated MLP:
  # q, o: 2 * 3 * 4 * 8 each; k, v: 2 * 3 * 4 * 2 each; MLP 3 * 2 * 3 * 4 * 5; scores + AV 4 * 9 * 8
  assert aot_pod.layer_flops(3, 4, 5, q_width=8, kv_width=2, gated=True) == (
      2 * 192 + 2 * 48 + 360 + 288)
  # BERT / ViT: 2 t (4 d^2 + 2 d ff) + 4 t^2 d, the formula of the dinov2_roberta rows
  assert aot_pod.layer_flops(7, 6, 10) == 2 * 7 * (4 * 36 + 2 * 60) + 4 * 49 * 6


def test_dinov2_roberta_per_sample_flops_are_unchanged():
  flops = aot_pod.analytic_flops(aot_pod.recipe_config(32768, "", ""), 32768)
  # DINOv2-L at 256 px (324 patches + CLS), RoBERTa-L at 77 tokens, token projectors:
  # the figures of benchmarks/README.md's AOT table
  assert flops["image_encoder"] == 2 * 324 * 14 * 14 * 3 * 1024 + 24 * (
      2 * 325 * (4 * 1024 ** 2 + 2 * 1024 * 4096) + 4 * 325 ** 2 * 1024)
  assert flops["text_encoder"] == 24 * (2 * 77 * (4 * 1024 ** 2 + 2 * 1024 * 4096)
                                        + 4 * 77 ** 2 * 1024)
  assert flops["step"] / 1e15 == pytest.approx(8.5838, abs=1e-4)


@pytest.mark.parametrize("shape, model_type", [
    (dict(_VIT, mlp_ratio=2, model_type="dinov2"), "dinov2"),
    (dict(_VIT, num_register_tokens=3, model_type="dinov3_vit"), "dinov3_vit"),
    (dict(_VIT, num_register_tokens=1, use_gated_mlp=True, hidden_act="silu",
          model_type="dinov3_vit"), "dinov3_vit"),
    (dict(_VIT, model_type="siglip_vision_model"), "siglip")])
def test_vit_forward_matches_the_modules_matmuls(shape, model_type):
  cfg = vit.read_config(shape)
  size = 16  # a 4 x 4 grid, not the config's 3 x 3
  module = vit.VisionTransformer(cfg, size // cfg.patch_size, cfg.num_layers,
                                 attention_implementation="xla")
  counted = _module_flops(module, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  want = aot_pod.vit_forward(shape, model_type, size)
  assert want["tokens"] == 16 + cfg.num_prefix_tokens
  assert want["flops"] == counted


@pytest.mark.parametrize("overrides", [
    dict(model_type="qwen3", head_dim=8),  # heads x head_dim (32) wider than the model (16)
    dict(model_type="mistral"),
    dict(model_type="llama", num_key_value_heads=4)])
def test_decoder_forward_matches_the_modules_matmuls(overrides):
  shape = dict(_DECODER, **overrides)
  ids = jax.ShapeDtypeStruct((1, 9), jnp.int32)
  counted = _module_flops(decoder.build(shape), ids, ids)
  assert aot_pod.decoder_forward(shape, 9) == counted


def test_nvembed_forward_matches_the_modules_matmuls():
  latent = dict(num_latents=5, num_heads=2, head_dim=12)
  config = tiny.nvembed_config(dict(_DECODER, model_type="mistral"), **latent)
  ids = jax.ShapeDtypeStruct((1, 9), jnp.int32)
  counted = _module_flops(nvembed.build(config), ids, ids, pool_mask=ids)
  width, inner = _DECODER["hidden_size"], latent["num_heads"] * latent["head_dim"]
  latents_kv = 2 * latent["num_latents"] * width * 2 * inner  # once per call, not per text
  assert (aot_pod.decoder_forward(_DECODER, 9)
          + aot_pod.latent_pooler_forward(width, 9, **latent) + latents_kv) == counted


def test_new_configs_count_their_towers_at_the_recipe_shapes():
  dinov3 = aot_pod.analytic_flops(aot_pod.recipe_config(32768, "", "", "dinov3_qwen3"), 32768,
                                  "dinov3_qwen3")
  assert aot_pod.image_tower("dinov3_qwen3", 224)["tokens"] == 1 + 4 + 14 * 14
  assert dinov3["text_encoder"] == aot_pod.decoder_forward(aot_pod.QWEN3_EMBEDDING_06B, 77)
  siglip = aot_pod.analytic_flops(aot_pod.recipe_config(32768, "", "", "siglip2_nvembed"), 32768,
                                  "siglip2_nvembed")
  assert aot_pod.image_tower("siglip2_nvembed", 384)["tokens"] == 27 * 27
  # the 7B text tower dominates: NV-Embed's Mistral ~ 2 x 7.1e9 params x 77 tokens
  mistral_params = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
  assert aot_pod.decoder_forward(aot_pod.MISTRAL_7B, 77) == pytest.approx(
      2 * mistral_params * 77, rel=0.01)
  np.testing.assert_allclose(siglip["loss_per_step"], 6 * 32768 ** 2 * 1024)


def test_config_folders_build_the_published_towers(tmp_path):
  """The config-only folders give the real towers' parameter counts (the hub model cards':
  DINOv3 ViT-L/16 0.3B, Qwen3-Embedding-0.6B 0.6B with its 151,669 x 1,024 embedding, SigLIP
  So400m's vision tower 0.43B, NV-Embed-v2 7.85B), without weights."""
  from align_jax.model import two_tower

  def count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

  sizes = {}
  for name in ("dinov3_qwen3", "siglip2_nvembed"):
    image, text = aot_pod.write_config_folders(str(tmp_path), name)
    assert not [f for d in (image, text) for f in os.listdir(d) if f.endswith(".safetensors")]
    frozen = two_tower.build_model(aot_pod.recipe_config(256, image, text, name),
                                   abstract=True).frozen_params()
    sizes[name] = count(frozen["image"]), count(frozen["text"])
  dinov3, qwen3 = sizes["dinov3_qwen3"]
  siglip, nvembed_params = sizes["siglip2_nvembed"]
  assert dinov3 == pytest.approx(0.303e9, rel=0.01)
  assert qwen3 == pytest.approx(0.596e9, rel=0.01)
  assert siglip == pytest.approx(0.428e9, rel=0.01)
  assert nvembed_params == 7_851_016_192  # the hub page's safetensors count of nvidia/NV-Embed-v2


def test_config_names_carry_a_variant_and_a_model_axis():
  config = aot_pod.recipe_config(32768, "", "", "siglip2_nvembed:micro=4+model=8")
  assert config.model.encoder_micro_batch == 4
  assert tuple(config.mesh.axes) == ("data", "model") and tuple(config.mesh.shape) == (-1, 8)
  assert tuple(config.mesh.batch_axes) == ("data", "model")
  plain = aot_pod.recipe_config(32768, "", "", "siglip2_nvembed").mesh.frozen_param_rules
  moved = config.mesh.frozen_param_rules
  assert [rule for rule, _ in moved] == [rule for rule, _ in plain]
  for (_, before), (_, after) in zip(plain, moved):
    assert tuple(after) == tuple("model" if a == "data" else a for a in before)
    assert "data" in before and "data" not in after
  with pytest.raises(ValueError, match="choose one of dinov2_roberta"):
    aot_pod.recipe_config(32768, "", "", "siglip2:micro=4")
