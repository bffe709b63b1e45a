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
* an explicit ``implementation`` (None lets JAX choose: XLA on CPU / TPU; "cudnn" asks for the
  fused cuDNN flash kernel on GPU and fails loudly where the shapes do not allow it).

The XLA path computes logits and softmax in float32 whatever the input dtype (bfloat16 params give
bfloat16 q / k / v) and casts the probabilities back to the value dtype, as transformers' eager
attention does.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["xla", "cudnn"] | None


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
    implementation: None (JAX's choice), "xla" or "cudnn".

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
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      is_causal=causal, local_window_size=window,
                                      implementation=implementation)
