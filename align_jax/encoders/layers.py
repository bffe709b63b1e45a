"""Which hidden layer an encoder's features come from: ``model.image_layer``, ``model.text_layer``.

One numbering for every family, with N the number of transformer blocks:

* ``0`` is the embedding output (HF's ``hidden_states[0]``);
* ``k`` for ``0 < k < N`` is the residual stream after ``k`` blocks, raw (HF's ``hidden_states[k]``,
  no final norm);
* ``N``, also written ``-1``, is the encoder's *final output*, exactly what ``apply`` has always
  returned: after the family's final norm (DINOv2 / ViT ``layernorm``, CLIP ``post_layernorm`` /
  ``final_layer_norm``, the decoder LLMs' and T5's final RMS norm). It is the default.

Negative indices count from the end (``-1`` = N, ``-2`` = N - 1, ..., ``-(N + 1)`` = 0). For BERT,
RoBERTa, the decoder LLMs and T5, HF's ``hidden_states[N]`` *is* this final output; for DINOv2,
ViT and CLIP, HF's ``hidden_states[N]`` is the stream before the final norm, which no index here
selects (``N`` is the normed one, as the encoder's own features). ``apply_all_layers`` returns the
same N + 1 layers, in this order, so its indices (and ``python -m align_jax.cli.select
--layers``) are valid values of these config keys.

A list or tuple of indices averages those layers' token states (in float32) before pooling; every
pooling is linear in the tokens, so this equals averaging the pooled features.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

FINAL = -1


def parse_layers(spec: Any, num_layers: int, flag: str) -> tuple[int, ...]:
  """Normalises a layer spec (int or list of ints) to non-negative indices in [0, num_layers].

  Args:
    spec: an int, or a non-empty list / tuple of distinct ints (counted as in the module
      docstring; negative from the end).
    num_layers: the encoder's number of blocks N.
    flag: the config override named in errors, e.g. ``--config.model.text_layer``.

  Raises:
    ValueError: not an int or list of ints, empty, out of range or repeated.
  """
  items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
  example = f"e.g. {flag}=-1 (the final output) or {flag}='(-1,-2)' (their average)"
  if not items or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
    raise ValueError(f"{flag} must be a layer index or a non-empty list of them, got {spec!r}; "
                     f"{example}")
  out = []
  for index in items:
    if not -(num_layers + 1) <= index <= num_layers:
      raise ValueError(f"{flag}={spec!r}: layer {index} does not exist; this encoder has layers "
                       f"0..{num_layers} (0 = embeddings, {num_layers} = -1 = final output) or "
                       f"-{num_layers + 1}..-1")
    out.append(index % (num_layers + 1))
  if len(set(out)) != len(out):
    raise ValueError(f"{flag}={spec!r} names a layer twice; {example}")
  return tuple(out)


def is_final(layers: Sequence[int], num_layers: int) -> bool:
  """True when ``layers`` is just the final output (the default path, no hidden states kept)."""
  return tuple(layers) == (num_layers,)


def combine(hidden: Sequence[jnp.ndarray], layers: Sequence[int]) -> jnp.ndarray:
  """The chosen layer's tokens, or the float32 mean of several layers' tokens [B, T, D]."""
  if len(layers) == 1:
    return hidden[layers[0]]
  return sum(hidden[i].astype(jnp.float32) for i in layers) / len(layers)
