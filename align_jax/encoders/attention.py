"""Multi-head attention for every encoder family, on ``jax.nn.dot_product_attention``.

One function, :func:`attention`, takes projected queries, keys and values laid out ``[B, T, N, H]``
(batch, tokens, heads, head width) and returns ``[B, T, N, H]``. It covers what the families need:

* a key padding mask ``[B, S]`` (1 / True = real token), as the tokenizers' ``attention_mask``;
* ``causal`` (decoder LLMs, the CLIP text tower) or bidirectional (the default: ViTs, BERT-likes,
  T5, decoders run LLM2Vec / NV-Embed style);
* a sliding window in transformers' convention (query ``i`` sees keys ``i - window < j <= i``, as
  Mistral), on top of ``causal``;
* an additive ``bias`` broadcastable to ``[B, N, T, S]`` (T5's and MPNet's relative position
  buckets);
* grouped-query attention: keys / values with fewer heads than the queries (a divisor), repeated
  by the kernel itself;
* an ``implementation``: "auto" takes cuDNN's fused flash kernel where
  :func:`auto_implementation` allows it (GPU, bfloat16 / float16, head width a multiple of 8 up to
  128) and XLA's otherwise, falling back to XLA when cuDNN refuses the shapes at trace time; this
  is needed because ``jax.nn.dot_product_attention(implementation=None)`` (jax 0.10) always takes
  XLA. "cudnn" asks for the fused kernel and fails loudly where it cannot run; None / "xla": XLA.

cuDNN takes a mask only as a full ``[B, 1|N, T, S]`` logits bias (jax folds a boolean mask into
the bias), so a key padding mask ``[B, S]`` is broadcast over the queries for it. That covers left
and right padding alike; jax's other cuDNN padding form, per-row lengths
(``key_value_seq_lengths``), holds for right padding only. Causal masks, sliding windows,
grouped-query keys / values and an additive relative-position bias (T5, MPNet) all go to cuDNN.

The XLA path computes logits and softmax in float32 whatever the input dtype (bfloat16 params give
bfloat16 q / k / v) and casts the probabilities back to the value dtype, as transformers' eager
attention does.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn"] | None
# What cuDNN refuses at trace time: dtype or head width (NotImplementedError), shapes
# (ValueError), no cuDNN found (RuntimeError).
_CUDNN_REFUSALS = (ValueError, NotImplementedError, RuntimeError)


def auto_implementation(dtype, head_dim: int, platform: str | None = None) -> str | None:
  """"cudnn" where cuDNN's fused attention can run (GPU, bf16 / fp16, head_dim a multiple of 8
  up to 128), else None (XLA). ``jax.nn.dot_product_attention`` itself never picks cuDNN."""
  platform = platform or jax.default_backend()
  if (platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return None


def key_padding_mask(mask: jnp.ndarray) -> jnp.ndarray:
  """A boolean ``[B, 1, 1, S]`` mask from an attention mask ``[B, S]`` (1 / True = real token)."""
  if mask.ndim != 2:
    raise ValueError(f"the attention mask must be [batch, tokens], got shape {mask.shape}")
  return mask.astype(bool)[:, None, None, :]


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
              mask: jnp.ndarray | None = None,
              causal: bool = False,
              sliding_window: int | None = None,
              bias: jnp.ndarray | None = None,
              scale: float | None = None,
              implementation: Implementation = None) -> jnp.ndarray:
  """Scaled dot-product attention of ``q`` [B, T, N, H] over ``k`` / ``v`` [B, S, K, H].

  Args:
    q: queries, N heads.
    k: keys, K heads with N % K == 0 (K < N is grouped-query attention).
    v: values, same shape as ``k``.
    mask: optional key padding mask [B, S] (nonzero / True = attend to this key), or an already
      4-D boolean mask broadcastable to [B, N, T, S].
    causal: query i attends to keys j <= i only.
    sliding_window: with ``causal``, query i attends to keys i - window < j <= i only
      (transformers' Mistral / Qwen2 convention; ``window`` keys including itself). None = no
      window.
    bias: optional additive logits bias broadcastable to [B, N, T, S] (relative positions).
    scale: logits scale; None = 1 / sqrt(H).
    implementation: "auto" (cuDNN where allowed, else XLA; see the module docstring), None
      (JAX's choice: XLA), "xla" or "cudnn".

  Returns:
    [B, T, N, H] in ``q``'s dtype.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, tokens, heads, head_dim]; got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if sliding_window is not None and not causal:
    raise ValueError("sliding_window needs causal=True (a window over earlier tokens, as Mistral)")
  if mask is not None:
    mask = key_padding_mask(mask) if mask.ndim == 2 else mask.astype(bool)
  window = None
  if sliding_window is not None:
    if int(sliding_window) < 1:
      raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    window = (int(sliding_window) - 1, 0)
  if bias is not None:
    while bias.ndim < 4:
      bias = bias[None]
    bias = bias.astype(q.dtype)

  def run(kernel):
    kernel_mask = mask
    if kernel == "cudnn" and mask is not None:  # cuDNN's bias must span [T, S]
      kernel_mask = jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=kernel_mask, scale=scale,
                                        is_causal=causal, local_window_size=window,
                                        implementation=kernel)

  if implementation == "auto":
    if auto_implementation(q.dtype, q.shape[-1]) == "cudnn":
      try:
        return run("cudnn")
      except _CUDNN_REFUSALS:
        pass  # shapes or versions cuDNN refuses: XLA's attention below
    implementation = None
  return run(implementation)
