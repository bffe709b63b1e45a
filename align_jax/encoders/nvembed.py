"""NV-Embed-v2: a bidirectional Mistral and its latent-attention pooling (``pooling="latent"``).

Read from the public ``modeling_nvembed.py`` of nvidia/NV-Embed-v2 (model type ``nvembed``; the
checkpoint holds ``embedding_model.*``, a Mistral run with a padding-only bidirectional mask,
and ``latent_attention_model.*``). The pooler, on the Mistral's last hidden states ``h`` [B, T, D]:

1. cross-attention from the tokens to ``num_latents_value`` learned latents ``L`` [n, D]:
   ``h = h + to_out(attn(q=to_q(LN(h)), k, v=split(to_kv(LN_ctx(L)))))`` with
   ``num_cross_heads`` heads of ``cross_dim_head``, scale 1/sqrt(cross_dim_head), no mask (every
   token attends to every latent);
2. a GEGLU feed-forward: ``h = h + W2 (a * gelu(g))`` with ``[a, g] = W1 LN(h)`` (width 4 D);
3. the mean over the pool mask (the attention mask; NV-Embed zeroes the instruction prefix in it
   when it right-pads), then L2 normalisation when ``output_normalize``.

As a :class:`align_jax.encoders.TextEncoder` family (``model_type`` "nvembed", pooling
``latent``; the params are one tree ``{"model": Mistral, "pooler": latent attention}``)::

  cfg = nvembed.read_config(config_dict)                      # NVEmbedConfig(text=..., latent=...)
  module = nvembed.build(cfg)                                  # bidirectional Mistral (+ pooler)
  params = nvembed.load_params(weights.read_state_dict(folder), cfg)
  out = module.apply({"params": params}, ids, mask, pool_mask=pool_mask)
  out["pooler_output"]                                         # [B, D] float32 (L2-normed)

and piece by piece (the Mistral alone, e.g. for its hidden layers)::

  model = decoder.build(cfg.text, bidirectional=True)        # NV-Embed's Mistral, no window
  params = decoder.load_params(state, cfg.text)              # finds the "embedding_model." prefix
  pooler = nvembed.build_pooler(cfg.latent)
  pooler_params = nvembed.load_pooler_params(state, cfg.latent)
  tokens = model.apply({"params": params}, ids, mask)["last_hidden_state"]
  features = nvembed.pool(pooler, pooler_params, tokens, pool_mask)   # {"pooled": [B, D]}

The pool mask is the attention mask with the instruction prefix zeroed: NV-Embed's ``encode``
zeroes the first ``len(tokenizer.tokenize(instruction))`` positions (which, after the BOS token,
leaves the prefix's last token in the mean) when its tokenizer pads on the right
(``padding_side`` "right" and ``is_mask_instruction`` in its config.json); :func:`pool_mask`
does the same, counted from each row's first real token so left padding gives the same mask.
NV-Embed appends the EOS token to every text (``add_eos``), as ``TextEncoder.preprocess`` does
for this family.

The maths is checked in tests/test_enc_text_decoder.py against an independent PyTorch
re-implementation of the steps above (the NV-Embed model class itself is remote code, not in
transformers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from align_jax.encoders import decoder
from align_jax.encoders import stack
from align_jax.encoders import weights as weights_lib
from align_jax.encoders.attention import attention
from align_jax.encoders.weights import Rule
from align_jax.model.ops import masked_mean

MODEL_TYPES = ("nvembed",)
# "latent" is what NV-Embed was trained with; "mean" and "tokens" read the bidirectional
# Mistral's tokens (any layer: for layer selection and token projectors). "last" and "cls" are
# refused: with bidirectional attention no single token summarises the text.
POOLINGS = ("latent", "mean", "tokens")
DEFAULT_POOLING = "latent"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the pooler uses


@dataclasses.dataclass(frozen=True)
class LatentConfig:
  """The pooler's settings (``latent_attention_config`` of NV-Embed's config.json)."""
  num_latents: int
  latent_dim: int
  hidden_dim: int
  num_heads: int
  head_dim: int
  output_normalize: bool

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "LatentConfig":
    out = cls(num_latents=int(config["num_latents_value"]), latent_dim=int(config["latent_dim"]),
              hidden_dim=int(config["hidden_dim"]), num_heads=int(config["num_cross_heads"]),
              head_dim=int(config["cross_dim_head"]),
              output_normalize=bool(config.get("output_normalize", True)))
    if out.latent_dim != out.hidden_dim:
      raise ValueError(f"latent_dim {out.latent_dim} != hidden_dim {out.hidden_dim}: NV-Embed's "
                       "pooler adds its output to the hidden states, so they must be equal")
    return out


@dataclasses.dataclass(frozen=True)
class NVEmbedConfig:
  """An ``nvembed`` config.json: the Mistral, the pooler and how NV-Embed tokenizes.

  Attributes:
    text: the Mistral's :class:`align_jax.encoders.decoder.DecoderConfig` (run bidirectionally).
    latent: the pooler's :class:`LatentConfig`.
    padding_side: the side NV-Embed's tokenizer pads on ("right" for NV-Embed-v2).
    mask_instruction: leave the instruction prefix out of the pooled mean (``is_mask_instruction``).
    add_eos: NV-Embed appends the EOS token to every text.
  """
  text: decoder.DecoderConfig
  latent: LatentConfig
  padding_side: str = "right"
  mask_instruction: bool = True
  add_eos: bool = True
  model_type: str = "nvembed"

  @property
  def num_layers(self) -> int:
    return self.text.num_layers

  @property
  def hidden_size(self) -> int:
    return self.text.hidden_size


def read_config(config: Mapping[str, Any] | NVEmbedConfig) -> NVEmbedConfig:
  """The :class:`NVEmbedConfig` of an ``nvembed`` config.json dict (an NVEmbedConfig passes)."""
  if isinstance(config, NVEmbedConfig):
    return config
  if config.get("model_type") not in MODEL_TYPES:
    raise ValueError(f"model_type {config.get('model_type')!r} is not NV-Embed ('nvembed')")
  text = dict(config.get("text_config") or {})
  if not text or "latent_attention_config" not in config:
    raise ValueError("an nvembed config.json needs text_config and latent_attention_config")
  text["model_type"] = "mistral"  # "bidir_mistral": a MistralModel run bidirectionally
  latent = LatentConfig.from_hf(config["latent_attention_config"])
  side = config.get("padding_side") or "right"
  if side not in ("left", "right"):
    raise ValueError(f"nvembed config.json: padding_side must be 'left' or 'right', got {side!r}")
  return NVEmbedConfig(decoder.DecoderConfig.from_hf(text), latent, side,
                       bool(config.get("is_mask_instruction", True)),
                       bool(config.get("add_eos", True)))


class LatentAttentionPooling(nn.Module):
  """Tokens [B, T, D] -> cross-attention to learned latents, GEGLU MLP, masked mean (+ L2)."""
  config: LatentConfig
  dtype: Any = jnp.float32
  attention_implementation: str | None = "auto"

  @nn.compact
  def __call__(self, hidden: jnp.ndarray, pool_mask: jnp.ndarray) -> jnp.ndarray:
    c = self.config
    batch, length, width = hidden.shape
    inner = c.num_heads * c.head_dim
    latents = self.param("latents", nn.initializers.normal(1.0), (c.num_latents, c.latent_dim))

    def dense(name: str, features: int, bias: bool) -> nn.Dense:
      return nn.Dense(features, use_bias=bias, dtype=self.dtype, name=name)

    def norm(name: str) -> nn.LayerNorm:
      return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=name)

    hidden = hidden.astype(self.dtype)
    q = dense("to_q", inner, False)(norm("norm")(hidden))
    context = norm("norm_context")(latents.astype(self.dtype))
    k = dense("to_k", inner, False)(context)
    v = dense("to_v", inner, False)(context)
    q = q.reshape(batch, length, c.num_heads, c.head_dim)
    k, v = (jnp.broadcast_to(t.reshape(1, c.num_latents, c.num_heads, c.head_dim),
                             (batch, c.num_latents, c.num_heads, c.head_dim)) for t in (k, v))
    out = attention(q, k, v, implementation=self.attention_implementation)
    hidden = hidden + dense("to_out", width, False)(out.reshape(batch, length, inner))
    h = norm("ff_norm")(hidden)
    value = dense("ff_value", 4 * width, True)(h)
    gate = dense("ff_gate", 4 * width, True)(h)
    hidden = hidden + dense("ff_out", width, True)(value * jax.nn.gelu(gate, approximate=False))
    pooled = masked_mean(hidden.astype(jnp.float32), pool_mask.astype(bool))
    if c.output_normalize:
      norm_ = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
      pooled = pooled / jnp.maximum(norm_, 1e-12)  # torch.nn.functional.normalize
    return pooled


def build_pooler(config: LatentConfig, dtype: Any = jnp.float32,
                 attention_implementation: str | None = "auto") -> LatentAttentionPooling:
  """The latent-attention pooler module."""
  return LatentAttentionPooling(config, dtype, attention_implementation)


def pooler_rules() -> list[Rule]:
  """PyTorch -> Flax names of ``latent_attention_model.*`` (prefix found by the loader)."""
  attn, ff = "cross_attend_blocks.0.", "cross_attend_blocks.1."
  out = [Rule("latents", ("latents",))]
  for torch_name, flax_name in ((attn + "norm", "norm"), (attn + "norm_context", "norm_context"),
                                (ff + "norm", "ff_norm")):
    out += weights_lib.norm(torch_name, (flax_name,))
  out += [Rule(attn + "fn.to_q.weight", ("to_q", "kernel"), "linear"),
          Rule(attn + "fn.to_kv.weight", ("to_k", "kernel"), "linear", chunk=(0, 2)),
          Rule(attn + "fn.to_kv.weight", ("to_v", "kernel"), "linear", chunk=(1, 2)),
          Rule(attn + "fn.to_out.weight", ("to_out", "kernel"), "linear"),
          Rule(ff + "fn.net.0.weight", ("ff_value", "kernel"), "linear", chunk=(0, 2)),
          Rule(ff + "fn.net.0.bias", ("ff_value", "bias"), chunk=(0, 2)),
          Rule(ff + "fn.net.0.weight", ("ff_gate", "kernel"), "linear", chunk=(1, 2)),
          Rule(ff + "fn.net.0.bias", ("ff_gate", "bias"), chunk=(1, 2))]
  return out + weights_lib.linear(ff + "fn.net.2", ("ff_out",))


def load_pooler_params(state: Mapping[str, np.ndarray], config: LatentConfig,
                       dtype: Any = None) -> dict[str, Any]:
  """Host numpy params of the pooler from NV-Embed's PyTorch-named state dict."""
  anchor = "cross_attend_blocks.0.fn.to_q.weight"
  prefix = next((k[:-len(anchor)] for k in state if k.endswith(anchor)), None)
  if prefix is None:
    raise ValueError(f"these weights have no latent-attention pooler (no ...{anchor}); "
                     "pooling 'latent' is for NV-Embed checkpoints")
  hidden = jax.ShapeDtypeStruct((1, 2, config.hidden_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  expected = jax.eval_shape(build_pooler(config).init, jax.random.key(0), hidden, mask)["params"]
  return weights_lib.to_flax(dict(state), pooler_rules(), 0, expected, dtype, prefix)


def pool(pooler: LatentAttentionPooling, params: Mapping[str, Any], last_hidden_state: jnp.ndarray,
         pool_mask: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """``{"pooled": [B, D] float32}``: the pooler on the final hidden states over ``pool_mask``."""
  return {"pooled": pooler.apply({"params": params}, last_hidden_state, pool_mask)}


class NVEmbed(nn.Module):
  """NV-Embed as one module: the bidirectional Mistral (``model``) and the pooler (``pooler``).

  ``__call__`` returns the decoder's outputs (:class:`align_jax.encoders.decoder.DecoderModel`)
  and, given ``pool_mask``, ``"pooler_output"``: the latent-attention pooling of the final hidden
  states (every layer must run). Params: ``{"model": ..., "pooler": ...}``; a module that runs
  fewer layers (hidden layer k, mean / token pooling) has no ``pooler`` params.
  """
  config: NVEmbedConfig
  dtype: Any = jnp.float32
  num_layers_to_run: int | None = None
  attention_implementation: str | None = "auto"

  def setup(self):
    self.model = decoder.DecoderModel(self.config.text, self.dtype, self.num_layers_to_run,
                                      bidirectional=True,
                                      attention_implementation=self.attention_implementation)
    self.pooler = LatentAttentionPooling(self.config.latent, self.dtype,
                                         self.attention_implementation)

  def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray,
               output_hidden_states: bool = False,
               pool_mask: jnp.ndarray | None = None) -> dict[str, Any]:
    out = dict(self.model(input_ids, attention_mask, output_hidden_states))
    if pool_mask is not None:
      if stack.layers_to_run(self.config.num_layers, self.num_layers_to_run) \
          != self.config.num_layers:
        raise ValueError("NV-Embed's latent pooling reads the final hidden states: run every "
                         "layer (num_layers_to_run=None)")
      out["pooler_output"] = self.pooler(out["last_hidden_state"], pool_mask)
    return out


def build(config: Mapping[str, Any] | NVEmbedConfig, dtype: Any = jnp.float32,
          num_layers_to_run: int | None = None,
          attention_implementation: str | None = "auto") -> NVEmbed:
  """The :class:`NVEmbed` module of an ``nvembed`` config.json dict (or its NVEmbedConfig)."""
  return NVEmbed(read_config(config), dtype, num_layers_to_run, attention_implementation)


def _with_pooler(cfg: NVEmbedConfig, num_layers_to_run: int | None) -> bool:
  return stack.layers_to_run(cfg.num_layers, num_layers_to_run) == cfg.num_layers


def abstract_params(cfg: NVEmbedConfig, num_layers_to_run: int | None = None) -> dict[str, Any]:
  """Shapes of the float32 params: ``model`` (the first k layers) and, when every layer runs,
  ``pooler``."""
  out = {"model": decoder.abstract_params(cfg.text, num_layers_to_run)}
  if _with_pooler(cfg, num_layers_to_run):
    hidden = jax.ShapeDtypeStruct((1, 2, cfg.latent.hidden_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    out["pooler"] = jax.eval_shape(build_pooler(cfg.latent).init, jax.random.key(0), hidden,
                                   mask)["params"]
  return out


def load_params(state: Mapping[str, np.ndarray], cfg: NVEmbedConfig,
                num_layers_to_run: int | None = None, dtype: Any = None) -> dict[str, Any]:
  """Host numpy params (:func:`abstract_params`' tree) from NV-Embed's PyTorch-named state dict
  (``embedding_model.*`` and ``latent_attention_model.*``); only the first k layers are read."""
  out = {"model": decoder.load_params(state, cfg.text, num_layers_to_run, dtype)}
  if _with_pooler(cfg, num_layers_to_run):
    out["pooler"] = load_pooler_params(state, cfg.latent, dtype)
  return out


def state_dict(params: Mapping[str, Any], cfg: NVEmbedConfig) -> dict[str, np.ndarray]:
  """The PyTorch-named float32 state dict NV-Embed saves, from :func:`load_params`' tree (for
  the tiny test checkpoints; inverse of :func:`load_params`)."""
  out = weights_lib.from_flax(params["model"], decoder.rules(cfg.text), cfg.num_layers,
                              "embedding_model.")
  out.update(weights_lib.from_flax(params["pooler"], pooler_rules(), 0, "latent_attention_model."))
  return out


def pool_mask(attention_mask: jnp.ndarray, prefix_tokens: int) -> jnp.ndarray:
  """The attention mask [B, L] with the first ``prefix_tokens`` positions of each text zeroed
  (counted from its first real token), as NV-Embed leaves its instruction out of the mean."""
  mask = jnp.asarray(attention_mask).astype(jnp.int32)
  seen = jnp.cumsum(jnp.cumsum(mask, axis=1) > 0, axis=1)  # 1 at the first real token, ...
  return mask * (seen > prefix_tokens).astype(jnp.int32)
