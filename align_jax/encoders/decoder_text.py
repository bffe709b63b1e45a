"""Decoder LLMs (Llama, Mistral, Gemma) as frozen text encoders: what differs from BERT-likes.

Embedders built on decoder LLMs (E5-Mistral, SFR-Embedding, LLM2Vec-style models with causal
attention) read a text left to right and take the last token's state ("last" pooling; with the
EOS the tokenizer appends it is the only token that has seen the whole text) or the mean over
tokens. :class:`align_jax.encoders.TextEncoder` runs them through transformers' Flax models; this
module holds the decoder-specific parts:

* **Position ids from the attention mask** (``cumsum(mask) - 1``): with left padding (the default
  side of Llama / Gemma tokenizers) real tokens start at 0 whatever the padding, so a text's
  features do not depend on how much padding its batch needed.
* **A module config the Flax ports handle correctly** (:func:`module_config`): transformers'
  Flax Llama / Mistral / Gemma build position tables of ``max_position_embeddings`` rows at trace
  time (a 32k x 32k causal mask, 32k-row RoPE tables per layer for Mistral-7B) and slice the RoPE
  table's last axis to ``max_position_embeddings``; the module gets a copy sized to the text
  length instead (same numbers for every position used). Flax Mistral keeps one more key than
  PyTorch in its sliding window and attends to the token itself only when ``sliding_window`` is
  null; Flax Gemma reads ``hidden_activation`` where PyTorch 4.57 runs ``hidden_act``: the copy
  makes each equal to the PyTorch model.
* **What the Flax ports cannot run** (:func:`check_supported`): they compute rotary embeddings
  with theta 10,000 and no scaling (Llama-2, Mistral-7B-v0.1 and its embedders E5-Mistral /
  SFR-Embedding-Mistral, Gemma-1), and Llama / Mistral with ``head_dim = hidden_size / heads``;
  other checkpoints (Llama-3's theta 500,000, Mistral-7B-v0.2+'s 10^6, Mistral-Nemo's head_dim)
  are refused with one line instead of giving wrong features.
* **A pad token** (:func:`prepare_tokenizer`): Llama / Mistral tokenizers have none; the EOS
  token pads (padding is masked out, so which id pads does not change features).

NV-Embed-v2 (SAIL's strongest text tower) is not a transformers model: its hub code (model type
``nvembed``) runs Mistral with bidirectional attention and a latent-attention pooler, so it cannot
be loaded here; E5-Mistral-7B-instruct is the closest 7B Mistral embedder that is a plain
``MistralModel`` (see configs/dinov2_llm.py).
"""

from __future__ import annotations

import copy
from typing import Any

import jax.numpy as jnp

ROPE_THETA = 10000.0  # the only theta transformers' Flax Llama / Mistral / Gemma compute


def mask_position_ids(attention_mask: jnp.ndarray) -> jnp.ndarray:
  """Position ids [B, L] counting real tokens from 0 (``cumsum(mask) - 1``; 0 on leading pads)."""
  mask = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def head_dim(config: Any, model_type: str) -> int:
  """Width of one attention head (Gemma stores it; Llama / Mistral's Flax ports derive it)."""
  if model_type == "gemma":
    return int(config.head_dim)
  return int(config.hidden_size) // int(config.num_attention_heads)


def check_supported(config: Any, model_type: str, name: str) -> None:
  """ValueError naming the setting when transformers' Flax port would compute other features."""
  problems = []
  theta = float(getattr(config, "rope_theta", ROPE_THETA))
  if theta != ROPE_THETA:
    problems.append(f"rope_theta {theta:g} (the Flax port computes rotary embeddings with "
                    f"{ROPE_THETA:g} only)")
  if getattr(config, "rope_scaling", None):
    problems.append(f"rope_scaling {config.rope_scaling} (the Flax port has no RoPE scaling)")
  if model_type in ("llama", "mistral"):
    stored = getattr(config, "head_dim", None)
    if stored is not None and int(stored) != head_dim(config, model_type):
      problems.append(f"head_dim {stored} != hidden_size / num_attention_heads "
                      f"(the Flax port derives it)")
  if model_type == "llama" and getattr(config, "mlp_bias", False):
    problems.append("mlp_bias (the Flax port has no MLP biases)")
  if problems:
    raise ValueError(f"{name}: transformers' Flax {model_type} cannot run this checkpoint as "
                     f"PyTorch does: {'; '.join(problems)}. Supported: Llama-2-style, "
                     "Mistral-7B-v0.1-based (e.g. intfloat/e5-mistral-7b-instruct) and Gemma-1 "
                     "checkpoints")


def module_config(config: Any, model_type: str, max_length: int) -> Any:
  """A copy of ``config`` for the Flax module that gives PyTorch's outputs on ``max_length`` tokens.

  Position tables are sized ``max(max_length, 2 * head_dim)`` (the Flax RoPE table slices its
  feature axis by the row count); Mistral's sliding window is shifted by one to PyTorch's
  convention (keys ``i - window < j <= i``), or opened to the whole text when the window is null
  or longer than the text; Gemma's activation is PyTorch's ``hidden_act``.
  """
  out = copy.deepcopy(config)
  out.max_position_embeddings = max(int(max_length), 2 * head_dim(config, model_type))
  if model_type == "mistral":
    window = getattr(config, "sliding_window", None)
    if window is None or int(window) >= max_length:
      out.sliding_window = out.max_position_embeddings  # every earlier token of the text
    else:
      out.sliding_window = int(window) - 1  # Flax keeps j >= i - w; PyTorch j > i - w
  if model_type == "gemma":
    out.hidden_activation = config.hidden_act
  return out


def prepare_tokenizer(tokenizer: Any, padding_side: str | None, name: str) -> Any:
  """Gives the tokenizer a pad token (EOS, else UNK) and, if asked, a padding side; returns it."""
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
