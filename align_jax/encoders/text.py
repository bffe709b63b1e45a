"""Frozen text encoders from Hugging Face Flax models: BERT, RoBERTa, XLM-RoBERTa, CLIP's text
tower, decoder LLMs (Llama, Mistral, Gemma; :mod:`align_jax.encoders.decoder_text`) and T5 / mT5
encoder stacks (GTR / sentence-T5 style).

``TextEncoder.apply(params, {"input_ids", "attention_mask"})`` is pure and jit-able; ``preprocess``
is the checkpoint's own tokenizer with fixed-length padding (after an optional instruction
prefix), so every batch has one shape. Decoder LLMs and T5 keep their params in host memory
(:mod:`align_jax.encoders.host_weights`), so a 7B model is placed by the sharding rules, never
whole on one accelerator.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import interfaces
from align_jax.encoders import decoder_text
from align_jax.encoders import host_weights
from align_jax.encoders import hub
from align_jax.encoders import layers as layers_lib
from align_jax.encoders import pooling as pooling_lib
from align_jax.encoders import t5_compat
from align_jax.encoders.image import cast_params, compute_dtype


@dataclasses.dataclass(frozen=True)
class TextFamily:
  """How to run one text model family.

  Attributes:
    flax_class: transformers Flax model class name.
    config_class: transformers config class (for CLIP, the text sub-config of a full checkpoint).
    padding_positions: position ids count from ``pad_token_id + 1`` over non-pad tokens
      (RoBERTa / XLM-R, fairseq style); otherwise ``arange``. Using ``arange`` for RoBERTa shifts
      every position and changes outputs by up to ~3.
    token_type_ids: the module takes token type ids (all zeros here).
    has_pooler: the module takes ``add_pooling_layer`` (left out: not a feature).
    eos_summary: "cls" pooling takes the EOS token (CLIP's pooled text feature) instead of token 0.
    kind: "encoder" (the BERT-likes and CLIP), "decoder" (causal LLMs: position ids from the
      attention mask so left padding is right, last-token pooling, module config of
      ``decoder_text.module_config``) or "t5" (T5 encoder stack: relative positions, so no
      position ids and no length limit). Decoders and T5 have no summary token at position 0
      ("cls" is refused) and keep their params on the host.
  """
  flax_class: str
  config_class: str
  padding_positions: bool
  token_type_ids: bool
  has_pooler: bool
  eos_summary: bool
  kind: str = "encoder"


_CLIP_TEXT = TextFamily("FlaxCLIPTextModel", "CLIPTextConfig", False, False, False, True)
TEXT_FAMILIES: dict[str, TextFamily] = {
  "bert": TextFamily("FlaxBertModel", "BertConfig", False, True, True, False),
  "roberta": TextFamily("FlaxRobertaModel", "RobertaConfig", True, True, True, False),
  "xlm-roberta": TextFamily("FlaxXLMRobertaModel", "XLMRobertaConfig", True, True, True, False),
  "clip": _CLIP_TEXT,
  "clip_text_model": _CLIP_TEXT,
  "llama": TextFamily("FlaxLlamaModel", "LlamaConfig", False, False, False, False, "decoder"),
  "mistral": TextFamily("FlaxMistralModel", "MistralConfig", False, False, False, False, "decoder"),
  "gemma": TextFamily("FlaxGemmaModel", "GemmaConfig", False, False, False, False, "decoder"),
  "t5": TextFamily("FlaxT5EncoderModel", "T5Config", False, False, False, False, "t5"),
  "mt5": TextFamily("FlaxMT5EncoderModel", "MT5Config", False, False, False, False, "t5"),
}


def padding_position_ids(input_ids: jnp.ndarray, padding_idx: int) -> jnp.ndarray:
  """RoBERTa position ids: ``padding_idx + 1 + rank`` for real tokens, ``padding_idx`` for pads."""
  mask = (input_ids != padding_idx).astype(jnp.int32)
  return (jnp.cumsum(mask, axis=1) * mask + padding_idx).astype(jnp.int32)


class TextEncoder:
  """A frozen text encoder: params, a pure ``apply`` and its tokenizer.

  Attributes:
    params: the frozen parameter pytree (never trained).
    output_dim: width of the pooled feature (the hidden size).
    tokenizer: the checkpoint's transformers tokenizer.
    max_length: fixed token length of ``preprocess``.
    name: the name or folder it was loaded from.
    pooling: the pooling ``apply`` returns.
    layers: the layer indices ``apply`` pools (see :mod:`align_jax.encoders.layers`); ``(N,)``,
      the final output, by default.
    prefix: text put before every input by ``preprocess`` (an embedder's instruction).
    input_kind: ``interfaces.RAW``: it reads strings (a ``interfaces.RawInputEncoder``).
  """

  input_kind = interfaces.RAW

  def __init__(self, *, name: str, family: TextFamily, module: Any, params: Any, config: Any,
               tokenizer: Any, pooling: str, max_length: int, dtype: jnp.dtype,
               layers: tuple[int, ...] | None = None, prefix: str = ""):
    self.name = name
    self.family = family
    self.module = module
    self.params = params
    self.config = config
    self.tokenizer = tokenizer
    self.pooling = pooling
    self.max_length = max_length
    self.dtype = dtype
    self.output_dim = int(config.hidden_size)
    self.num_layers = int(config.num_hidden_layers)
    self.layers = (self.num_layers,) if layers is None else tuple(layers)
    self.prefix = str(prefix)
    self._jit_apply = jax.jit(self.apply)
    self._placed = (None, None)  # (params, their device copy) for encode

  @classmethod
  def from_pretrained(cls, name_or_path: str, pooling: str = "mean", max_length: int = 77,
                      dtype: str = "float32", layer: Any = layers_lib.FINAL, prefix: str = "",
                      padding_side: str | None = None, abstract: bool = False) -> "TextEncoder":
    """Loads a checkpoint (local folder or hub id) and its tokenizer as a frozen Flax encoder.

    Args:
      name_or_path: folder with config.json, weights (Flax msgpack or one PyTorch safetensors) and
        tokenizer files, or a hub id (from the local cache when offline).
      pooling: "mean" (over non-padding tokens, as sentence-transformers), "cls" (first token;
        the EOS token for CLIP; not for decoders / T5), "last" (the last non-padding token, as
        decoder-LLM embedders) or "tokens".
      max_length: tokens per text (padded / truncated, the prefix included); at most the model's
        position table (T5 has none).
      dtype: compute (and frozen-param) dtype, e.g. "bfloat16"; outputs are always float32.
      layer: which layer's tokens are pooled, or a list of layers to average (see
        :mod:`align_jax.encoders.layers`): -1 (default) is the final output (after the final
        norm of CLIP, the LLMs and T5), as always; other indices are HF's ``hidden_states[k]``.
      prefix: put before every text by ``preprocess`` (and so in training, evaluation prompts and
        feature extraction), e.g. E5-Mistral's ``"Instruct: ...\nQuery: "``; its tokens are
        pooled like the text's.
      padding_side: "left" or "right" for decoders and T5 (default: the tokenizer's own); either
        gives the same features.
      abstract: ``params`` are ``jax.ShapeDtypeStruct``s, the shapes and dtypes loading would give,
        from ``config.json`` (and the tokenizer files) alone: no weights file is needed or read.
        For ahead-of-time compiles (align_jax.aot); ``apply`` needs real params.
    """
    pooling_lib.check_pooling(pooling, pooling_lib.TEXT_POOLINGS, "text")
    dtype = compute_dtype(dtype)
    folder, model_type, family = hub.resolve_family(name_or_path, TEXT_FAMILIES, "text",
                                                    "--config.model.text_encoder",
                                                    weights=not abstract)
    import transformers
    with hub.quiet_transformers():
      config = getattr(transformers, family.config_class).from_pretrained(folder)
      try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
      except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: cannot load its tokenizer ({e}); a text encoder folder needs "
                         "the checkpoint's tokenizer files (tokenizer.json or vocab files)") from e
    name = str(name_or_path)
    layers = layers_lib.parse_layers(layer, int(config.num_hidden_layers),
                                     "--config.model.text_layer")
    module_config = config
    if family.kind == "encoder":
      if padding_side is not None:
        raise ValueError(f"{name}: padding_side is for decoder LLMs and T5; {model_type} pads "
                         "on its tokenizer's side (its position ids assume it)")
    else:
      if pooling == "cls":
        raise ValueError(f"{name} ({model_type}) has no summary token at position 0, so 'cls' "
                         "pooling would give one feature for every text: use --config.model."
                         "text_pooling=last (the final token, as E5-Mistral) or mean")
      tokenizer = decoder_text.prepare_tokenizer(tokenizer, padding_side, name)
    if family.kind == "decoder":
      decoder_text.check_supported(config, model_type, name)
      module_config = decoder_text.module_config(config, model_type, max_length)
    if family.kind == "t5":
      t5_compat.patch_flax_t5()
    limit = None if family.kind == "t5" else int(config.max_position_embeddings)
    if family.padding_positions:
      limit -= int(config.pad_token_id) + 1
    if max_length < 1 or (limit is not None and max_length > limit):
      raise ValueError(f"max_length must be in [1, {limit}] for {name_or_path} (its position "
                       f"table), got {max_length}")
    flax_class = getattr(transformers, family.flax_class)
    kwargs = {"add_pooling_layer": False} if family.has_pooler else {}
    module = flax_class.module_class(config=module_config, dtype=dtype, **kwargs)
    encoder = cls(name=name, family=family, module=module, params=None,
                  config=config, tokenizer=tokenizer, pooling=pooling, max_length=max_length,
                  dtype=dtype, layers=layers, prefix=prefix)
    ids = jax.ShapeDtypeStruct((1, max_length), jnp.int32)
    expected = jax.eval_shape(lambda key, ids: module.init(key, *encoder._module_args(ids, ids)),
                              jax.random.key(0), ids)["params"]
    if abstract:
      encoder.params = cast_params(expected, dtype)
    elif family.kind == "encoder":
      encoder.params = cast_params(hub.load_flax_params(flax_class, folder, config, expected),
                                   dtype)
    else:
      encoder.params = host_weights.load_params(flax_class, folder, config, expected, dtype)
    return encoder

  def _module_args(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray) -> tuple:
    """Positional arguments of the family's module call."""
    if self.family.kind == "t5":
      return input_ids, attention_mask
    if self.family.kind == "decoder":
      return input_ids, attention_mask, decoder_text.mask_position_ids(attention_mask)
    if self.family.padding_positions:
      position_ids = padding_position_ids(input_ids, int(self.config.pad_token_id))
    else:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32),
                                      input_ids.shape)
    if self.family.token_type_ids:
      return input_ids, attention_mask, jnp.zeros_like(input_ids), position_ids
    return input_ids, attention_mask, position_ids

  def _eos_index(self, input_ids: jnp.ndarray) -> jnp.ndarray:
    """CLIP's EOS position: argmax id for legacy configs (eos id 2), else first ``eos_token_id``."""
    eos = int(self.config.eos_token_id)
    if eos == 2:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos).astype(jnp.int32), axis=-1)

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
    args = self._module_args(input_ids, attention_mask)
    if layers_lib.is_final(self.layers, self.num_layers):
      out = self.module.apply({"params": params}, *args, deterministic=True)
      hidden = out.last_hidden_state
    else:
      out = self.module.apply({"params": params}, *args, deterministic=True,
                              output_hidden_states=True)
      hidden = layers_lib.combine(self._layer_tokens(out), self.layers)
    cls_index = self._eos_index(input_ids) if self.family.eos_summary else None
    return pooling_lib.pool_text(hidden, attention_mask, self.pooling, cls_index)

  @staticmethod
  def _layer_tokens(out: Any) -> list[jnp.ndarray]:
    """Layers 0..N (:mod:`align_jax.encoders.layers`): raw hidden states, then the final output."""
    return list(out.hidden_states[:-1]) + [out.last_hidden_state]

  def apply_all_layers(self, params: Any, inputs: dict[str, Any]) -> jnp.ndarray:
    """Pooled features of every layer's output (embeddings first): float32 [layers + 1, B, D].

    Layer k is what ``layer=k`` gives (the last one is ``apply``'s final output, after CLIP's
    final LayerNorm). For choosing which layer to align (RECIPES §5, STRUCTURE); ``pooling``
    "tokens" pools by mean.
    """
    input_ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    attention_mask = jnp.asarray(inputs["attention_mask"], jnp.int32)
    out = self.module.apply({"params": params}, *self._module_args(input_ids, attention_mask),
                            deterministic=True, output_hidden_states=True)
    pooling = "mean" if self.pooling == "tokens" else self.pooling
    cls_index = self._eos_index(input_ids) if self.family.eos_summary else None
    return jnp.stack([pooling_lib.pool_text(h, attention_mask, pooling, cls_index)["pooled"]
                      for h in self._layer_tokens(out)])

  def preprocess(self, texts: Sequence[str] | str) -> dict[str, np.ndarray]:
    """Tokenizes ``prefix + text`` to fixed shapes (padding="max_length", truncation).

    Returns int32 ``input_ids`` and ``attention_mask``; pads on the tokenizer's side.
    """
    if isinstance(texts, str):
      texts = [texts]
    tokens = self.tokenizer([self.prefix + t for t in texts], padding="max_length",
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
