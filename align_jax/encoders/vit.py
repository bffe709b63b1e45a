"""Vision transformers owned by align_jax: DINOv2, DINOv3, ViT, CLIP and SigLIP vision towers.

One flax.linen module, :class:`VisionTransformer`, configured by :class:`VisionConfig`, covers the
five families; what differs is data, not code paths:

* the tokens before the patches: a class token (not SigLIP), register tokens (DINOv3);
* positions: a learned table added to the tokens (DINOv2, ViT, CLIP: class token + grid; SigLIP:
  grid only; resampled at load time for another grid, :mod:`align_jax.encoders.pos_embed`) or 2-D
  rotary embeddings of the patch centres (DINOv3, computed for whatever grid the input has);
* a LayerNorm before the blocks (CLIP's ``pre_layrnorm``); layer scale (DINOv2, DINOv3);
* the feed-forward: Linear-act-Linear, DINOv2's SwiGLU (``use_swiglu_ffn``) or DINOv3's gated MLP;
* SigLIP's attention-pool ("MAP") head, the tower's own pooled output (pooling ``map``).

The blocks are one ``nn.scan`` over params stacked on a leading layer axis, so the compiled program
holds one block whatever the depth; a module built with ``num_layers=k`` runs the first k blocks
(aligning hidden layer k runs only layers <= k) on the first k slices of the stacked params.
Attention is ``jax.nn.dot_product_attention`` (cuDNN's fused kernel on GPU where shapes allow).

:data:`FAMILIES` maps each ``model_type`` to its config reader and PyTorch name table
(:mod:`align_jax.encoders.weights`), checked against transformers' PyTorch models in
tests/test_enc_vision.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from align_jax.encoders import attention as attention_lib
from align_jax.encoders import weights as weights_lib
from align_jax.encoders.weights import Rule, linear, norm

ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Everything the module needs, read from a checkpoint's config.json (:func:`read_config`).

  Attributes:
    model_type: the family ("dinov2", "dinov3_vit", "vit", "clip", "siglip").
    hidden_size, num_layers, num_heads, intermediate_size, patch_size, num_channels: sizes.
    image_size: the checkpoint's native square input size (its position table's grid).
    layer_norm_eps: every LayerNorm's epsilon.
    act: the feed-forward activation (a key of :data:`ACTIVATIONS`).
    cls_token: a class token precedes the patches.
    num_registers: register tokens after the class token (DINOv3).
    pos_table: a learned position table (class token + grid, or the grid alone without one).
    rope_theta: DINOv3's 2-D RoPE base (None: no RoPE).
    pre_norm: a LayerNorm on the embeddings (CLIP).
    layer_scale: per-channel scales on both residual branches (DINOv2, DINOv3).
    mlp: "mlp", "swiglu" (DINOv2's fused SwiGLU) or "gated" (DINOv3's gate/up/down).
    qkv_bias: biases of the q, k, v and output projections.
    mlp_bias: biases of the feed-forward projections.
    patch_bias: the patch projection has a bias (not CLIP's).
    head: SigLIP's attention-pool head is present.
  """
  model_type: str
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  patch_size: int
  image_size: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  act: str = "gelu"
  cls_token: bool = True
  num_registers: int = 0
  pos_table: bool = True
  rope_theta: float | None = None
  pre_norm: bool = False
  layer_scale: bool = False
  mlp: str = "mlp"
  qkv_bias: tuple[bool, bool, bool, bool] = (True, True, True, True)
  mlp_bias: bool = True
  patch_bias: bool = True
  head: bool = False

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch grid (class token + registers)."""
    return int(self.cls_token) + self.num_registers

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


# --- config readers (config.json dicts; transformers omits values equal to its class defaults) ---

def _get(config: dict[str, Any], defaults: dict[str, Any], key: str) -> Any:
  return config.get(key, defaults[key])


_DINOV2 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
               hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14,
               num_channels=3, qkv_bias=True, use_swiglu_ffn=False)
_DINOV3 = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
               hidden_act="gelu", layer_norm_eps=1e-5, rope_theta=100.0, image_size=224,
               patch_size=16, num_channels=3, query_bias=True, key_bias=False, value_bias=True,
               proj_bias=True, mlp_bias=True, use_gated_mlp=False, num_register_tokens=0)
_VIT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
            qkv_bias=True)
_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             num_channels=3, patch_size=32, image_size=224, layer_norm_eps=1e-5,
             hidden_act="quick_gelu")
_SIGLIP = dict(_CLIP, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


def _common(c: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
  return dict(hidden_size=int(_get(c, d, "hidden_size")),
              num_layers=int(_get(c, d, "num_hidden_layers")),
              num_heads=int(_get(c, d, "num_attention_heads")),
              patch_size=int(_get(c, d, "patch_size")), image_size=int(_get(c, d, "image_size")),
              num_channels=int(_get(c, d, "num_channels")),
              layer_norm_eps=float(_get(c, d, "layer_norm_eps")), act=str(_get(c, d, "hidden_act")))


def _dinov2_config(c: dict[str, Any]) -> VisionConfig:
  base = _common(c, _DINOV2)
  hidden = int(base["hidden_size"] * _get(c, _DINOV2, "mlp_ratio"))
  swiglu = bool(_get(c, _DINOV2, "use_swiglu_ffn"))
  if swiglu:
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
  bias = bool(_get(c, _DINOV2, "qkv_bias"))
  return VisionConfig("dinov2", intermediate_size=hidden, layer_scale=True,
                      mlp="swiglu" if swiglu else "mlp", qkv_bias=(bias, bias, bias, True), **base)


def _dinov3_config(c: dict[str, Any]) -> VisionConfig:
  d = _DINOV3
  return VisionConfig(
    "dinov3_vit", intermediate_size=int(_get(c, d, "intermediate_size")),
    num_registers=int(_get(c, d, "num_register_tokens")), pos_table=False,
    rope_theta=float(_get(c, d, "rope_theta")), layer_scale=True,
    mlp="gated" if _get(c, d, "use_gated_mlp") else "mlp",
    qkv_bias=tuple(bool(_get(c, d, k)) for k in ("query_bias", "key_bias", "value_bias",
                                                 "proj_bias")),
    mlp_bias=bool(_get(c, d, "mlp_bias")), **_common(c, d))


def _vit_config(c: dict[str, Any]) -> VisionConfig:
  bias = bool(_get(c, _VIT, "qkv_bias"))
  return VisionConfig("vit", intermediate_size=int(_get(c, _VIT, "intermediate_size")),
                      qkv_bias=(bias, bias, bias, True), **_common(c, _VIT))


def _vision_sub(c: dict[str, Any], tower_type: str) -> dict[str, Any]:
  """The vision sub-config of a two-tower checkpoint (CLIP, SigLIP), or the config itself."""
  return c.get("vision_config") or {} if c.get("model_type") != tower_type else c


def _clip_config(c: dict[str, Any]) -> VisionConfig:
  v = _vision_sub(c, "clip_vision_model")
  return VisionConfig("clip", intermediate_size=int(_get(v, _CLIP, "intermediate_size")),
                      pre_norm=True, patch_bias=False, **_common(v, _CLIP))


def _siglip_config(c: dict[str, Any]) -> VisionConfig:
  v = _vision_sub(c, "siglip_vision_model")
  return VisionConfig("siglip", intermediate_size=int(_get(v, _SIGLIP, "intermediate_size")),
                      cls_token=False, head=bool(v.get("vision_use_head", True)),
                      **_common(v, _SIGLIP))


# --- name tables: PyTorch state-dict names -> Flax paths -------------------------------------------

def _block_rules(cfg: VisionConfig, layer: str, names: dict[str, str]) -> list[Rule]:
  """Per-layer rules; ``names`` gives the family's PyTorch names of each part."""
  L = ("layers",)
  q, k, v, o = cfg.qkv_bias
  rules = (norm(f"{layer}.{names['norm1']}", L + ("norm1",))
           + linear(f"{layer}.{names['q']}", L + ("attn", "q"), q)
           + linear(f"{layer}.{names['k']}", L + ("attn", "k"), k)
           + linear(f"{layer}.{names['v']}", L + ("attn", "v"), v)
           + linear(f"{layer}.{names['o']}", L + ("attn", "o"), o)
           + norm(f"{layer}.{names['norm2']}", L + ("norm2",)))
  for part in ("fc1", "fc2", "gate", "up", "down", "in", "out"):
    if part in names:
      rules += linear(f"{layer}.{names[part]}", L + ("mlp", part), cfg.mlp_bias)
  if cfg.layer_scale:
    rules += [Rule(f"{layer}.layer_scale1.lambda1", L + ("ls1",)),
              Rule(f"{layer}.layer_scale2.lambda1", L + ("ls2",))]
  return rules


def _hf_vit_rules(cfg: VisionConfig) -> list[Rule]:
  """DINOv2 and ViT (the same module names, DINOv2 adds layer scale and its MLP names)."""
  names = dict(q="attention.attention.query", k="attention.attention.key",
               v="attention.attention.value", o="attention.output.dense")
  if cfg.model_type == "dinov2":
    names.update(norm1="norm1", norm2="norm2")
    names.update(dict(fc1="mlp.fc1", fc2="mlp.fc2") if cfg.mlp == "mlp"
                 else {"in": "mlp.weights_in", "out": "mlp.weights_out"})
  else:
    names.update(norm1="layernorm_before", norm2="layernorm_after", fc1="intermediate.dense",
                 fc2="output.dense")
  return ([Rule("embeddings.cls_token", ("embed", "cls")),
           Rule("embeddings.position_embeddings", ("embed", "pos")),
           Rule("embeddings.patch_embeddings.projection.weight", ("embed", "patch", "kernel"),
                "conv"),
           Rule("embeddings.patch_embeddings.projection.bias", ("embed", "patch", "bias"))]
          + _block_rules(cfg, "encoder.layer.{i}", names) + norm("layernorm", ("norm",)))


def _dinov3_rules(cfg: VisionConfig) -> list[Rule]:
  names = dict(norm1="norm1", norm2="norm2", q="attention.q_proj", k="attention.k_proj",
               v="attention.v_proj", o="attention.o_proj")
  names.update(dict(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
               if cfg.mlp == "gated" else dict(fc1="mlp.up_proj", fc2="mlp.down_proj"))
  return ([Rule("embeddings.cls_token", ("embed", "cls")),
           Rule("embeddings.register_tokens", ("embed", "registers")),
           Rule("embeddings.patch_embeddings.weight", ("embed", "patch", "kernel"), "conv"),
           Rule("embeddings.patch_embeddings.bias", ("embed", "patch", "bias"))]
          + _block_rules(cfg, "layer.{i}", names) + norm("norm", ("norm",)))


def _clip_siglip_rules(cfg: VisionConfig) -> list[Rule]:
  """CLIP and SigLIP vision towers (SigLIP's MAP head). Two-tower checkpoints and transformers 4's
  ``*VisionModel`` put ``vision_model.`` before these names, transformers 5's ``*VisionModel``
  nothing; :func:`align_jax.encoders.weights.find_prefix` finds which."""
  p = ""
  names = dict(norm1="layer_norm1", norm2="layer_norm2", q="self_attn.q_proj",
               k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj", fc1="mlp.fc1",
               fc2="mlp.fc2")
  rules = [Rule(f"{p}embeddings.patch_embedding.weight", ("embed", "patch", "kernel"), "conv"),
           Rule(f"{p}embeddings.patch_embedding.bias", ("embed", "patch", "bias")),
           Rule(f"{p}embeddings.position_embedding.weight", ("embed", "pos"), unsqueeze=1),
           Rule(f"{p}embeddings.class_embedding", ("embed", "cls"), unsqueeze=2)]
  rules += norm(f"{p}pre_layrnorm", ("pre_norm",))
  rules += _block_rules(cfg, p + "encoder.layers.{i}", names) + norm(f"{p}post_layernorm", ("norm",))
  h = f"{p}head."
  rules += [Rule(f"{h}probe", ("head", "probe"))]
  for j, part in enumerate("qkv"):
    rules += [Rule(f"{h}attention.in_proj_weight", ("head", part, "kernel"), "linear", (j, 3)),
              Rule(f"{h}attention.in_proj_bias", ("head", part, "bias"), chunk=(j, 3))]
  rules += (linear(f"{h}attention.out_proj", ("head", "o")) + norm(f"{h}layernorm", ("head", "norm"))
            + linear(f"{h}mlp.fc1", ("head", "fc1")) + linear(f"{h}mlp.fc2", ("head", "fc2")))
  return rules


@dataclasses.dataclass(frozen=True)
class Family:
  """A vision family: its config reader, name table and default pooling."""
  read_config: Callable[[dict[str, Any]], VisionConfig]
  rules: Callable[[VisionConfig], list[Rule]]
  default_pooling: str


FAMILIES: dict[str, Family] = {
  "dinov2": Family(_dinov2_config, _hf_vit_rules, "cls"),
  "dinov3_vit": Family(_dinov3_config, _dinov3_rules, "cls"),
  "vit": Family(_vit_config, _hf_vit_rules, "cls"),
  "clip": Family(_clip_config, _clip_siglip_rules, "cls"),
  "clip_vision_model": Family(_clip_config, _clip_siglip_rules, "cls"),
  "siglip": Family(_siglip_config, _clip_siglip_rules, "map"),
  "siglip_vision_model": Family(_siglip_config, _clip_siglip_rules, "map"),
}


def read_config(config: dict[str, Any]) -> VisionConfig:
  """The :class:`VisionConfig` of a config.json dict; ValueError naming the supported families."""
  model_type = config.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"unsupported image encoder family {model_type!r}; supported: "
                     f"{', '.join(FAMILIES)}")
  return FAMILIES[model_type].read_config(config)


def rules(cfg: VisionConfig) -> list[Rule]:
  """The PyTorch -> Flax name table of ``cfg``'s family."""
  return FAMILIES[cfg.model_type].rules(cfg)


# --- the module ----------------------------------------------------------------------------------

def rope_tables(cfg: VisionConfig, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
  """DINOv3's (cos, sin) [grid_h * grid_w, head_dim] for the patch centres in [-1, 1] (float32).

  Each axis's coordinate is ``2 * (index + 0.5) / grid - 1``; the angles ``2 pi coord / theta^(4j /
  head_dim)`` of y then x (head_dim / 4 frequencies each) fill half the head, repeated twice.
  """
  inv_freq = 1.0 / cfg.rope_theta ** np.arange(0, 1, 4 / cfg.head_dim, dtype=np.float32)
  ys = (np.arange(0.5, grid_h, dtype=np.float32) / grid_h) * 2.0 - 1.0
  xs = (np.arange(0.5, grid_w, dtype=np.float32) / grid_w) * 2.0 - 1.0
  coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
  angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).reshape(len(coords), -1)
  angles = np.tile(angles, 2).astype(np.float32)
  return np.cos(angles), np.sin(angles)


def _apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """RoPE on the last ``len(cos)`` tokens of x [B, T, H, hd] (prefix tokens unrotated)."""
  prefix = x.shape[1] - cos.shape[0]
  patches = x[:, prefix:].astype(jnp.float32)
  half = patches.shape[-1] // 2
  rotated = jnp.concatenate([-patches[..., half:], patches[..., :half]], axis=-1)
  patches = patches * cos[None, :, None] + rotated * sin[None, :, None]
  return jnp.concatenate([x[:, :prefix], patches.astype(x.dtype)], axis=1)


class Attention(nn.Module):
  """Multi-head self-attention (optionally with RoPE on the patch tokens)."""
  cfg: VisionConfig
  dtype: Any = jnp.float32
  implementation: str | None = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, rope: Any) -> jnp.ndarray:
    cfg = self.cfg
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)
    q, k, v = (split(nn.Dense(d, use_bias=bias, dtype=self.dtype, name=n)(x))
               for n, bias in zip("qkv", cfg.qkv_bias[:3]))
    if rope is not None:
      q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
    out = attention_lib.attention(q, k, v, implementation=self.implementation).reshape(b, t, d)
    return nn.Dense(d, use_bias=cfg.qkv_bias[3], dtype=self.dtype, name="o")(out)


class MLP(nn.Module):
  """The block's feed-forward: "mlp", "swiglu" (DINOv2) or "gated" (DINOv3)."""
  cfg: VisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    dense = functools.partial(nn.Dense, use_bias=cfg.mlp_bias, dtype=self.dtype)
    width, act = cfg.intermediate_size, ACTIVATIONS[cfg.act]
    if cfg.mlp == "swiglu":
      x1, x2 = jnp.split(dense(2 * width, name="in")(x), 2, axis=-1)
      return dense(cfg.hidden_size, name="out")(jax.nn.silu(x1) * x2)
    if cfg.mlp == "gated":
      hidden = act(dense(width, name="gate")(x)) * dense(width, name="up")(x)
      return dense(cfg.hidden_size, name="down")(hidden)
    return dense(cfg.hidden_size, name="fc2")(act(dense(width, name="fc1")(x)))


def _layer_norm(cfg: VisionConfig, dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name=name)


class Block(nn.Module):
  """One pre-norm transformer block; ``(x, rope) -> (x, x or None)`` for ``nn.scan``."""
  cfg: VisionConfig
  dtype: Any = jnp.float32
  collect: bool = False
  implementation: str | None = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, rope: Any) -> tuple[jnp.ndarray, Any]:
    cfg = self.cfg
    ones = lambda _, shape: jnp.ones(shape, jnp.float32)
    h = Attention(cfg, self.dtype, self.implementation, name="attn")(_layer_norm(cfg, self.dtype, "norm1")(x), rope)
    if cfg.layer_scale:
      h = h * self.param("ls1", ones, (cfg.hidden_size,)).astype(self.dtype)
    x = x + h
    h = MLP(cfg, self.dtype, name="mlp")(_layer_norm(cfg, self.dtype, "norm2")(x))
    if cfg.layer_scale:
      h = h * self.param("ls2", ones, (cfg.hidden_size,)).astype(self.dtype)
    x = x + h
    return x, (x if self.collect else None)


class Embeddings(nn.Module):
  """Patch projection, class / register tokens and the learned position table."""
  cfg: VisionConfig
  grid: int  # the position table's patch grid side (the run size's)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    p, d = cfg.patch_size, cfg.hidden_size
    init = nn.initializers.normal(0.02)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=cfg.patch_bias,
                dtype=self.dtype, name="patch")(pixels.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, d)
    prefix = []
    if cfg.cls_token:
      prefix.append(self.param("cls", init, (1, 1, d)))
    if cfg.num_registers:
      prefix.append(self.param("registers", init, (1, cfg.num_registers, d)))
    if cfg.pos_table:
      pos = self.param("pos", init, (1, int(cfg.cls_token) + self.grid ** 2, d))
      if cfg.cls_token:
        prefix[0] = prefix[0] + pos[:, :1]
      x = x + pos[:, int(cfg.cls_token):].astype(self.dtype)
    prefix = [jnp.broadcast_to(t.astype(self.dtype), (b,) + t.shape[1:]) for t in prefix]
    return jnp.concatenate(prefix + [x], axis=1)


class MAPHead(nn.Module):
  """SigLIP's attention-pool head: a learned probe attends over the tokens, then a residual MLP."""
  cfg: VisionConfig
  dtype: Any = jnp.float32
  implementation: str | None = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    b, t, d = x.shape
    probe = self.param("probe", nn.initializers.normal(0.02), (1, 1, d)).astype(self.dtype)
    heads = lambda y, n: y.reshape(b, n, cfg.num_heads, cfg.head_dim)
    q = heads(jnp.broadcast_to(nn.Dense(d, dtype=self.dtype, name="q")(probe), (b, 1, d)), 1)
    k = heads(nn.Dense(d, dtype=self.dtype, name="k")(x), t)
    v = heads(nn.Dense(d, dtype=self.dtype, name="v")(x), t)
    out = nn.Dense(d, dtype=self.dtype, name="o")(
      attention_lib.attention(q, k, v, implementation=self.implementation).reshape(b, 1, d))
    h = _layer_norm(cfg, self.dtype, "norm")(out)
    act = ACTIVATIONS[cfg.act]
    h = nn.Dense(d, dtype=self.dtype, name="fc2")(
      act(nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(h)))
    return (out + h)[:, 0]


class VisionTransformer(nn.Module):
  """The vision tower: pixels NHWC -> hidden states, running the first ``num_layers`` blocks.

  Attributes:
    cfg: the family config.
    grid: patch grid side of the position table (``image_size // patch_size`` at the run size).
    num_layers: blocks to run (``cfg.num_layers`` for the final output); the params hold
      ``num_layers`` stacked slices (:func:`slice_layers`).
    collect: also return every hidden state (stacked, [num_layers + 1, B, T, D]).
    dtype: compute dtype.
    attention_implementation: "auto" (cuDNN on GPU where allowed, see
      :mod:`align_jax.encoders.attention`), "cudnn", "xla" or None.

  ``__call__`` returns ``{"hidden": [n + 1, B, T, D] (when collect), "last": the residual stream
  after the last block run, "final": the final LayerNorm of it (all blocks run), "map": SigLIP's
  pooled head output (all blocks run, head present)}``.
  """
  cfg: VisionConfig
  grid: int
  num_layers: int
  collect: bool = False
  dtype: Any = jnp.float32
  attention_implementation: str | None = "auto"

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> dict[str, jnp.ndarray]:
    cfg = self.cfg
    x = Embeddings(cfg, self.grid, self.dtype, name="embed")(pixels)
    if cfg.pre_norm:
      x = _layer_norm(cfg, self.dtype, "pre_norm")(x)
    rope = None
    if cfg.rope_theta is not None:
      gh, gw = pixels.shape[1] // cfg.patch_size, pixels.shape[2] // cfg.patch_size
      rope = tuple(jnp.asarray(t) for t in rope_tables(cfg, gh, gw))
    out: dict[str, jnp.ndarray] = {}
    first = x
    if self.num_layers > 0:
      blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=nn.broadcast, length=self.num_layers)
      x, stacked = blocks(cfg, self.dtype, self.collect, self.attention_implementation,
                          name="layers")(x, rope)
      if self.collect:
        out["hidden"] = jnp.concatenate([first[None], stacked], axis=0)
    elif self.collect:
      out["hidden"] = first[None]
    out["last"] = x
    if self.num_layers == cfg.num_layers:
      out["final"] = _layer_norm(cfg, self.dtype, "norm")(x)
      if cfg.head:
        out["map"] = MAPHead(cfg, self.dtype, self.attention_implementation,
                             name="head")(out["final"])
    return out


def slice_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
  """The params of a module running the first ``num_layers`` blocks (stacked slices cut)."""
  out = dict(params)
  if "layers" in params:
    out["layers"] = jax.tree.map(lambda x: x[:num_layers], params["layers"])
  return out


def abstract_params(cfg: VisionConfig, grid: int) -> dict[str, Any]:
  """Shapes of the full module's float32 params (a position table of ``grid`` x ``grid``)."""
  module = VisionTransformer(cfg, grid, cfg.num_layers)
  size = grid * cfg.patch_size
  pixels = jax.ShapeDtypeStruct((1, size, size, cfg.num_channels), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), pixels)["params"]


def load_params(state: dict[str, np.ndarray], cfg: VisionConfig, dtype: Any = None,
                grid: int | None = None) -> dict[str, Any]:
  """Host numpy params of ``cfg``'s module from a PyTorch-named state dict.

  Args:
    state: :func:`align_jax.encoders.weights.read_state_dict` of the checkpoint.
    cfg: its config.
    dtype: floating params' dtype (None: float32).
    grid: patch grid side to run at; the position table is resampled to it as PyTorch's
      ``interpolate_pos_encoding`` does (bicubic, once, here) when it differs from the
      checkpoint's ``image_size // patch_size``.
  """
  from align_jax.encoders import pos_embed
  native = cfg.image_size // cfg.patch_size
  grid = native if grid is None else grid
  params = weights_lib.to_flax(state, rules(cfg), cfg.num_layers, abstract_params(cfg, native))
  if grid != native and cfg.pos_table:
    params["embed"]["pos"] = pos_embed.resample_position_embeddings(
      params["embed"]["pos"], (grid, grid), num_prefix_tokens=int(cfg.cls_token))
  if dtype is not None:
    params = jax.tree.map(lambda x: np.asarray(x, dtype), params)
  return params
