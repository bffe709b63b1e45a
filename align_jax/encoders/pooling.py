"""Pooling of encoder token outputs into the project's "features" dict.

``{"pooled": [B, D']}`` for "cls", "mean", "last" and "cls+mean_patch"; ``{"tokens": [B, T, D],
"mask": bool [B, T]}`` for "tokens". Everything is float32, whatever the encoder's compute dtype, so
projectors and losses see one dtype. Two poolings are computed by their encoder, not here: "map"
(SigLIP's vision head) and "latent" (NV-Embed's latent-attention pooler, text only).
"""

from __future__ import annotations

import jax.numpy as jnp

from align_jax.model.ops import masked_mean  # the one definition, shared with the projectors

IMAGE_POOLINGS = ("cls", "mean", "cls+mean_patch", "tokens", "map")
TEXT_POOLINGS = ("cls", "mean", "tokens", "last", "latent")  # latent: NV-Embed only


def check_pooling(pooling: str, valid: tuple[str, ...], kind: str) -> str:
  """Returns ``pooling`` if it is one of ``valid``; ValueError listing the valid names otherwise."""
  if pooling not in valid:
    raise ValueError(f"unknown {kind} pooling {pooling!r}; valid: {', '.join(valid)}")
  return pooling


def pool_image(tokens: jnp.ndarray, pooling: str, num_prefix_tokens: int = 1
               ) -> dict[str, jnp.ndarray]:
  """Pools ViT-style tokens [B, prefix + P, D] (class token and registers first, then P patches).

  "mean" and the second half of "cls+mean_patch" average the patch tokens only (as SAIL and the
  freeze-align CKA selection do; DINOv3's register tokens are left out too, SigLIP has no prefix);
  "tokens" keeps every token with an all-True mask. "map" (SigLIP's head) is computed by the
  encoder, not here.
  """
  tokens = tokens.astype(jnp.float32)
  if pooling == "tokens":
    return {"tokens": tokens, "mask": jnp.ones(tokens.shape[:2], dtype=bool)}
  cls = tokens[:, 0]
  mean_patch = jnp.mean(tokens[:, num_prefix_tokens:], axis=1)
  if pooling == "cls":
    return {"pooled": cls}
  if pooling == "mean":
    return {"pooled": mean_patch}
  if pooling == "cls+mean_patch":
    return {"pooled": jnp.concatenate([cls, mean_patch], axis=-1)}
  raise ValueError(f"unknown image pooling {pooling!r}; valid: {', '.join(IMAGE_POOLINGS)}")


def last_token_index(mask: jnp.ndarray) -> jnp.ndarray:
  """Per row [B], the position of the last real token of mask [B, L], for left or right padding.

  With right padding it is ``sum(mask) - 1``; with left padding ``L - 1``; in general the largest
  position whose mask is 1 (0 for a row without real tokens).
  """
  mask = mask.astype(bool)
  positions = jnp.arange(mask.shape[1], dtype=jnp.int32)
  return jnp.max(jnp.where(mask, positions, 0), axis=1)


def pool_text(tokens: jnp.ndarray, mask: jnp.ndarray, pooling: str,
              cls_index: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
  """Pools text tokens [B, L, D] with attention mask [B, L].

  Args:
    tokens: last hidden states.
    mask: 1 for real tokens, 0 for padding.
    pooling: "cls" (the token at ``cls_index``, or position 0), "mean" (over real tokens),
      "last" (the last real token, as decoder-LLM embedders such as E5-Mistral pool: with the
      EOS the tokenizer appends, the one token that has attended to the whole text) or "tokens".
    cls_index: per-row index [B] of the summary token; CLIP's text tower uses its EOS token.
  """
  tokens = tokens.astype(jnp.float32)
  mask = mask.astype(bool)
  if pooling == "tokens":
    return {"tokens": tokens, "mask": mask}
  if pooling == "mean":
    return {"pooled": masked_mean(tokens, mask)}
  if pooling == "last":
    return {"pooled": jnp.take_along_axis(tokens, last_token_index(mask)[:, None, None],
                                          axis=1)[:, 0]}
  if pooling == "cls":
    if cls_index is None:
      return {"pooled": tokens[:, 0]}
    return {"pooled": jnp.take_along_axis(tokens, cls_index[:, None, None], axis=1)[:, 0]}
  raise ValueError(f"unknown text pooling {pooling!r}; valid: {', '.join(TEXT_POOLINGS)}")
