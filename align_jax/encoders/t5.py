"""The T5 / mT5 encoder stack as a frozen text encoder (GTR / sentence-T5 style).

Pre-norm blocks with T5's scale-only RMS norm (float32 statistics, no mean, no bias), attention
without the 1/sqrt(d) scale plus a relative-position bias (bidirectional buckets, learned by the
first block and shared by all), and a ReLU MLP (T5) or gated-GELU MLP (T5 v1.1 / mT5,
``feed_forward_proj="gated-gelu"``); a final norm. No absolute positions, so no length limit.
A full encoder-decoder checkpoint (``T5Model``, ``T5ForConditionalGeneration``) loads its encoder.

Use::

  cfg = t5.read_config(weights.read_config(folder))
  model = t5.build(cfg, dtype=jnp.float32)
  params = t5.load_params(weights.read_state_dict(folder), cfg)
  out = model.apply({"params": params}, input_ids, attention_mask, output_hidden_states=True)
  features = t5.pool(out["last_hidden_state"], attention_mask, "mean")

``out["hidden_states"][i]`` is transformers' encoder ``hidden_states[i]`` (0 = embeddings; the last
entry, when every block runs, is after the final norm).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from align_jax.encoders import pooling as pooling_lib
from align_jax.encoders import stack
from align_jax.encoders import weights as weights_lib
from align_jax.encoders.activations import activation
from align_jax.encoders.attention import attention
from align_jax.encoders.relative_position import relative_position_buckets
from align_jax.encoders.weights import Rule, linear

MODEL_TYPES = ("t5", "mt5")
POOLINGS = ("mean", "last", "tokens")  # no summary token at position 0
DEFAULT_POOLING = "mean"


@dataclasses.dataclass(frozen=True)
class T5Config:
  """What the encoder reads from a transformers T5 / mT5 ``config.json`` dict."""
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  num_layers: int
  num_buckets: int
  max_distance: int
  eps: float
  act: str
  gated: bool

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "T5Config":
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
      raise ValueError(f"T5 encoder model_type {kind!r} is not supported; supported: "
                       f"{', '.join(MODEL_TYPES)}")
    proj = config.get("feed_forward_proj", "relu" if kind == "t5" else "gated-gelu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"feed_forward_proj {proj!r} is not a T5 setting; use 'relu', 'gelu', "
                       "'gated-relu' or 'gated-gelu'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return cls(vocab_size=int(config["vocab_size"]), d_model=int(config["d_model"]),
               d_kv=int(config["d_kv"]), d_ff=int(config["d_ff"]),
               num_heads=int(config["num_heads"]), num_layers=int(config["num_layers"]),
               num_buckets=int(config.get("relative_attention_num_buckets", 32)),
               max_distance=int(config.get("relative_attention_max_distance", 128)),
               eps=float(config.get("layer_norm_epsilon", 1e-6)), act=act,
               gated=parts[0] == "gated")


class T5LayerNorm(nn.Module):
  """T5's norm: ``w * x / rms(x)`` with float32 statistics (no mean subtraction, no bias)."""
  eps: float

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class T5Block(nn.Module):
  """``x + attn(LN(x)) (+ bias)``, then ``x + ff(LN(x))``."""
  config: T5Config
  dtype: Any
  keep_hidden: bool
  implementation: str | None = "auto"

  @nn.compact
  def __call__(self, x, mask, bias):
    c = self.config
    batch, length = x.shape[:2]

    def dense(name: str, features: int) -> nn.Dense:
      return nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)

    h = T5LayerNorm(c.eps, name="attention_norm")(x)
    q, k, v = (dense(n, c.num_heads * c.d_kv)(h).reshape(batch, length, c.num_heads, c.d_kv)
               for n in ("q", "k", "v"))
    out = attention(q, k, v, mask=mask, bias=bias, scale=1.0, implementation=self.implementation)
    x = x + dense("o", c.d_model)(out.reshape(batch, length, -1))
    h = T5LayerNorm(c.eps, name="ff_norm")(x)
    if c.gated:
      h = activation(c.act)(dense("wi_0", c.d_ff)(h)) * dense("wi_1", c.d_ff)(h)
    else:
      h = activation(c.act)(dense("wi", c.d_ff)(h))
    x = x + dense("wo", c.d_model)(h)
    return x, (x if self.keep_hidden else None)


class T5Encoder(nn.Module):
  """Token embeddings, ``num_layers_to_run`` scanned blocks, the final norm when all run."""
  config: T5Config
  dtype: Any = jnp.float32
  num_layers_to_run: int | None = None
  attention_implementation: str | None = "auto"

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray,
               output_hidden_states: bool = False) -> dict[str, Any]:
    c = self.config
    count = stack.layers_to_run(c.num_layers, self.num_layers_to_run)
    length = input_ids.shape[1]
    x = nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype, name="embed_tokens")(input_ids)
    buckets = relative_position_buckets(length, length, True, c.num_buckets, c.max_distance)
    table = nn.Embed(c.num_buckets, c.num_heads, dtype=jnp.float32,
                     name="relative_attention_bias")(jnp.asarray(buckets))
    bias = jnp.transpose(table, (2, 0, 1))[None]  # [1, heads, T, T]
    hidden = [x]
    if count:
      blocks = stack.scanned(T5Block, count, 2)
      x, stacked = blocks(c, self.dtype, output_hidden_states, self.attention_implementation,
                          name="layers")(x, attention_mask, bias)
      if output_hidden_states:
        hidden += [stacked[i] for i in range(count)]
    if count == c.num_layers:
      x = T5LayerNorm(c.eps, name="final_layer_norm")(x)
      hidden[-1] = x
    return {"last_hidden_state": x,
            "hidden_states": tuple(hidden) if output_hidden_states else None}


def read_config(config: Mapping[str, Any] | T5Config) -> T5Config:
  """The :class:`T5Config` of a ``config.json`` dict (a T5Config passes through)."""
  return config if isinstance(config, T5Config) else T5Config.from_hf(config)


def build(config: Mapping[str, Any] | T5Config, dtype: Any = jnp.float32,
          num_layers_to_run: int | None = None,
          attention_implementation: str | None = "auto") -> T5Encoder:
  """The Flax encoder for a T5 / mT5 ``config.json`` dict (or its T5Config)."""
  return T5Encoder(read_config(config), dtype, num_layers_to_run, attention_implementation)


def rules(cfg: T5Config) -> list[Rule]:
  """PyTorch -> Flax name table of the encoder (decoder tensors of a full checkpoint unused)."""
  block = "encoder.block.{i}.layer."
  out = [Rule(block + "0.SelfAttention.q.weight", ("layers", "q", "kernel"), "linear"),
         Rule("shared.weight", ("embed_tokens", "embedding")),
         Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              ("relative_attention_bias", "embedding")),
         Rule(block + "0.layer_norm.weight", ("layers", "attention_norm", "weight")),
         Rule(block + "1.layer_norm.weight", ("layers", "ff_norm", "weight")),
         Rule("encoder.final_layer_norm.weight", ("final_layer_norm", "weight"))]
  for name in "kvo":
    out += linear(f"{block}0.SelfAttention.{name}", ("layers", name), bias=False)
  for name in ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo"):
    out += linear(f"{block}1.DenseReluDense.{name}", ("layers", name), bias=False)
  return out


def abstract_params(cfg: T5Config, num_layers_to_run: int | None = None) -> dict[str, Any]:
  """Shapes of the encoder's float32 params when it runs ``num_layers_to_run`` blocks."""
  return stack.text_param_shapes(T5Encoder(cfg, num_layers_to_run=num_layers_to_run))


def load_params(state: Mapping[str, np.ndarray], cfg: T5Config,
                num_layers_to_run: int | None = None, dtype: Any = None) -> dict[str, Any]:
  """Host numpy params of the encoder from a T5EncoderModel's or full T5 checkpoint's
  PyTorch-named state dict. The token embeddings are ``shared.weight`` or, where saving kept
  only the tied copy, ``encoder.embed_tokens.weight``."""
  count = stack.layers_to_run(cfg.num_layers, num_layers_to_run)
  table = rules(cfg)
  anchor = "encoder.block.0.layer.0.SelfAttention.q.weight"
  prefix = next((k[:-len(anchor)] for k in state if k == anchor or k.endswith("." + anchor)), None)
  if prefix is None:
    raise ValueError(f"these weights are not a T5 encoder checkpoint: no {anchor}")
  state = dict(state)
  if prefix + "shared.weight" not in state and prefix + "encoder.embed_tokens.weight" in state:
    state[prefix + "shared.weight"] = state[prefix + "encoder.embed_tokens.weight"]
  return weights_lib.to_flax(state, table, count, abstract_params(cfg, count), dtype, prefix)


def pool(last_hidden_state: jnp.ndarray, attention_mask: jnp.ndarray,
         pooling: str) -> dict[str, jnp.ndarray]:
  """Features: "mean" over real tokens (sentence-T5 / GTR), "last" real token, or "tokens"."""
  pooling_lib.check_pooling(pooling, POOLINGS, "T5 text")
  return pooling_lib.pool_text(last_hidden_state, attention_mask, pooling)
