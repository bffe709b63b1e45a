"""Frozen text encoders (BERT, RoBERTa, XLM-RoBERTa, CLIP text tower) from Hugging Face Flax models.

``TextEncoder.apply(params, {"input_ids", "attention_mask"})`` is pure and jit-able; ``preprocess``
is the checkpoint's own tokenizer with fixed-length padding, so every batch has one shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.encoders import hub
from align_jax.encoders import pooling as pooling_lib
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
  """
  flax_class: str
  config_class: str
  padding_positions: bool
  token_type_ids: bool
  has_pooler: bool
  eos_summary: bool


_CLIP_TEXT = TextFamily("FlaxCLIPTextModel", "CLIPTextConfig", False, False, False, True)
TEXT_FAMILIES: dict[str, TextFamily] = {
  "bert": TextFamily("FlaxBertModel", "BertConfig", False, True, True, False),
  "roberta": TextFamily("FlaxRobertaModel", "RobertaConfig", True, True, True, False),
  "xlm-roberta": TextFamily("FlaxXLMRobertaModel", "XLMRobertaConfig", True, True, True, False),
  "clip": _CLIP_TEXT,
  "clip_text_model": _CLIP_TEXT,
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
  """

  def __init__(self, *, name: str, family: TextFamily, module: Any, params: Any, config: Any,
               tokenizer: Any, pooling: str, max_length: int, dtype: jnp.dtype):
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
    self._jit_apply = jax.jit(self.apply)

  @classmethod
  def from_pretrained(cls, name_or_path: str, pooling: str = "mean", max_length: int = 77,
                      dtype: str = "float32", abstract: bool = False) -> "TextEncoder":
    """Loads a checkpoint (local folder or hub id) and its tokenizer as a frozen Flax encoder.

    Args:
      name_or_path: folder with config.json, weights (Flax msgpack or one PyTorch safetensors) and
        tokenizer files, or a hub id (from the local cache when offline).
      pooling: "mean" (over non-padding tokens, as sentence-transformers), "cls" (first token;
        the EOS token for CLIP) or "tokens".
      max_length: tokens per text (padded / truncated); at most the model's position table.
      dtype: compute (and frozen-param) dtype, e.g. "bfloat16"; outputs are always float32.
      abstract: ``params`` are ``jax.ShapeDtypeStruct``s, the shapes and dtypes loading would give,
        from ``config.json`` (and the tokenizer files) alone: no weights file is needed or read.
        For ahead-of-time compiles (align_jax.aot); ``apply`` needs real params.
    """
    pooling_lib.check_pooling(pooling, pooling_lib.TEXT_POOLINGS, "text")
    dtype = compute_dtype(dtype)
    folder, _, family = hub.resolve_family(name_or_path, TEXT_FAMILIES, "text",
                                           "--config.model.text_encoder", weights=not abstract)
    import transformers
    with hub.quiet_transformers():
      config = getattr(transformers, family.config_class).from_pretrained(folder)
      try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
      except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: cannot load its tokenizer ({e}); a text encoder folder needs "
                         "the checkpoint's tokenizer files (tokenizer.json or vocab files)") from e
    limit = int(config.max_position_embeddings)
    if family.padding_positions:
      limit -= int(config.pad_token_id) + 1
    if not 1 <= max_length <= limit:
      raise ValueError(f"max_length must be in [1, {limit}] for {name_or_path} (its position "
                       f"table), got {max_length}")
    flax_class = getattr(transformers, family.flax_class)
    kwargs = {"add_pooling_layer": False} if family.has_pooler else {}
    module = flax_class.module_class(config=config, dtype=dtype, **kwargs)
    encoder = cls(name=str(name_or_path), family=family, module=module, params=None,
                  config=config, tokenizer=tokenizer, pooling=pooling, max_length=max_length,
                  dtype=dtype)
    ids = jax.ShapeDtypeStruct((1, max_length), jnp.int32)
    expected = jax.eval_shape(lambda key, ids: module.init(key, *encoder._module_args(ids, ids)),
                              jax.random.key(0), ids)["params"]
    params = expected if abstract else hub.load_flax_params(flax_class, folder, config, expected)
    encoder.params = cast_params(params, dtype)
    return encoder

  def _module_args(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray) -> tuple:
    """Positional arguments of the family's module call."""
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
      ``{"pooled": float32 [B, D]}``, or for "tokens" ``{"tokens": [B, L, D], "mask": bool [B, L]}``.
    """
    input_ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    attention_mask = jnp.asarray(inputs["attention_mask"], jnp.int32)
    out = self.module.apply({"params": params}, *self._module_args(input_ids, attention_mask),
                            deterministic=True)
    cls_index = self._eos_index(input_ids) if self.family.eos_summary else None
    return pooling_lib.pool_text(out.last_hidden_state, attention_mask, self.pooling, cls_index)

  def apply_all_layers(self, params: Any, inputs: dict[str, Any]) -> jnp.ndarray:
    """Pooled features of every layer's output (embeddings first): float32 [layers + 1, B, D].

    For choosing which layer to align (RECIPES §5, STRUCTURE); ``pooling`` "tokens" pools by mean.
    """
    input_ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    attention_mask = jnp.asarray(inputs["attention_mask"], jnp.int32)
    out = self.module.apply({"params": params}, *self._module_args(input_ids, attention_mask),
                            deterministic=True, output_hidden_states=True)
    pooling = "mean" if self.pooling == "tokens" else self.pooling
    cls_index = self._eos_index(input_ids) if self.family.eos_summary else None
    return jnp.stack([pooling_lib.pool_text(h, attention_mask, pooling, cls_index)["pooled"]
                      for h in out.hidden_states])

  def preprocess(self, texts: Sequence[str] | str) -> dict[str, np.ndarray]:
    """Tokenizes to fixed shapes: padding="max_length", truncation, ``max_length``; int32 arrays."""
    if isinstance(texts, str):
      texts = [texts]
    tokens = self.tokenizer(list(texts), padding="max_length", truncation=True,
                            max_length=self.max_length, return_tensors="np")
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
      out = self._jit_apply(self.params, inputs)
      outputs.append(np.asarray(out["pooled" if "pooled" in out else "tokens"])[:len(chunk)])
    if not outputs:
      raise ValueError("encode got no texts")
    return np.concatenate(outputs)
