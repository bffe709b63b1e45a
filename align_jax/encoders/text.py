"""Frozen text encoders on align_jax's own modules: BERT, RoBERTa, XLM-R, MPNet, the CLIP and SigLIP
text towers (:mod:`align_jax.encoders.bert`), decoder LLMs (Llama, Mistral, Qwen2, Qwen3, Gemma;
:mod:`align_jax.encoders.decoder`), T5 / mT5 encoder stacks (:mod:`align_jax.encoders.t5`) and
NV-Embed-v2 (a bidirectional Mistral with its latent-attention pooler, pooling "latent";
:mod:`align_jax.encoders.nvembed`).

``TextEncoder.apply(params, {"input_ids", "attention_mask"})`` is pure and jit-able; ``preprocess``
is the checkpoint's own tokenizer with fixed-length padding (after an optional instruction
prefix), so every batch has one shape. Weights come from the checkpoint's safetensors through
:mod:`align_jax.encoders.weights` (no transformers model class, no torch). Decoder LLMs, T5
and NV-Embed keep their params as host numpy arrays, so a 7B model is placed by the sharding
rules, never whole on one accelerator.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.model import interfaces
from align_jax.encoders import bert
from align_jax.encoders import decoder
from align_jax.encoders import hub
from align_jax.encoders import layers as layers_lib
from align_jax.encoders import nvembed
from align_jax.encoders import pooling as pooling_lib
from align_jax.encoders import t5
from align_jax.encoders import weights as weights_lib
from align_jax.encoders.image import cast_params, compute_dtype

# model_type -> the family module (read_config, build, rules, abstract_params, load_params, pool,
# POOLINGS, DEFAULT_POOLING).
TEXT_FAMILIES: dict[str, ModuleType] = {
  **{m: bert for m in bert.MODEL_TYPES},
  **{m: decoder for m in decoder.MODEL_TYPES},
  **{m: t5 for m in t5.MODEL_TYPES},
  **{m: nvembed for m in nvembed.MODEL_TYPES},
}
# Large: their params stay host numpy until the sharding rules place them.
_HOST_FAMILIES = (decoder, t5, nvembed)


def prepare_tokenizer(tokenizer: Any, padding_side: str | None, name: str) -> Any:
  """Gives a decoder / T5 tokenizer a pad token (EOS, else UNK) and, if asked, a padding side.

  Llama / Mistral tokenizers have no pad token; padding is masked out, so which id pads does not
  change features.
  """
  if padding_side is not None:
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer.padding_side = padding_side
  if tokenizer.pad_token is None:
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
      raise ValueError(f"{name}: its tokenizer has no pad, EOS or UNK token to pad with; add a "
                       "pad_token to its tokenizer_config.json")
    tokenizer.pad_token = fallback
  return tokenizer


def _load_tokenizer(folder: str) -> Any:
  import transformers  # tokenizer classes only
  from transformers.utils import logging as hf_logging
  level = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()
  try:
    return transformers.AutoTokenizer.from_pretrained(folder)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"{folder}: cannot load its tokenizer ({e}); a text encoder folder needs "
                     "the checkpoint's tokenizer files (tokenizer.json or vocab files)") from e
  finally:
    hf_logging.set_verbosity(level)


def family_of(raw_config: dict[str, Any], name: str) -> ModuleType:
  """The family module of a ``config.json`` dict; ValueError in one line listing the supported
  model types."""
  model_type = raw_config.get("model_type")
  if model_type not in TEXT_FAMILIES:
    raise ValueError(f"{name}: unsupported text encoder family {model_type!r}; "
                     f"valid: {', '.join(TEXT_FAMILIES)}")
  return TEXT_FAMILIES[model_type]


def position_limit(raw_config: dict[str, Any], name: str = "text encoder") -> int | None:
  """The most tokens per text a checkpoint's position table takes, from its ``config.json``
  dict; None for T5 / mT5 (relative positions only) and decoders whose config names no
  ``max_position_embeddings``. RoBERTa-style encoders, whose position ids start after the
  padding id, lose ``padding_idx + 1`` positions."""
  family = family_of(raw_config, name)
  config = family.read_config(raw_config)
  if family is bert:
    limit = int(config.max_positions)
    return limit - (int(config.padding_idx) + 1 if config.padding_idx is not None else 0)
  source = (raw_config.get("text_config") or {}) if family is nvembed else raw_config
  if family in (decoder, nvembed) and source.get("max_position_embeddings"):
    return int(source["max_position_embeddings"])
  return None


class TextEncoder:
  """A frozen text encoder: params, a pure ``apply`` and its tokenizer.

  Attributes:
    params: the frozen parameter pytree (never trained).
    output_dim: width of the pooled feature (the hidden size; SigLIP's head width for "cls").
    tokenizer: the checkpoint's transformers tokenizer.
    max_length: fixed token length of ``preprocess``.
    name: the name or folder it was loaded from.
    pooling: the pooling ``apply`` returns.
    layers: the layer indices ``apply`` pools (see :mod:`align_jax.encoders.layers`); ``(N,)``,
      the final output, by default. Only blocks up to the deepest one are loaded and run.
    prefix: text put before every input by ``preprocess`` (an embedder's instruction).
    config: the family config (e.g. :class:`align_jax.encoders.decoder.DecoderConfig`).
    family: the family module (:mod:`align_jax.encoders.bert`, ``decoder``, ``t5`` or
      ``nvembed``).
    prefix_tokens: NV-Embed only: leading tokens of each text left out of its pooling (its
      instruction, as NV-Embed masks it); 0 otherwise.
    revision: the hub commit the checkpoint was resolved to (None for a local folder).
    input_kind: ``interfaces.RAW``: it reads strings (a ``interfaces.RawInputEncoder``).
  """

  input_kind = interfaces.RAW

  def __init__(self, *, name: str, family: ModuleType, config: Any, params: Any, tokenizer: Any,
               pooling: str, max_length: int, dtype: jnp.dtype,
               layers: tuple[int, ...] | None = None, prefix: str = "",
               bidirectional: bool = False, revision: str | None = None):
    self.name = name
    self.family = family
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.pooling = pooling
    self.max_length = max_length
    self.dtype = dtype
    self.bidirectional = bidirectional
    self.revision = revision
    self.num_layers = int(config.num_layers)
    self.layers = (self.num_layers,) if layers is None else tuple(layers)
    self.prefix = str(prefix)
    nv = family is nvembed
    self.prefix_tokens = (len(tokenizer.tokenize(self.prefix))
                          if nv and config.mask_instruction and self.prefix else 0)
    self._suffix = tokenizer.eos_token if nv and config.add_eos else ""
    width = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0))
    head = int(getattr(config, "head_size", 0))
    self.output_dim = head if (pooling == "cls" and head) else width
    self._jit_apply = jax.jit(self.apply)
    self._placed = (None, None)  # (params, their device copy) for encode

  @classmethod
  def from_pretrained(cls, name_or_path: str, pooling: str = "mean", max_length: int = 77,
                      dtype: str = "float32", layer: Any = layers_lib.FINAL, prefix: str = "",
                      padding_side: str | None = None, abstract: bool = False,
                      bidirectional: bool = False) -> "TextEncoder":
    """Loads a checkpoint (local folder or hub id) and its tokenizer as a frozen encoder.

    Args:
      name_or_path: folder with config.json, weights (safetensors, single or sharded, or a Flax
        msgpack) and tokenizer files, or a hub id (from the local cache when offline).
      pooling: "mean" (over non-padding tokens, as sentence-transformers), "cls" (first token;
        CLIP's EOS token; SigLIP's head; not for decoders / T5), "last" (the last non-padding
        token, as decoder-LLM embedders), "tokens", or "latent" (NV-Embed's latent-attention
        pooler; NV-Embed also takes "mean" and "tokens" of its bidirectional Mistral).
      max_length: tokens per text (padded / truncated, the prefix included); at most the model's
        position table (decoders and T5 have none).
      dtype: compute (and frozen-param) dtype, e.g. "bfloat16"; outputs are always float32.
      layer: which layer's tokens are pooled, or a list of layers to average (see
        :mod:`align_jax.encoders.layers`): -1 (default) is the final output (after the final
        norm of CLIP, the LLMs and T5); other indices are HF's ``hidden_states[k]``.
      prefix: put before every text by ``preprocess`` (and so in training, evaluation prompts and
        feature extraction), e.g. E5-Mistral's ``"Instruct: ...\\nQuery: "``; its tokens are
        pooled like the text's, except NV-Embed's, which leaves it out of the pooled mean as
        NV-Embed does (``is_mask_instruction``).
      padding_side: "left" or "right" for decoders and T5 (default: the tokenizer's own); either
        gives the same features (NV-Embed: its config's ``padding_side``, right).
      abstract: ``params`` are ``jax.ShapeDtypeStruct``s, the shapes and dtypes loading would give,
        from ``config.json`` (and the tokenizer files) alone: no weights file is needed or read.
        For ahead-of-time compiles (align_jax.train.aot); ``apply`` needs real params.
      bidirectional: decoders attend to every real token (LLM2Vec / NV-Embed style) instead of
        causally; NV-Embed always does.
    """
    pooling_lib.check_pooling(pooling, pooling_lib.TEXT_POOLINGS, "text")
    dtype = compute_dtype(dtype)
    folder, revision = hub.resolve_with_revision(name_or_path, "--config.model.text_encoder",
                                                 weights=not abstract)
    raw_config = weights_lib.read_config(folder)
    model_type = raw_config.get("model_type")
    family = family_of(raw_config, str(name_or_path))
    config = family.read_config(raw_config)
    tokenizer = _load_tokenizer(folder)
    name = str(name_or_path)
    layers = layers_lib.parse_layers(layer, config.num_layers, "--config.model.text_layer")
    nv = family is nvembed
    if pooling == "latent" and not nv:
      raise ValueError(f"{name} ({model_type}): pooling 'latent' is NV-Embed's latent-attention "
                       "pooler (model_type nvembed); use --config.model.text_pooling=mean, last "
                       "or cls")
    if nv and pooling not in nvembed.POOLINGS:
      raise ValueError(f"{name} (NV-Embed) attends bidirectionally, so no single token sums up a "
                       f"text: use --config.model.text_pooling=latent (its pooler), mean or tokens")
    if pooling == "latent" and not layers_lib.is_final(layers, config.num_layers):
      raise ValueError(f"{name}: NV-Embed's 'latent' pooler reads the final output; use "
                       "--config.model.text_layer=-1 with it, or pool another layer by mean")
    if family is bert:
      if padding_side is not None:
        raise ValueError(f"{name}: padding_side is for decoder LLMs and T5; {model_type} pads "
                         "on its tokenizer's side (its position ids assume it)")
    else:
      if pooling == "cls":
        raise ValueError(f"{name} ({model_type}) has no summary token at position 0, so 'cls' "
                         "pooling would give one feature for every text: use --config.model."
                         "text_pooling=last (the final token, as E5-Mistral) or mean")
      tokenizer = prepare_tokenizer(
          tokenizer, padding_side if padding_side or not nv else config.padding_side, name)
    if bidirectional and family not in (decoder, nvembed):
      raise ValueError(f"{name}: bidirectional is for decoder LLMs; {model_type} attends as "
                       "it was trained")
    if pooling == "cls" and config.model_type == "siglip" and not layers_lib.is_final(
        layers, config.num_layers):
      raise ValueError(f"{name}: SigLIP's 'cls' pooling is its head on the final output; use "
                       "--config.model.text_layer=-1 with it, or pool another layer by mean")
    limit = position_limit(raw_config)
    if max_length < 1 or (limit is not None and max_length > limit):
      raise ValueError(f"max_length must be in [1, {limit}] for {name_or_path} (its position "
                       f"table), got {max_length}")
    run = max(layers)
    if abstract:
      params = cast_params(family.abstract_params(config, run), dtype)
    else:
      state = weights_lib.read_state_dict(folder)
      if family in _HOST_FAMILIES:
        params = family.load_params(state, config, run, dtype=dtype)
      else:
        params = cast_params(family.load_params(state, config, run), dtype)
    encoder = cls(name=name, family=family, config=config, params=params, tokenizer=tokenizer,
                  pooling=pooling, max_length=max_length, dtype=dtype, layers=layers,
                  prefix=prefix, bidirectional=bidirectional, revision=revision)
    if nv and encoder.prefix_tokens >= max_length and pooling in ("latent", "mean"):
      raise ValueError(f"{name}: the prefix takes {encoder.prefix_tokens} of the {max_length} "
                       "tokens and NV-Embed leaves it out of the pooling, so nothing would be "
                       "pooled; raise --config.model.max_text_length or shorten the prefix")
    return encoder

  def _module(self, num_layers: int) -> Any:
    if self.family is nvembed:
      return nvembed.build(self.config, self.dtype, num_layers)
    if self.family is decoder:
      return decoder.build(self.config, self.dtype, num_layers, bidirectional=self.bidirectional)
    return self.family.build(self.config, self.dtype, num_layers)

  def _model_mask(self, attention_mask: jnp.ndarray) -> jnp.ndarray:
    """The mask the module sees: SigLIP's text tower was trained on padded ids without one."""
    if self.family is bert and self.config.model_type == "siglip":
      return jnp.ones_like(attention_mask)
    return attention_mask

  def _pool(self, module: Any, out: dict[str, Any], tokens: jnp.ndarray, input_ids: jnp.ndarray,
            attention_mask: jnp.ndarray, pooling: str) -> dict[str, jnp.ndarray]:
    if self.family is bert:
      return bert.pool(module, dict(out, last_hidden_state=tokens), input_ids, attention_mask,
                       pooling)
    if self.family is nvembed:
      if pooling == "latent":
        return {"pooled": out["pooler_output"]}
      if pooling == "mean":  # NV-Embed's pool mask: the instruction left out, as its pooler
        attention_mask = nvembed.pool_mask(attention_mask, self.prefix_tokens)
    return pooling_lib.pool_text(tokens, attention_mask, pooling)

  def apply(self, params: Any, inputs: dict[str, Any]) -> dict[str, jnp.ndarray]:
    """Features of tokenized text; pure and jit-able.

    Args:
      params: the frozen params (``self.params`` or a sharded copy).
      inputs: ``{"input_ids": int32 [B, L], "attention_mask": int32 [B, L]}``.

    Returns:
      ``{"pooled": float32 [B, D]}``, or for "tokens" ``{"tokens": [B, L, D], "mask": bool
      [B, L]}``, of ``self.layers`` (the final output by default).
    """
    input_ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    attention_mask = jnp.asarray(inputs["attention_mask"], jnp.int32)
    run = max(self.layers)
    module = self._module(run)
    many = len(self.layers) > 1
    extra = {}
    if self.pooling == "latent":
      extra["pool_mask"] = nvembed.pool_mask(attention_mask, self.prefix_tokens)
    out = module.apply({"params": params}, input_ids, self._model_mask(attention_mask),
                       output_hidden_states=many, **extra)
    tokens = (layers_lib.combine(out["hidden_states"], self.layers) if many
              else out["last_hidden_state"])
    return self._pool(module, out, tokens, input_ids, attention_mask, self.pooling)

  def apply_all_layers(self, params: Any, inputs: dict[str, Any]) -> jnp.ndarray:
    """Pooled features of every layer's output (embeddings first): float32 [layers + 1, B, D].

    Layer k is what ``layer=k`` gives (the last one is ``apply``'s final output, after CLIP's
    final LayerNorm). For choosing which layer to align (RECIPES §5, STRUCTURE); ``pooling``
    "tokens" pools by mean, SigLIP's "cls" (its head) by the last token, NV-Embed's "latent"
    (its pooler, trained on the final output only) by mean over its pool mask.
    """
    input_ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    attention_mask = jnp.asarray(inputs["attention_mask"], jnp.int32)
    if max(self.layers) != self.num_layers:
      raise ValueError("apply_all_layers needs every layer: load the encoder with layer=-1")
    module = self._module(self.num_layers)
    out = module.apply({"params": params}, input_ids, self._model_mask(attention_mask),
                       output_hidden_states=True)
    pooling = "mean" if self.pooling in ("tokens", "latent") else self.pooling
    if pooling == "cls" and self.family is bert and self.config.model_type == "siglip":
      pooling = "last"
    return jnp.stack([self._pool(module, {}, h, input_ids, attention_mask, pooling)["pooled"]
                      for h in out["hidden_states"]])

  def preprocess(self, texts: Sequence[str] | str) -> dict[str, np.ndarray]:
    """Tokenizes ``prefix + text`` to fixed shapes (padding="max_length", truncation).

    Returns int32 ``input_ids`` and ``attention_mask``; pads on the tokenizer's side. NV-Embed's
    texts get its EOS token appended first, as NV-Embed's own ``encode`` does.
    """
    if isinstance(texts, str):
      texts = [texts]
    tokens = self.tokenizer([self.prefix + t + self._suffix for t in texts], padding="max_length",
                            truncation=True, max_length=self.max_length, return_tensors="np")
    return {"input_ids": tokens["input_ids"].astype(np.int32),
            "attention_mask": tokens["attention_mask"].astype(np.int32)}

  def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Pooled features (or tokens, for "tokens") of raw texts, in batches of ``batch_size``.

    The last batch is padded with empty strings to ``batch_size`` so the jitted forward compiles
    once; their rows are dropped.
    """
    if isinstance(texts, str):
      texts = [texts]
    outputs = []
    for start in range(0, len(texts), batch_size):
      chunk = list(texts[start:start + batch_size])
      inputs = self.preprocess(chunk + [""] * (batch_size - len(chunk)))
      out = self._jit_apply(self._device_params(), inputs)
      outputs.append(np.asarray(out["pooled" if "pooled" in out else "tokens"])[:len(chunk)])
    if not outputs:
      raise ValueError("encode got no texts")
    return np.concatenate(outputs)

  def _device_params(self) -> Any:
    """``params`` on the default device, placed once (host-resident params would move per call)."""
    if self._placed[0] is not self.params:
      self._placed = (self.params, jax.device_put(self.params))
    return self._placed[1]
