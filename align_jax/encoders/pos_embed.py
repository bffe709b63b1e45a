"""Resampling of ViT position embeddings to a new patch grid, exactly as PyTorch does it.

The PyTorch DINOv2 / ViT / CLIP models resize their learned position-embedding grid with
``torch.nn.functional.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)``
whenever the input resolution differs from the checkpoint's (DINOv2 always does at 224 px: its
checkpoints store a 37x37 grid for 518 px). ``jax.image.scale_and_translate`` (what transformers'
former Flax port used) is a different bicubic kernel (Keys a=-0.5, and a scale from ``size + 0.1``),
whose features differ from PyTorch's by ~1e-2. Resampling once at load time with PyTorch's kernel, in numpy, keeps the encoder
bit-for-bit comparable with the reference models and removes the resize from every forward pass.
"""

from __future__ import annotations

import math

import numpy as np

# PyTorch's upsample_bicubic2d uses the Keys cubic convolution kernel with a = -0.75.
_A = -0.75


def _cubic_near(x: np.ndarray) -> np.ndarray:
  """Keys kernel for |x| <= 1."""
  return ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0


def _cubic_far(x: np.ndarray) -> np.ndarray:
  """Keys kernel for 1 < |x| < 2."""
  return ((_A * x - 5.0 * _A) * x + 8.0 * _A) * x - 4.0 * _A


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The [out_size, in_size] matrix of PyTorch's 1-D bicubic resize (align_corners=False).

  Output sample ``i`` reads source coordinate ``(i + 0.5) * in_size / out_size - 0.5`` (not clamped
  at 0 for cubic), takes the four neighbours ``floor - 1 .. floor + 2`` clamped to the border, and
  weights them with the Keys kernel at distances ``t + 1, t, 1 - t, 2 - t``.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base
  weights = np.stack([_cubic_far(t + 1.0), _cubic_near(t), _cubic_near(1.0 - t),
                      _cubic_far(2.0 - t)], axis=1)
  index = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
  matrix = np.zeros((out_size, in_size), dtype=np.float64)
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), index.ravel()), weights.ravel())
  return matrix


def resize_grid_bicubic(grid: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """Resizes a [h, w, D] grid to [new_h, new_w, D] like torch bicubic interpolate (NCHW, by size)."""
  h, w, _ = grid.shape
  rows = torch_bicubic_matrix(h, new_h)
  cols = torch_bicubic_matrix(w, new_w)
  out = np.einsum("ih,hwd,jw->ijd", rows, grid.astype(np.float64), cols)
  return out.astype(np.float32)


def resample_position_embeddings(pos: np.ndarray, new_grid: tuple[int, int],
                                 num_prefix_tokens: int = 1) -> np.ndarray:
  """Resamples [..., prefix + h*w, D] position embeddings to a (new_h, new_w) patch grid.

  Args:
    pos: position embeddings with the prefix (CLS) tokens first, then a square h x w patch grid
      in row-major order; any leading axes (e.g. DINOv2's batch axis of 1) are kept.
    new_grid: (new_h, new_w) patch grid of the target resolution.
    num_prefix_tokens: tokens before the patch grid, left unchanged (1 for the CLS token).

  Returns:
    float32 array [..., prefix + new_h*new_w, D], in the input's leading layout.
  """
  pos = np.asarray(pos)
  num_patches = pos.shape[-2] - num_prefix_tokens
  side = int(math.isqrt(num_patches))
  if side * side != num_patches:
    raise ValueError(f"position embeddings hold {num_patches} patch positions, not a square grid")
  lead = pos.shape[:-2]
  dim = pos.shape[-1]
  flat = pos.reshape((-1,) + pos.shape[-2:]).astype(np.float32)
  out = []
  for table in flat:
    grid = table[num_prefix_tokens:].reshape(side, side, dim)
    resized = resize_grid_bicubic(grid, *new_grid).reshape(-1, dim)
    out.append(np.concatenate([table[:num_prefix_tokens], resized], axis=0))
  return np.stack(out).reshape(lead + out[0].shape)
