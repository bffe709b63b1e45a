"""Ahead-of-time compiles of the pod recipes for TPU pods, from encoder config files alone.

    PYTHONPATH=/path/to/libtpu-site python benchmarks/aot_pod.py --out aot_pod.jsonl
    python benchmarks/aot_pod.py --config dinov3_qwen3 --entries v5e-256:32768 --out aot_pod.jsonl
    python benchmarks/aot_pod.py --table aot_pod.jsonl      # the markdown table of a results file

For a recipe of configs/ (``--config``, at each global batch and topology) compiles the real train
step with ``align_jax.train.aot.compile_train_step`` and records XLA's per-device memory, the
compile time (wall, and the compiling process's CPU seconds: the machine may be shared) and
analytic FLOPs:

- ``dinov2_roberta`` (default; the paper's): frozen DINOv2-L/14 at 256 px + RoBERTa-L at 77
  tokens, token projectors, encoder and projector micro-batches of 64 rows per device;
- ``dinov3_qwen3``: DINOv3 ViT-L/16 at 224 px (CLS + mean patch) + Qwen3-Embedding-0.6B (last
  token), SAIL's GLU heads, sigmoid loss;
- ``siglip2_nvembed``: SigLIP 2 So400m/14 at 384 px (its attention-pool head) + NV-Embed-v2 (a
  bidirectional Mistral-7B and its latent-attention pooler, FSDP-sharded), SAIL's heads;
- ``dinov2_llm``: DINOv2-L/14 at 224 px (CLS + mean patch) + E5-Mistral-7B (a causal Mistral-7B,
  last token, FSDP-sharded), SAIL's heads.

Encoders run in bfloat16. The encoder folders are written here (:func:`write_config_folders`):
each real tower's ``config.json`` (the published hub configs' shapes, sources next to them
below), its image processor, and a small tokenizer with the tower's special tokens or padding
side (only the ids' shapes matter); no weights exist, and none are needed. Rows carry ``config``
(rows without it are ``dinov2_roberta``'s).

Every row records the commit it was measured on (``commit``: the short hash, ``+dirty`` when
tracked files differ from it), printed and shown in the table, so a row older than the code is
visible as such.

Each (config, topology, batch) compiles in its own subprocess, one at a time, and its result is
appended to ``--out`` as one JSON line as soon as it finishes, so a long run keeps what it has
done and a second run with the same ``--out`` skips what is already there. Compiling for TPU
needs libtpu (``pip install 'jax[tpu]==0.10.2'``, or ``pip install --target DIR libtpu==0.0.42.*``
and ``PYTHONPATH=DIR``); no TPU is needed (``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` beside another
process that holds libtpu).

FLOPs are counted from the model shapes, per sample (XLA's ``cost_analysis`` counts a loop's body
once: a micro-batch loop's, and inside it a scanned layer stack's, so it undercounts a step many
times over). Counted: the frozen encoders' forward matmuls (:func:`layer_flops` per layer:
q and o ``d x heads*head_dim``, k and v ``d x kv_heads*head_dim`` (GQA), the MLP ``2 d ff``, or
``3 d ff`` gated (SwiGLU), attention scores and weighted sum ``4 tokens^2 heads*head_dim``) over
every token the tower runs (class token, registers and patches; the text length), plus the patch
embedding, SigLIP's attention-pool head and NV-Embed's latent-attention pooler (per token: to_q
and to_out ``d x 8*4096``, attention against 512 latents, the GEGLU MLP ``d -> 8 d``, ``4 d -> d``;
the latents' keys and values do not depend on the text and are computed once per encoder call:
not counted, < 0.01 % of a step); the projectors forward + backward (3x their forward matmuls:
model FLOPs; freeze-align's token projectors per token, SAIL's GLU heads per pooled feature; the
rematerialised micro-batches execute one more forward, not counted); and the loss's logits
(``2 B^2 E`` forward, ``4 B^2 E`` backward per step, softmax or sigmoid alike). LayerNorms,
activations, RoPE and softmaxes are left out (<1 %). tests/test_aot_pod.py checks the
formulas against the matmuls of align_jax's own encoder modules at tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TOPOLOGIES = ("v5e-64", "v5e-256", "v5p-128", "2xv5e-256")
BATCHES = (16384, 32768, 65536)
# Peak bf16 matmul rate and HBM per chip, by accelerator family (Cloud TPU documentation).
PEAK_FLOPS = {"v5e": 197e12, "v5litepod": 197e12, "v5p": 459e12, "v4": 275e12, "v6e": 918e12}
HBM_GIB = {"v5e": 16, "v5litepod": 16, "v5p": 95, "v4": 32, "v6e": 32}
PAPER_SAMPLES = 255e6  # ~15 epochs of the paper's 17M pairs
MFU = 0.4

# The encoders' config.json shapes, as published on the hub (fields equal to the transformers
# class defaults are left to them). facebook/dinov2-large and
# sentence-transformers/all-roberta-large-v1:
DINOV2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                    patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
                    qkv_bias=True, use_swiglu_ffn=False)
ROBERTA_LARGE = dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                     num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                     type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     layer_norm_eps=1e-5)
# facebook/dinov3-vitl16-pretrain-lvd1689m (DINOv3ViTConfig): ViT-L/16 as facebookresearch/dinov3's
# hub/backbones.py builds dinov3_vitl16 (embed 1024, depth 24, 16 heads, ffn_ratio 4 with the
# plain "mlp" FFN, 4 storage (register) tokens, RoPE base 100, layer scale, key bias masked) and
# its model card (1 CLS + 4 registers + 196 patches = 201 tokens at 224 px).
DINOV3_VITL16 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, patch_size=16, image_size=224, num_register_tokens=4,
                     rope_theta=100.0, layerscale_value=1.0, layer_norm_eps=1e-5,
                     hidden_act="gelu", query_bias=True, key_bias=False, value_bias=True,
                     proj_bias=True, mlp_bias=True, use_gated_mlp=False)
# Qwen/Qwen3-Embedding-0.6B (Qwen3Config; the Qwen3-0.6B-Base decoder, its model card: 28 layers,
# 16 query / 8 key-value heads of 128, q/k RMSNorms, RoPE theta 1e6, vocab 151,669, tied
# embeddings; bos = eos = pad-less <|endoftext|> 151643).
QWEN3_EMBEDDING_06B = dict(vocab_size=151669, hidden_size=1024, intermediate_size=3072,
                           num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                           head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                           rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False,
                           tie_word_embeddings=True, use_sliding_window=False,
                           bos_token_id=151643, eos_token_id=151643)
# google/siglip2-so400m-patch14-384 (SiglipConfig: the fixed-resolution SigLIP 2 checkpoints use
# SigLIP's architecture): the So400m/14 shapes of transformers' siglip conversion script
# (convert_siglip_to_hf.py, "so400m": width 1152, MLP 4304, 27 layers, 16 heads) at 384 px.
SIGLIP2_SO400M_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                             num_attention_heads=16, patch_size=14, image_size=384,
                             hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SIGLIP2_SO400M_TEXT = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                           num_attention_heads=16, vocab_size=256000, max_position_embeddings=64,
                           projection_size=1152, pad_token_id=0, eos_token_id=1,
                           bos_token_id=2)
# nvidia/NV-Embed-v2 (model type "nvembed"): text_config is Mistral-7B-v0.1's (MistralConfig:
# width 4096, 32 layers, 32 query / 8 key-value heads, SwiGLU 14336, vocab 32000), run
# bidirectionally; latent_attention_config: 512 latents of width 4096, 8 cross-attention heads of
# 4096 (inner width 32,768), as huggingface/candle's nvembed_v2/model.rs loads the checkpoint
# (latents [512, 4096], CrossAttention(dim 4096, heads 8, dim_head 4096), FeedForward mult 4).
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_theta=10000.0, sliding_window=4096, bos_token_id=1, eos_token_id=2)
NVEMBED_LATENT = dict(num_latents=512, num_heads=8, head_dim=4096)

CONFIGS = ("dinov2_roberta", "dinov3_qwen3", "siglip2_nvembed", "dinov2_llm")
DEFAULT_CONFIG = CONFIGS[0]


def source_commit(repo: str = REPO) -> str:
  """The short commit hash of ``repo``, with ``+dirty`` when tracked files differ from it.

  "unknown" outside a git checkout (e.g. an exported copy of the tree).
  """
  def git(*args):
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=60)
  head = git("rev-parse", "--short", "HEAD")
  if head.returncode:
    return "unknown"
  dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
  return head.stdout.strip() + ("+dirty" if dirty else "")


def _config_only(folder: str, config) -> str:
  """``folder`` with ``config`` (a transformers config or a config.json dict) as its config.json
  and no weights (a tiny checkpoint written there for its tokenizer loses its weights)."""
  for name in os.listdir(folder) if os.path.isdir(folder) else ():
    if name.endswith((".safetensors", ".msgpack", ".bin")):
      os.remove(os.path.join(folder, name))
  if isinstance(config, dict):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
  else:
    config.save_pretrained(folder)
  return folder


def write_config_folders(root: str, name: str = DEFAULT_CONFIG) -> tuple[str, str]:
  """The image and text encoder folders of config ``name``: each real tower's config.json (the
  shapes above), the image processor at the recipe's resolution, and a small tokenizer with the
  tower's padding side (only the ids' shapes matter). No weights."""
  import transformers
  from align_jax.testing import tiny_checkpoints as tiny
  image, text = os.path.join(root, f"{name}-image"), os.path.join(root, f"{name}-text")
  if name == "dinov2_roberta":
    transformers.Dinov2Config(**DINOV2_LARGE).save_pretrained(image)
    tiny.save_roberta_tokenizer(text)
    transformers.RobertaConfig(**ROBERTA_LARGE).save_pretrained(text)
  elif name == "dinov3_qwen3":
    size = DINOV3_VITL16["image_size"]
    _config_only(image, transformers.DINOv3ViTConfig(**DINOV3_VITL16))
    # (transformers' DINOv3 processor class needs torchvision: its preprocessor_config.json)
    with open(os.path.join(image, "preprocessor_config.json"), "w", encoding="utf-8") as f:
      json.dump({"image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True,
                 "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, f)
    # Qwen3-Embedding's tokenizer pads on the left; a tiny Llama-style one with that side.
    tiny.make_tiny_llama(text, save_format="flax", padding_side="left")
    _config_only(text, transformers.Qwen3Config(**QWEN3_EMBEDDING_06B))
  elif name == "siglip2_nvembed":
    size = SIGLIP2_SO400M_VISION["image_size"]
    _config_only(image, transformers.SiglipConfig(text_config=SIGLIP2_SO400M_TEXT,
                                                  vision_config=SIGLIP2_SO400M_VISION))
    transformers.SiglipImageProcessor(size={"height": size, "width": size}, resample=3,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3
                                      ).save_pretrained(image)
    # NV-Embed's tokenizer (BOS only, right padding): the tiny NV-Embed's; the real config.json.
    tiny.make_tiny_nvembed(text, save_format="flax")
    mistral = transformers.MistralConfig(**MISTRAL_7B).to_dict()
    _config_only(text, tiny.nvembed_config(mistral, **NVEMBED_LATENT))
  elif name == "dinov2_llm":
    transformers.Dinov2Config(**DINOV2_LARGE).save_pretrained(image)
    # intfloat/e5-mistral-7b-instruct: Mistral-7B-v0.1's shapes (MISTRAL_7B); a tiny tokenizer.
    tiny.make_tiny_mistral(text, save_format="flax")
    _config_only(text, transformers.MistralConfig(**MISTRAL_7B))
  else:
    raise ValueError(f"unknown --config {name!r}; choose one of {', '.join(CONFIGS)}")
  return image, text


def _parts(name: str) -> tuple[str, str, int]:
  """(recipe, variant, model axis size or 0) of "RECIPE[:VARIANT][+model=N]"."""
  head, _, model = name.partition("+model=")
  base, _, variant = head.partition(":")
  if base not in CONFIGS or (model and not model.isdigit()):
    raise ValueError(f"unknown --config {name!r}; choose one of {', '.join(CONFIGS)}, with an "
                     "optional :VARIANT and +model=N (e.g. siglip2_nvembed:micro=4, "
                     "siglip2_nvembed+model=8)")
  return base, variant, int(model or 0)


def base_config(name: str) -> str:
  """The recipe of a config name: "siglip2_nvembed" of "siglip2_nvembed:micro=4"."""
  return _parts(name)[0]


def use_model_axis(config, size: int) -> None:
  """Shards the frozen towers over a second mesh axis, "model", of ``size`` chips instead of
  "data": mesh (data, model) = (-1, ``size``), the batch split over both, the config's
  ``frozen_param_rules`` naming "model" where they named "data". With the towers' matrices split
  along the model width over "data" itself, XLA keeps each layer's activations of every chip's
  rows (the global micro-batch) on each chip; over a small "model" axis, only its ``size`` chips'
  rows (benchmarks/README.md, the siglip2_nvembed rows)."""
  config.mesh.axes, config.mesh.shape = ("data", "model"), (-1, size)
  config.mesh.batch_axes = ("data", "model")
  config.mesh.frozen_param_rules = tuple(
      (rule, tuple("model" if axis == "data" else axis for axis in spec))
      for rule, spec in config.mesh.frozen_param_rules)


def recipe_config(batch: int, image: str, text: str, name: str = DEFAULT_CONFIG):
  """configs/<name>.py at ``batch`` with the encoder folders ``image`` and ``text``; ``name`` may
  carry the config's variant after a colon, as ``main.py --config=configs/NAME.py:VARIANT``, and
  ``+model=N`` (:func:`use_model_axis`)."""
  import importlib
  base, variant, model = _parts(name)
  config = importlib.import_module(f"configs.{base}").get_config(
      f"batch={batch}" + (f",{variant}" if variant else ""))
  config.model.image_encoder, config.model.text_encoder = image, text
  if model:
    use_model_axis(config, model)
  return config


def layer_flops(tokens: int, width: int, ff: int, q_width: int | None = None,
                kv_width: int | None = None, gated: bool = False) -> float:
  """Matmul FLOPs of one transformer layer's forward pass over one sequence of ``tokens``.

  q and o project ``width`` <-> ``q_width`` (heads x head_dim; default ``width``), k and v
  ``width`` -> ``kv_width`` (key-value heads x head_dim, GQA; default ``q_width``); the MLP is
  two matrices ``width`` x ``ff`` (three with ``gated``: SwiGLU's gate, up, down); attention
  scores and the weighted sum are ``4 tokens^2 q_width``.
  """
  q = width if q_width is None else q_width
  kv = q if kv_width is None else kv_width
  projections = 2 * tokens * width * (2 * q + 2 * kv)
  mlp = 2 * tokens * width * ff * (3 if gated else 2)
  return projections + mlp + 4 * tokens * tokens * q


def _transformer_forward(layers: int, tokens: int, width: int, ff: int) -> float:
  """Matmul FLOPs of a (BERT / ViT style) transformer encoder's forward pass over one sequence."""
  return layers * layer_flops(tokens, width, ff)


def vit_forward(shape: dict, model_type: str, image_size: int) -> dict:
  """Forward FLOPs per image of a ViT of config.json ``shape`` (``model_type`` "dinov2",
  "dinov3_vit" or "siglip") at ``image_size``, and its tokens: the patch embedding, the layers over
  every token (class token, registers and patches), and SigLIP's attention-pool head (one probe
  query over the patches, then its MLP)."""
  d, p = shape["hidden_size"], shape["patch_size"]
  patches = (image_size // p) ** 2
  if model_type == "dinov2":
    prefix, ff, gated = 1, shape["mlp_ratio"] * d, False
  elif model_type == "dinov3_vit":
    prefix, ff = 1 + shape.get("num_register_tokens", 0), shape["intermediate_size"]
    gated = shape.get("use_gated_mlp", False)
  else:
    prefix, ff, gated = 0, shape["intermediate_size"], False
  tokens = patches + prefix
  flops = (2 * patches * p * p * shape.get("num_channels", 3) * d
           + shape["num_hidden_layers"] * layer_flops(tokens, d, ff, gated=gated))
  if model_type == "siglip":  # MAP head: q, o on 1 token; k, v on the patches; MLP on 1
    flops += 2 * 2 * d * d + 2 * 2 * patches * d * d + 4 * patches * d + 2 * 2 * d * ff
  return {"flops": flops, "tokens": tokens, "width": d}


def decoder_forward(shape: dict, tokens: int) -> float:
  """Forward FLOPs per text of ``tokens`` tokens of a decoder LLM of config.json ``shape``
  (Llama / Mistral / Qwen: GQA attention, SwiGLU MLP); embedding lookups cost nothing and the
  LM head is not run."""
  d = shape["hidden_size"]
  head_dim = shape.get("head_dim") or d // shape["num_attention_heads"]
  return shape["num_hidden_layers"] * layer_flops(
      tokens, d, shape["intermediate_size"], q_width=shape["num_attention_heads"] * head_dim,
      kv_width=shape.get("num_key_value_heads", shape["num_attention_heads"]) * head_dim,
      gated=True)


def latent_pooler_forward(width: int, tokens: int, num_latents: int, num_heads: int,
                          head_dim: int) -> float:
  """Forward FLOPs per text of NV-Embed's latent-attention pooler over ``tokens`` tokens: to_q
  and to_out (``width`` <-> heads x head_dim), scores and weighted sum against the latents, and
  the GEGLU MLP (``width`` -> 2 x 4 ``width`` -> ``width``). The latents' keys and values
  (``2 num_latents width 2 inner``) do not depend on the text: they are computed once per
  encoder call, not per text, and left out here."""
  inner = num_heads * head_dim
  return (2 * 2 * tokens * width * inner + 4 * tokens * num_latents * inner
          + 2 * tokens * width * 8 * width + 2 * tokens * 4 * width * width)


def image_tower(name: str, image_size: int) -> dict:
  """:func:`vit_forward` of config ``name``'s image tower."""
  shape, kind = {"dinov2_roberta": (DINOV2_LARGE, "dinov2"),
                 "dinov3_qwen3": (DINOV3_VITL16, "dinov3_vit"),
                 "siglip2_nvembed": (SIGLIP2_SO400M_VISION, "siglip"),
                 "dinov2_llm": (DINOV2_LARGE, "dinov2")}[name]
  return vit_forward(shape, kind, image_size)


def text_tower(name: str, tokens: int) -> dict:
  """Forward FLOPs per text of ``tokens`` tokens of config ``name``'s text tower, and its width:
  RoBERTa-L (MHA, GELU MLP), Qwen3-Embedding or E5-Mistral-7B (:func:`decoder_forward`) or
  NV-Embed-v2 (its Mistral and :func:`latent_pooler_forward`)."""
  if name == "dinov2_roberta":
    s = ROBERTA_LARGE
    flops = _transformer_forward(s["num_hidden_layers"], tokens, s["hidden_size"],
                                 s["intermediate_size"])
    return {"flops": flops, "width": s["hidden_size"]}
  if name == "dinov3_qwen3":
    return {"flops": decoder_forward(QWEN3_EMBEDDING_06B, tokens),
            "width": QWEN3_EMBEDDING_06B["hidden_size"]}
  if name == "dinov2_llm":
    return {"flops": decoder_forward(MISTRAL_7B, tokens), "width": MISTRAL_7B["hidden_size"]}
  d = MISTRAL_7B["hidden_size"]
  return {"flops": decoder_forward(MISTRAL_7B, tokens)
          + latent_pooler_forward(d, tokens, **NVEMBED_LATENT), "width": d}


def analytic_flops(config, batch: int, name: str = DEFAULT_CONFIG) -> dict:
  """FLOPs of one train step of config ``name``, from the model shapes (the module docstring)."""
  m = config.model
  e = m.embed_dim
  image = image_tower(base_config(name), m.image_size)
  text = text_tower(base_config(name), m.max_text_length)
  if m.image_projector == "freeze_align_image":
    # freeze-align token projector per token: linear d->E, mlp_in d->E, mlp_out E->E; text head
    # 2 E^2
    t_i, d_i, t_t, d_t = image["tokens"], image["width"], m.max_text_length, text["width"]
    image_projector = t_i * 2 * (2 * d_i * e + e * e)
    text_projector = t_t * 2 * (2 * d_t * e + e * e) + 2 * 2 * e * e
  else:  # SAIL's GLU heads on the pooled features: gate, value d -> k d; out k d -> E
    k = m.glu_hidden_mult
    pooled_i = image["width"] * (2 if m.image_pooling == "cls+mean_patch" else 1)
    image_projector = 2 * 2 * pooled_i * k * pooled_i + 2 * k * pooled_i * e
    text_projector = 2 * 2 * text["width"] * k * text["width"] + 2 * k * text["width"] * e
  per_sample = {"image_encoder": image["flops"], "text_encoder": text["flops"],
                "projectors_train": 3 * (image_projector + text_projector)}
  loss = 6 * batch * batch * e
  step = batch * sum(per_sample.values()) + loss
  return {**per_sample, "loss_per_step": loss, "step": step, "per_sample": step / batch}


def analytic_row(topology: str, batch: int, config=None, name: str = DEFAULT_CONFIG) -> dict:
  """The entry's numbers that need no compile: chips, FLOPs, roofline step time and run time."""
  from align_jax.train import aot
  config = recipe_config(batch, "", "", name) if config is None else config
  spec = aot.tpu_topology(topology)
  family = re.sub(r"^\d+x", "", topology).split("-")[0]
  flops = analytic_flops(config, batch, name)
  peak_rate = PEAK_FLOPS[family] * spec.num_devices  # one jax device per chip (megacore on v5p)
  step_seconds = flops["step"] / peak_rate
  return {"config": name, "topology": topology, "batch": batch, "num_devices": spec.num_devices,
          "num_slices": spec.num_slices, "hbm_gib": HBM_GIB[family],
          "analytic_flops_per_step": flops["step"], "analytic_flops": flops,
          "roofline_step_seconds": step_seconds, "roofline_samples_per_second": batch / step_seconds,
          "paper_hours_at_mfu": PAPER_SAMPLES * flops["per_sample"] / (MFU * peak_rate) / 3600}


def run_one(topology: str, batch: int, image: str, text: str, name: str = DEFAULT_CONFIG) -> dict:
  """Compiles one entry in this process; the row for the results file."""
  from align_jax.train import aot
  aot.prepare_process(topology)
  config = recipe_config(batch, image, text, name)
  row = {**analytic_row(topology, batch, config, name), "commit": source_commit(),
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  start = time.perf_counter()
  try:
    report = aot.compile_train_step(config, topology, check_memory=False)
  except aot.DoesNotFitError as error:
    return {**row, "compile_seconds": time.perf_counter() - start, "fits": False,
            "error": str(error)}
  return {**row, "num_processes": report.num_processes, "device_kind": report.device_kind,
          "mesh": report.mesh_shape, "compile_seconds": report.compile_seconds,
          "argument_bytes": report.argument_bytes, "output_bytes": report.output_bytes,
          "temp_bytes": report.temp_bytes, "alias_bytes": report.alias_bytes,
          "peak_bytes": report.peak_bytes, "xla_peak_bytes": report.xla_peak_bytes,
          "hbm_bytes": report.hbm_bytes, "fits": report.fits, "xla_flops_per_device": report.flops}


def _gib(n) -> str:
  return "—" if n is None else f"{n / 2**30:.2f}"


def _key(row: dict) -> tuple[str, str, int]:
  """(config, topology, batch) of a results row; rows without ``config`` are dinov2_roberta's."""
  return row.get("config", DEFAULT_CONFIG), row["topology"], row["batch"]


def table(rows: list[dict], entries: list[tuple[str, int]] = (),
          name: str = DEFAULT_CONFIG) -> str:
  """The markdown table of the results rows, plus analytic-only rows of config ``name`` for
  ``entries`` not compiled. The analytic columns are recomputed from the current formulas."""
  compiled = {_key(r) for r in rows}
  rows = [{**r, **analytic_row(r["topology"], r["batch"], name=_key(r)[0])} for r in rows]
  rows += [analytic_row(t, b, name=name) for t, b in entries if (name, t, b) not in compiled]
  order = {t: i for i, t in enumerate(TOPOLOGIES)}
  rows = sorted(rows, key=lambda r: (CONFIGS.index(base_config(r["config"])), r["config"],
                                     order.get(r["topology"], len(order)), r["batch"]))
  lines = ["| config | topology | chips | global batch | rows/chip | compile s | compile CPU s | "
           "args GiB | temp GiB | peak GiB | HBM GiB | fits | PFLOP/step (analytic) | "
           "XLA TFLOP/chip (1 loop body) | roofline step s | roofline samples/s | "
           "255M samples at 40 % MFU | commit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    chips = r["num_devices"]
    cpu = f"{r['cpu_seconds']:.0f}" if r.get("cpu_seconds") is not None else "—"
    head = (f"| {r['config']} | {r['topology']} | {chips} | {r['batch']:,} | "
            f"{r['batch'] // chips} | ")
    tail = (f"{r['analytic_flops_per_step'] / 1e15:.2f} | {{xla}} | "
            f"{r['roofline_step_seconds']:.3f} | {r['roofline_samples_per_second']:,.0f} | "
            f"{r['paper_hours_at_mfu']:.2f} h | {r.get('commit', '—')} |")
    if "compile_seconds" not in r:  # not compiled (yet)
      lines.append(head + f"not compiled | — | — | — | — | {r['hbm_gib']} | — | "
                   + tail.format(xla="—"))
    elif r.get("error"):
      lines.append(head + f"{r['compile_seconds']:.0f} | {cpu} | — | — | — | "
                   f"{r['hbm_gib']} | **no**: {r['error']} | " + tail.format(xla="—"))
    else:
      xla = r["xla_flops_per_device"]
      lines.append(head + f"{r['compile_seconds']:.0f} | {cpu} | {_gib(r['argument_bytes'])} | "
                   f"{_gib(r['temp_bytes'])} | {_gib(r['peak_bytes'])} | {r['hbm_gib']} | "
                   f"{'yes' if r['fits'] else '**no**'} | "
                   + tail.format(xla="—" if xla is None else f"{xla / 1e12:.1f}"))
  return "\n".join(lines)


def _read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _entries(args) -> list[tuple[str, int]]:
  if args.entries:
    return [(e.rsplit(":", 1)[0], int(e.rsplit(":", 1)[1])) for e in args.entries.split(",")]
  # every topology at the first batch first
  return [(t, int(b)) for b in args.batches.split(",") for t in args.topologies.split(",")]


def _children_cpu_seconds() -> float:
  """User + system CPU seconds of this process's finished children."""
  import resource
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help=f"the recipe in configs/ to compile: {', '.join(CONFIGS)}, with an "
                      "optional :VARIANT and +model=N (a second mesh axis for the frozen towers; "
                      "e.g. siglip2_nvembed:micro=4, siglip2_nvembed+model=8; default "
                      "%(default)s)")
  parser.add_argument("--out", default="aot_pod.jsonl", help="results file (JSON lines)")
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
  parser.add_argument("--entries", default="",
                      help="TOPOLOGY:BATCH,... to compile, in this order (default: every batch "
                      "of --batches on every topology of --topologies, batch by batch)")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
  parser.add_argument("--table", metavar="RESULTS",
                      help="print the table of results files (comma-separated: one table)")
  parser.add_argument("--one", nargs=4, metavar=("TOPOLOGY", "BATCH", "IMAGE", "TEXT"),
                      help=argparse.SUPPRESS)  # one entry, in this process (the driver's child)
  args = parser.parse_args()
  if args.table:
    entries = _entries(args) if args.entries else []
    print(table([r for path in args.table.split(",") for r in _read(path)], entries,
                args.config))
    return
  if args.one:
    topology, batch, image, text = args.one
    print("RESULT " + json.dumps(run_one(topology, int(batch), image, text, args.config)),
          flush=True)
    return
  entries = _entries(args)
  print(f"measuring commit {source_commit()}, config {args.config}", flush=True)
  done = {_key(r) for r in _read(args.out)}
  with tempfile.TemporaryDirectory() as root:
    image, text = write_config_folders(root, base_config(args.config))
    for topology, batch in entries:
      if (args.config, topology, batch) in done:
        continue
      print(f"{time.strftime('%H:%M:%S')} compiling {args.config} for {topology} at batch "
            f"{batch} ...", flush=True)
      cpu_before = _children_cpu_seconds()
      try:
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--config", args.config, "--one",
             topology, str(batch), image, text], capture_output=True, text=True,
            timeout=args.timeout, env=dict(os.environ, XLA_FLAGS=""))
      except subprocess.TimeoutExpired:
        print(f"  timed out after {args.timeout:.0f} s", flush=True)
        continue
      found = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
      if result.returncode or not found:
        print(f"  failed (exit {result.returncode}): {result.stderr[-3000:]}", flush=True)
        continue
      row = json.loads(found[-1][len("RESULT "):])
      row["cpu_seconds"] = _children_cpu_seconds() - cpu_before  # the child's, whole process
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
      print(f"  {row.get('error') or 'compiled'} in {row['compile_seconds']:.0f} s "
            f"({row['cpu_seconds']:.0f} CPU s); peak {_gib(row.get('peak_bytes'))} GiB, "
            f"temporaries {_gib(row.get('temp_bytes'))} GiB (commit {row['commit']})", flush=True)
  print(table(_read(args.out), entries, args.config))


if __name__ == "__main__":
  main()
