"""Decoder LLMs as frozen text encoders: Llama, Mistral, Qwen2, Qwen3 and Gemma in one module.

The five families are one pre-norm transformer with switches read from ``config.json``:

=========  ==========================================================================
llama      RMSNorm, SwiGLU, RoPE (incl. Llama-3 ``rope_scaling``), optional
           ``attention_bias`` / ``mlp_bias``, grouped-query attention
mistral    Llama + ``sliding_window`` (query i sees keys i - w < j <= i)
qwen2      Llama + biases on q / k / v (not o)
qwen3      Llama + RMSNorm of each query / key head before RoPE (``q_norm`` / ``k_norm``)
gemma      embeddings times sqrt(hidden_size), RMSNorm scaled by (1 + w), ``hidden_act``
           (GeGLU), a stored ``head_dim``
=========  ==========================================================================

Position ids count real tokens (``cumsum(mask) - 1``), so with left or right padding a text's
features equal those of the text alone. ``bidirectional=True`` drops the causal mask (LLM2Vec /
NV-Embed style embedders; as those, it also drops Mistral's sliding window). Layers are stacked
and run under ``nn.scan``; ``num_layers_to_run=k`` builds (and :func:`load_params` loads) only
the first k layers.

Use::

  cfg = decoder.read_config(weights.read_config(folder))           # DecoderConfig
  model = decoder.build(cfg, dtype=jnp.float32)                      # flax.linen module
  params = decoder.load_params(weights.read_state_dict(folder), cfg)  # nested numpy params
  out = model.apply({"params": params}, input_ids, attention_mask, output_hidden_states=True)
  features = decoder.pool(out["last_hidden_state"], attention_mask, "last")

``out["hidden_states"][i]`` is transformers' ``hidden_states[i]`` (0 = embeddings; the last entry,
when every layer runs, is after the final norm, as transformers returns it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from align_jax.encoders import pooling as pooling_lib
from align_jax.encoders import rope
from align_jax.encoders import stack
from align_jax.encoders import weights as weights_lib
from align_jax.encoders.activations import activation
from align_jax.encoders.attention import attention
from align_jax.encoders.weights import Rule, linear

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
POOLINGS = ("last", "mean", "tokens")
DEFAULT_POOLING = "last"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The settings the forward pass reads, derived from a transformers ``config.json`` dict."""
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  eps: float
  act: str
  qkv_bias: bool
  o_bias: bool
  mlp_bias: bool
  qk_norm: bool
  gemma: bool
  sliding_window: int | None
  inv_freq: tuple[float, ...]
  attention_factor: float

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "DecoderConfig":
    """Reads a config dict; ValueError in one line for a model type or setting not supported."""
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
      raise ValueError(f"decoder model_type {kind!r} is not supported; supported: "
                       f"{', '.join(MODEL_TYPES)}")
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    window = None
    if kind == "mistral":
      window = config.get("sliding_window")
    elif kind in ("qwen2", "qwen3") and config.get("use_sliding_window"):
      layer_types = config.get("layer_types") or []
      if any(t == "sliding_attention" for t in layer_types):
        raise ValueError(f"{kind} with use_sliding_window (per-layer windows) is not supported; "
                         "set use_sliding_window false in config.json (the released "
                         "Qwen2 / Qwen3 embedders use full attention)")
    inv_freq, factor = rope.inverse_frequencies(dict(config, head_dim=head_dim))
    bias = bool(config.get("attention_bias", False))
    act = config.get("hidden_act") or config.get("hidden_activation") or "silu"
    return cls(
        model_type=kind, vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]), intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=head_dim,
        eps=float(config.get("rms_norm_eps", 1e-6)), act=act,
        qkv_bias=True if kind == "qwen2" else bias, o_bias=False if kind == "qwen2" else bias,
        mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=kind == "qwen3",
        gemma=kind == "gemma", sliding_window=None if window is None else int(window),
        inv_freq=tuple(float(f) for f in inv_freq), attention_factor=float(factor))


class RMSNorm(nn.Module):
  """RMS norm with float32 statistics: ``w * x̂`` (Llama) or ``(1 + w) * x̂`` (Gemma)."""
  eps: float
  gemma: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.gemma:
      return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class DecoderLayer(nn.Module):
  """One pre-norm block: attention (RoPE, GQA, optional q/k norm) then the gated MLP."""
  config: DecoderConfig
  dtype: Any
  causal: bool
  keep_hidden: bool
  implementation: str | None = "auto"

  @nn.compact
  def __call__(self, x, mask, cos, sin):
    c = self.config
    batch, length = x.shape[:2]

    def dense(name: str, features: int, bias: bool) -> nn.Dense:
      return nn.Dense(features, use_bias=bias, dtype=self.dtype, name=name)

    h = RMSNorm(c.eps, c.gemma, name="input_layernorm")(x)
    q = dense("q_proj", c.num_heads * c.head_dim, c.qkv_bias)(h)
    k = dense("k_proj", c.num_kv_heads * c.head_dim, c.qkv_bias)(h)
    v = dense("v_proj", c.num_kv_heads * c.head_dim, c.qkv_bias)(h)
    q = q.reshape(batch, length, c.num_heads, c.head_dim)
    k = k.reshape(batch, length, c.num_kv_heads, c.head_dim)
    v = v.reshape(batch, length, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      q = RMSNorm(c.eps, name="q_norm")(q)
      k = RMSNorm(c.eps, name="k_norm")(k)
    q = rope.apply_rotary(q, cos, sin)
    k = rope.apply_rotary(k, cos, sin)
    out = attention(q, k, v, mask=mask, causal=self.causal,
                    sliding_window=c.sliding_window if self.causal else None,
                    scale=c.head_dim ** -0.5, implementation=self.implementation)
    x = x + dense("o_proj", c.hidden_size, c.o_bias)(out.reshape(batch, length, -1))
    h = RMSNorm(c.eps, c.gemma, name="post_attention_layernorm")(x)
    gate = activation(c.act)(dense("gate_proj", c.intermediate_size, c.mlp_bias)(h))
    up = dense("up_proj", c.intermediate_size, c.mlp_bias)(h)
    x = x + dense("down_proj", c.hidden_size, c.mlp_bias)(gate * up)
    return x, (x if self.keep_hidden else None)


def position_ids(attention_mask: jnp.ndarray) -> jnp.ndarray:
  """Position ids [B, L] counting real tokens from 0 (``cumsum(mask) - 1``; 0 on leading pads)."""
  mask = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


class DecoderModel(nn.Module):
  """Embeddings, ``num_layers_to_run`` scanned layers and (when all run) the final norm.

  Attributes:
    config: the :class:`DecoderConfig`.
    dtype: compute dtype (float32 or bfloat16); norms and softmax keep float32 statistics.
    num_layers_to_run: None = every layer; k = the first k (hidden layer k, no final norm
      unless k is the last layer).
    bidirectional: attend to every real token (LLM2Vec / NV-Embed) instead of causally (and
      without a sliding window, as their bidirectional masks).
    attention_implementation: "auto" (cuDNN on GPU where allowed, else XLA; see
      :mod:`align_jax.encoders.attention`), "cudnn", "xla" or None.
  """
  config: DecoderConfig
  dtype: Any = jnp.float32
  num_layers_to_run: int | None = None
  bidirectional: bool = False
  attention_implementation: str | None = "auto"

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray,
               output_hidden_states: bool = False) -> dict[str, Any]:
    c = self.config
    count = stack.layers_to_run(c.num_layers, self.num_layers_to_run)
    x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed_tokens")(input_ids)
    if c.gemma:
      x = x * jnp.asarray(math.sqrt(c.hidden_size), dtype=x.dtype)
    cos, sin = rope.cos_sin(np.asarray(c.inv_freq, np.float32), c.attention_factor,
                            position_ids(attention_mask))
    hidden = [x]
    if count:
      layers = stack.scanned(DecoderLayer, count, 3)
      x, stacked = layers(c, self.dtype, not self.bidirectional, output_hidden_states,
                          self.attention_implementation, name="layers")(
                              x, attention_mask, cos, sin)
      if output_hidden_states:
        hidden += [stacked[i] for i in range(count)]
    if count == c.num_layers:
      x = RMSNorm(c.eps, c.gemma, name="norm")(x)
      hidden[-1] = x
    return {"last_hidden_state": x,
            "hidden_states": tuple(hidden) if output_hidden_states else None}


def read_config(config: Mapping[str, Any] | DecoderConfig) -> DecoderConfig:
  """The :class:`DecoderConfig` of a ``config.json`` dict (a DecoderConfig passes through)."""
  return config if isinstance(config, DecoderConfig) else DecoderConfig.from_hf(config)


def build(config: Mapping[str, Any] | DecoderConfig, dtype: Any = jnp.float32,
          num_layers_to_run: int | None = None, bidirectional: bool = False,
          attention_implementation: str | None = "auto") -> DecoderModel:
  """The Flax module for a transformers decoder ``config.json`` dict (or its DecoderConfig)."""
  cfg = read_config(config)
  return DecoderModel(cfg, dtype, num_layers_to_run, bidirectional, attention_implementation)


def rules(cfg: DecoderConfig) -> list[Rule]:
  """PyTorch -> Flax name table (names of a bare ``*Model``; ``to_flax`` finds any prefix such
  as ``model.`` of ``*ForCausalLM`` or ``embedding_model.`` of NV-Embed)."""
  layer = "layers.{i}."
  out = [Rule("embed_tokens.weight", ("embed_tokens", "embedding"))]
  for name in ("input_layernorm", "post_attention_layernorm"):
    out.append(Rule(f"{layer}{name}.weight", ("layers", name, "weight")))
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    bias = cfg.o_bias if name == "o_proj" else cfg.qkv_bias
    out += linear(f"{layer}self_attn.{name}", ("layers", name), bias)
  for name in ("gate_proj", "up_proj", "down_proj"):
    out += linear(f"{layer}mlp.{name}", ("layers", name), cfg.mlp_bias)
  if cfg.qk_norm:
    out += [Rule(f"{layer}self_attn.q_norm.weight", ("layers", "q_norm", "weight")),
            Rule(f"{layer}self_attn.k_norm.weight", ("layers", "k_norm", "weight"))]
  return out + [Rule("norm.weight", ("norm", "weight"))]


def abstract_params(cfg: DecoderConfig, num_layers_to_run: int | None = None) -> dict[str, Any]:
  """Shapes of the module's float32 params when it runs ``num_layers_to_run`` layers."""
  return stack.text_param_shapes(DecoderModel(cfg, num_layers_to_run=num_layers_to_run))


def load_params(state: Mapping[str, np.ndarray], cfg: DecoderConfig,
                num_layers_to_run: int | None = None, dtype: Any = None) -> dict[str, Any]:
  """Host numpy params of :func:`build`'s module from a PyTorch-named state dict
  (:func:`align_jax.encoders.weights.read_state_dict`); only the first ``num_layers_to_run``
  layers are read; ``dtype`` casts floating params (None: float32)."""
  count = stack.layers_to_run(cfg.num_layers, num_layers_to_run)
  if not any(k == "embed_tokens.weight" or k.endswith(".embed_tokens.weight") for k in state):
    raise ValueError("these weights are not a decoder LLM checkpoint: no embed_tokens.weight")
  return weights_lib.to_flax(dict(state), rules(cfg), count, abstract_params(cfg, count), dtype)


def pool(last_hidden_state: jnp.ndarray, attention_mask: jnp.ndarray,
         pooling: str) -> dict[str, jnp.ndarray]:
  """Features of decoder tokens: "last" (last real token, left or right padding), "mean" over
  real tokens, or "tokens"; float32, the shapes of :func:`align_jax.encoders.pooling.pool_text`."""
  pooling_lib.check_pooling(pooling, POOLINGS, "decoder text")
  return pooling_lib.pool_text(last_hidden_state, attention_mask, pooling)
