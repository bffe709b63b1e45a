"""Frozen Hugging Face encoders as pure JAX functions: load (hub id or folder), preprocess, pool.

``ImageEncoder`` (DINOv2, ViT, CLIP vision tower) and ``TextEncoder`` (BERT, RoBERTa, XLM-RoBERTa,
CLIP text tower, Llama / Mistral / Gemma decoders, T5 / mT5 encoders) hold frozen params and a pure
``apply(params, inputs) -> features`` for use inside a jitted train step, plus ``preprocess`` (equal
to the checkpoint's HF processor / tokenizer) and ``encode`` for users. Features: ``{"pooled": [B,
D']}`` or ``{"tokens": [B, T, D], "mask": [B, T]}``, always float32, of the layer(s) chosen with
``layer=`` (:mod:`align_jax.encoders.layers`; the final output by default).
"""

from align_jax.encoders.hub import EncoderNotFoundError, resolve_checkpoint
from align_jax.encoders.image import IMAGE_FAMILIES, ImageEncoder
from align_jax.encoders.image_processing import ImageProcessor
from align_jax.encoders.pooling import IMAGE_POOLINGS, TEXT_POOLINGS
from align_jax.encoders.pos_embed import resample_position_embeddings
from align_jax.encoders.text import TEXT_FAMILIES, TextEncoder

__all__ = [
  "EncoderNotFoundError",
  "IMAGE_FAMILIES",
  "IMAGE_POOLINGS",
  "ImageEncoder",
  "ImageProcessor",
  "TEXT_FAMILIES",
  "TEXT_POOLINGS",
  "TextEncoder",
  "resample_position_embeddings",
  "resolve_checkpoint",
]
