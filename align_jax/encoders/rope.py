"""Rotary position embeddings (RoPE) of the decoder LLMs, as transformers computes them.

:func:`inverse_frequencies` reads a model's ``config.json`` dict (``rope_theta``, ``head_dim`` or
``hidden_size / num_attention_heads``, ``partial_rotary_factor``, ``rope_scaling``) and returns
the per-pair inverse frequencies plus the factor transformers multiplies cos / sin by. Supported
``rope_scaling`` types (``rope_type``, or the older key ``type``):

* none / ``default``: ``theta ** (-2i / dim)`` (Llama-2, Mistral, Qwen2 / Qwen3, Gemma);
* ``linear``: frequencies divided by ``factor``;
* ``llama3``: Llama-3.1 / 3.2's wavelength-dependent scaling (``factor``, ``low_freq_factor``,
  ``high_freq_factor``, ``original_max_position_embeddings``);
* ``yarn``: YaRN interpolation with its attention factor (Qwen2.5 / Qwen3 long-context configs).

transformers 5 writes these settings as one ``rope_parameters`` dict (``rope_theta``,
``rope_type`` and the scaling keys) instead of ``rope_theta`` + ``rope_scaling``; both are read.
Anything else is refused in one line. :func:`cos_sin` turns position ids into the float32 cos /
sin tables and :func:`apply_rotary` rotates queries / keys with transformers' "rotate half"
layout (the first and second halves of each head pair up, not interleaved neighbours).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def scaling_settings(config: Mapping[str, Any]) -> dict[str, Any]:
  """The scaling dict: transformers 5's ``rope_parameters``, else 4.x's ``rope_scaling`` ({})."""
  params = config.get("rope_parameters")
  if isinstance(params, Mapping) and ("rope_type" in params or "rope_theta" in params):
    return dict(params)
  return dict(config.get("rope_scaling") or {})


def theta(config: Mapping[str, Any]) -> float:
  """The RoPE base: ``rope_parameters["rope_theta"]`` (transformers 5), else ``rope_theta``."""
  return float(scaling_settings(config).get("rope_theta") or config.get("rope_theta") or 10000.0)


def rope_type(config: Mapping[str, Any]) -> str:
  """The config's RoPE type: ``rope_type`` (or ``type``) of its scaling settings, else "default"."""
  scaling = scaling_settings(config)
  kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: "
                     f"{', '.join(ROPE_TYPES)} (edit config.json's rope_scaling or pick another "
                     "checkpoint)")
  return kind


def rotary_dim(config: Mapping[str, Any]) -> int:
  """How many features of each head rotate: ``head_dim * partial_rotary_factor``."""
  head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
  return int(head_dim * float(config.get("partial_rotary_factor", 1.0)))


def _default(base: float, dim: int) -> np.ndarray:
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (1.0 / (np.float32(base) ** exponents)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
  factor = float(scaling["factor"])
  low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
  old_context = float(scaling["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(config: Mapping[str, Any], base: float, dim: int) -> tuple[np.ndarray, float]:
  scaling = scaling_settings(config)
  factor = float(scaling["factor"])
  original = scaling.get("original_max_position_embeddings") or config["max_position_embeddings"]

  def mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = scaling.get("attention_factor")
  if attention_factor is None:
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
      attention_factor = (mscale(factor, scaling["mscale"])
                          / mscale(factor, scaling["mscale_all_dim"]))
    else:
      attention_factor = mscale(factor)
  beta_fast = scaling.get("beta_fast") or 32
  beta_slow = scaling.get("beta_slow") or 1

  def correction_dim(rotations: float) -> float:
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
  inv = (1.0 / (factor * freqs)) * (1 - extrapolation) + (1.0 / freqs) * extrapolation
  return inv.astype(np.float32), float(attention_factor)


def inverse_frequencies(config: Mapping[str, Any]) -> tuple[np.ndarray, float]:
  """``(inv_freq [rotary_dim / 2] float32, attention_factor)`` for a decoder's config dict."""
  kind = rope_type(config)
  base = theta(config)
  dim = rotary_dim(config)
  if kind == "yarn":
    return _yarn(config, base, dim)
  inv_freq = _default(base, dim)
  if kind == "linear":
    inv_freq = (inv_freq / float(scaling_settings(config)["factor"])).astype(np.float32)
  elif kind == "llama3":
    inv_freq = _llama3(inv_freq, scaling_settings(config))
  return inv_freq, 1.0


def cos_sin(inv_freq: np.ndarray, attention_factor: float,
            position_ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Float32 cos / sin tables [B, T, rotary_dim] for position ids [B, T]."""
  freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def _rotate_half(x: jnp.ndarray) -> jnp.ndarray:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates x [B, T, N, H] by cos / sin [B, T, R] (R <= H; the first R features rotate).

  The tables are cast to x's dtype first, as transformers does, so bfloat16 runs round alike.
  """
  cos = cos.astype(x.dtype)[:, :, None, :]
  sin = sin.astype(x.dtype)[:, :, None, :]
  width = cos.shape[-1]
  rotated, passed = x[..., :width], x[..., width:]
  out = rotated * cos + _rotate_half(rotated) * sin
  return jnp.concatenate([out, passed], axis=-1) if passed.shape[-1] else out
