"""Bidirectional text encoders: BERT, RoBERTa, XLM-R, MPNet, and the CLIP / SigLIP text towers.

Two block layouts, one config (:class:`TextTowerConfig`) read from ``config.json``:

* **post-norm** (BERT, RoBERTa, XLM-R, MPNet): embeddings (word + position (+ token type 0)) then
  LayerNorm; each block ``LN(x + attn(x))``, ``LN(x + W2 act(W1 x))``; no final norm. RoBERTa /
  XLM-R / MPNet number positions from ``padding_idx + 1`` over non-pad ids (fairseq style); MPNet
  adds a relative-position bias (32 buckets, shared by every layer) to the attention logits.
* **pre-norm** (CLIP text, SigLIP text): embeddings (token + position); each block
  ``x + attn(LN(x))``, ``x + mlp(LN(x))``; a final LayerNorm. CLIP attends causally; its pooled
  feature is the EOS token's state (``pooling="cls"`` here, as CLIP's ``pooler_output``). SigLIP's
  pooled feature is its ``head`` (a Dense) on the last position's state.

Use::

  cfg = bert.read_config(weights.read_config(folder))
  model = bert.build(cfg, dtype=jnp.float32)
  params = bert.load_params(weights.read_state_dict(folder), cfg)
  out = model.apply({"params": params}, input_ids, attention_mask, output_hidden_states=True)
  features = bert.pool(model, params, out, input_ids, attention_mask, "cls")

``out["hidden_states"][i]`` is transformers' ``hidden_states[i]`` for i < N (0 = embeddings); the
last entry, when every layer runs, is the final output (after CLIP / SigLIP's final LayerNorm;
for the post-norm families the last block's output, as transformers).
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
from align_jax.encoders.weights import Rule, linear, norm

POST_NORM = ("bert", "roberta", "xlm-roberta", "mpnet")
PRE_NORM = ("clip_text_model", "clip", "siglip_text_model", "siglip")
MODEL_TYPES = POST_NORM + PRE_NORM
POOLINGS = ("cls", "mean", "last", "tokens")
DEFAULT_POOLING = "cls"
# Defaults transformers' config classes hold for keys that save_pretrained leaves out of
# config.json when they equal the class default (the token ids of PretrainedConfig).
_TOKEN_DEFAULTS = {"clip_text_model": {"eos_token_id": 49407, "pad_token_id": 1},
                   "siglip_text_model": {"eos_token_id": 49407, "pad_token_id": 1},
                   "bert": {"pad_token_id": 0}, "roberta": {"pad_token_id": 1},
                   "xlm-roberta": {"pad_token_id": 1}, "mpnet": {"pad_token_id": 1}}
MPNET_BUCKETS = 32  # transformers' MPNetEncoder always buckets into 32, max distance 128


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
  """What the forward pass reads, from a transformers ``config.json`` dict."""
  model_type: str  # "bert", "roberta", "xlm-roberta", "mpnet", "clip", "siglip"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  eps: float
  act: str
  max_positions: int
  type_vocab_size: int
  padding_idx: int | None  # fairseq-style positions from padding_idx + 1 when set
  eos_token_id: int | None
  head_size: int  # SigLIP's head output width; 0 = no head

  @property
  def pre_norm(self) -> bool:
    return self.model_type in ("clip", "siglip")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "TextTowerConfig":
    """Reads a config dict (a full CLIP / SigLIP config's ``text_config`` too)."""
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
      raise ValueError(f"text encoder model_type {kind!r} is not supported here; supported: "
                       f"{', '.join(MODEL_TYPES)}")
    if kind in ("clip", "siglip"):
      config = dict(config.get("text_config") or {}, model_type=f"{kind}_text_model")
      kind = config["model_type"]
    config = {**_TOKEN_DEFAULTS.get(kind, {}), **config}
    family = kind.replace("_text_model", "")
    padding_idx = None
    if family in ("roberta", "xlm-roberta"):
      padding_idx = int(config["pad_token_id"])
    elif family == "mpnet":
      padding_idx = 1  # transformers' MPNetEmbeddings fixes it
    pre = family in ("clip", "siglip")
    return cls(
        model_type=family, vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]), intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]), num_heads=int(config["num_attention_heads"]),
        eps=float(config.get("layer_norm_eps", 1e-5 if pre else 1e-12)),
        act=config.get("hidden_act", "gelu"),
        max_positions=int(config["max_position_embeddings"]),
        type_vocab_size=0 if pre or family == "mpnet" else int(config.get("type_vocab_size", 2)),
        padding_idx=padding_idx, eos_token_id=config.get("eos_token_id"),
        head_size=(int(config.get("projection_size") or config["hidden_size"])
                   if family == "siglip" else 0))


def padding_position_ids(input_ids: jnp.ndarray, padding_idx: int) -> jnp.ndarray:
  """Fairseq positions: ``padding_idx + 1 + rank`` for non-pad ids, ``padding_idx`` for pads."""
  real = (input_ids != padding_idx).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + padding_idx


class Block(nn.Module):
  """One transformer block, post-norm (BERT layout) or pre-norm (CLIP layout)."""
  config: TextTowerConfig
  dtype: Any
  keep_hidden: bool
  causal: bool = False
  implementation: str | None = "auto"

  @nn.compact
  def __call__(self, x, mask, bias):
    c = self.config
    batch, length, width = x.shape
    heads, head_dim = c.num_heads, width // c.num_heads

    def dense(name: str, features: int) -> nn.Dense:
      return nn.Dense(features, dtype=self.dtype, name=name)

    def norm(name: str) -> nn.LayerNorm:
      return nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name=name)

    def attend(h):
      q, k, v = (dense(n, width)(h).reshape(batch, length, heads, head_dim)
                 for n in ("query", "key", "value"))
      out = attention(q, k, v, mask=mask, causal=self.causal, bias=bias,
                      implementation=self.implementation)
      return dense("attention_out", width)(out.reshape(batch, length, width))

    def mlp(h):
      h = activation(c.act)(dense("intermediate", c.intermediate_size)(h))
      return dense("output", width)(h)

    if c.pre_norm:
      x = x + attend(norm("attention_norm")(x))
      x = x + mlp(norm("output_norm")(x))
    else:
      x = norm("attention_norm")(x + attend(x))
      x = norm("output_norm")(x + mlp(x))
    return x, (x if self.keep_hidden else None)


class TextTower(nn.Module):
  """Embeddings, ``num_layers_to_run`` scanned blocks, and the final norm / head where they exist.

  Attributes:
    config: the :class:`TextTowerConfig`.
    dtype: compute dtype; LayerNorm statistics and softmax stay float32.
    num_layers_to_run: None = every block; k = the first k (hidden layer k, without the final
      norm unless k is the last block).
    attention_implementation: "auto" (cuDNN on GPU where allowed, else XLA; see
      :mod:`align_jax.encoders.attention`), "cudnn", "xla" or None.
  """
  config: TextTowerConfig
  dtype: Any = jnp.float32
  num_layers_to_run: int | None = None
  attention_implementation: str | None = "auto"

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray,
               output_hidden_states: bool = False) -> dict[str, Any]:
    c = self.config
    count = stack.layers_to_run(c.num_layers, self.num_layers_to_run)
    length = input_ids.shape[1]
    if length > c.max_positions - (c.padding_idx + 1 if c.padding_idx is not None else 0):
      raise ValueError(f"{length} tokens exceed this {c.model_type} model's "
                       f"max_position_embeddings {c.max_positions}; tokenize with a smaller "
                       "max_length")
    if c.padding_idx is not None:
      positions = padding_position_ids(input_ids, c.padding_idx)
    else:
      positions = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
    embed = lambda n, rows: nn.Embed(rows, c.hidden_size, dtype=self.dtype, name=n)  # noqa: E731
    x = embed("word_embeddings", c.vocab_size)(input_ids)
    x = x + embed("position_embeddings", c.max_positions)(positions)
    if c.type_vocab_size:
      x = x + embed("token_type_embeddings", c.type_vocab_size)(jnp.zeros_like(input_ids))
    if not c.pre_norm:
      x = nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name="embeddings_norm")(x)
    bias = None
    if c.model_type == "mpnet":
      buckets = relative_position_buckets(length, length, True, MPNET_BUCKETS)
      table = nn.Embed(MPNET_BUCKETS, c.num_heads, dtype=jnp.float32,
                       name="relative_attention_bias")(jnp.asarray(buckets))
      bias = jnp.transpose(table, (2, 0, 1))[None]  # [1, N, T, T]
    hidden = [x]
    if count:
      blocks = stack.scanned(Block, count, 2)
      x, stacked = blocks(c, self.dtype, output_hidden_states, c.model_type == "clip",
                          self.attention_implementation, name="layers")(x, attention_mask, bias)
      if output_hidden_states:
        hidden += [stacked[i] for i in range(count)]
    final = count == c.num_layers
    if final and c.pre_norm:
      x = nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name="final_layer_norm")(x)
      hidden[-1] = x
    out = {"last_hidden_state": x,
           "hidden_states": tuple(hidden) if output_hidden_states else None}
    if final and c.head_size:
      out["pooler_output"] = nn.Dense(c.head_size, dtype=self.dtype, name="head")(x[:, -1])
    return out


def read_config(config: Mapping[str, Any] | TextTowerConfig) -> TextTowerConfig:
  """The :class:`TextTowerConfig` of a ``config.json`` dict (a TextTowerConfig passes through)."""
  return config if isinstance(config, TextTowerConfig) else TextTowerConfig.from_hf(config)


def build(config: Mapping[str, Any] | TextTowerConfig, dtype: Any = jnp.float32,
          num_layers_to_run: int | None = None,
          attention_implementation: str | None = "auto") -> TextTower:
  """The Flax module for a BERT / RoBERTa / XLM-R / MPNet / CLIP / SigLIP text config."""
  return TextTower(read_config(config), dtype, num_layers_to_run, attention_implementation)


def _pre_norm_rules() -> list[Rule]:
  layer = "encoder.layers.{i}."
  out = [Rule("embeddings.token_embedding.weight", ("word_embeddings", "embedding")),
         Rule("embeddings.position_embedding.weight", ("position_embeddings", "embedding"))]
  for torch_name, flax_name in (("self_attn.q_proj", "query"), ("self_attn.k_proj", "key"),
                                ("self_attn.v_proj", "value"),
                                ("self_attn.out_proj", "attention_out"),
                                ("mlp.fc1", "intermediate"), ("mlp.fc2", "output")):
    out += linear(layer + torch_name, ("layers", flax_name))
  out += norm(layer + "layer_norm1", ("layers", "attention_norm"))
  out += norm(layer + "layer_norm2", ("layers", "output_norm"))
  return (out + norm("final_layer_norm", ("final_layer_norm",))
          + linear("head", ("head",)))


def _post_norm_rules(mpnet: bool) -> list[Rule]:
  layer = "encoder.layer.{i}."
  out = [Rule("embeddings.word_embeddings.weight", ("word_embeddings", "embedding")),
         Rule("embeddings.position_embeddings.weight", ("position_embeddings", "embedding")),
         Rule("embeddings.token_type_embeddings.weight", ("token_type_embeddings", "embedding")),
         Rule("encoder.relative_attention_bias.weight", ("relative_attention_bias", "embedding"))]
  out += norm("embeddings.LayerNorm", ("embeddings_norm",))
  attn = "attention.attn." if mpnet else "attention.self."
  names = (("q", "k", "v", "o") if mpnet else ("query", "key", "value", None))
  for torch_name, flax_name in zip(names, ("query", "key", "value", "attention_out")):
    source = (layer + attn + torch_name) if torch_name else layer + "attention.output.dense"
    out += linear(source, ("layers", flax_name))
  out += norm(layer + ("attention.LayerNorm" if mpnet else "attention.output.LayerNorm"),
              ("layers", "attention_norm"))
  out += linear(layer + "intermediate.dense", ("layers", "intermediate"))
  out += linear(layer + "output.dense", ("layers", "output"))
  return out + norm(layer + "output.LayerNorm", ("layers", "output_norm"))


def rules(cfg: TextTowerConfig) -> list[Rule]:
  """PyTorch -> Flax name table (names of the bare model; ``to_flax`` finds any prefix:
  ``bert.``, ``roberta.``, ``text_model.`` of CLIP / SigLIP). Rules for params the config does
  not build (a token-type table, MPNet's bias, SigLIP's head) are skipped by ``to_flax``."""
  return _pre_norm_rules() if cfg.pre_norm else _post_norm_rules(cfg.model_type == "mpnet")


def abstract_params(cfg: TextTowerConfig, num_layers_to_run: int | None = None) -> dict[str, Any]:
  """Shapes of the module's float32 params when it runs ``num_layers_to_run`` blocks."""
  return stack.text_param_shapes(TextTower(cfg, num_layers_to_run=num_layers_to_run))


def load_params(state: Mapping[str, np.ndarray], cfg: TextTowerConfig,
                num_layers_to_run: int | None = None, dtype: Any = None) -> dict[str, Any]:
  """Host numpy params of :func:`build`'s module from a PyTorch-named state dict; only the first
  ``num_layers_to_run`` blocks are read; ``dtype`` casts floating params (None: float32)."""
  count = stack.layers_to_run(cfg.num_layers, num_layers_to_run)
  table = rules(cfg)
  anchor = table[0].torch
  if not any(k == anchor or k.endswith("." + anchor) for k in state):
    raise ValueError(f"these weights are not a {cfg.model_type} text checkpoint: no {anchor}")
  return weights_lib.to_flax(dict(state), table, count, abstract_params(cfg, count), dtype)


def eos_index(input_ids: jnp.ndarray, eos_token_id: int | None) -> jnp.ndarray:
  """CLIP's pooled position per row: the first ``eos_token_id`` (the largest id for old configs
  with ``eos_token_id`` 2, as transformers)."""
  if eos_token_id is None or eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


def pool(model: TextTower, outputs: Mapping[str, Any], input_ids: jnp.ndarray,
         attention_mask: jnp.ndarray, pooling: str) -> dict[str, jnp.ndarray]:
  """Features from a :class:`TextTower`'s outputs, float32.

  "cls": BERT-likes token 0; CLIP the EOS token (its ``pooler_output``); SigLIP its head on the
  last position (its ``pooler_output``; needs every layer run). "mean" over real tokens, "last"
  the last real token, "tokens" every token with its mask.
  """
  pooling_lib.check_pooling(pooling, POOLINGS, "text")
  c = model.config
  tokens = outputs["last_hidden_state"]
  if pooling == "cls" and c.model_type == "siglip":
    if "pooler_output" not in outputs:
      raise ValueError("SigLIP's cls pooling is its head on the final layer; with "
                       "num_layers_to_run < all, pool with 'last' or 'mean'")
    return {"pooled": outputs["pooler_output"].astype(jnp.float32)}
  cls_index = eos_index(input_ids, c.eos_token_id) if c.model_type == "clip" else None
  return pooling_lib.pool_text(tokens, attention_mask, pooling, cls_index=cls_index)
