"""Image transforms: the paper's training augmentation and the standard evaluation crop.

Training: RandomResizedCrop(size, scale 0.2–1.0, ratio 3/4–4/3) → horizontal flip (p = 0.5) →
optional RandAugment(2, 7) → the encoder's mean/std normalisation. Evaluation: resize the shorter
side to ``size`` (bicubic) → centre crop ``size × size`` → normalisation. Training follows the
torchvision definitions the paper used (``transforms.RandomResizedCrop``); the evaluation resize and
crop are those of the encoders' Hugging Face image processors (:mod:`align_jax.encoders.
image_processing`: short side with ``int()`` rounding, crop offset ``(side - size) // 2``), so a
model sees one centre crop whichever path made its pixels; the tests compare it with HF's
BitImageProcessor. Both are written on PIL + numpy, so that workers need neither torch, TF nor
transformers, and run per image at PIL speed.

Every random choice is drawn from an ``np.random.Generator`` handed in by the caller: the data
pipeline seeds it from (seed, stream position, record), so an example is augmented identically
however many workers load it and after a resume.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from align_jax.data import randaugment

# ImageNet statistics: the normalisation DINOv2 was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageTransform = Callable[[Image.Image, np.random.Generator], np.ndarray]


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """Samples a crop box ``(left, top, crop_width, crop_height)`` as torchvision's RandomResizedCrop.

  Ten tries at a random area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``;
  if none fits inside the image, falls back to the largest centred crop with a ratio in range.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return left, top, crop_w, crop_h
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_w, crop_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    crop_w, crop_h = int(round(height * max(ratio))), height
  else:
    crop_w, crop_h = width, height
  return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """Bicubic resize so the shorter side is ``size`` (``int()`` rounding, as HF and torchvision)."""
  width, height = image.size
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_w, new_h = int(size * width / height), size
  if (new_w, new_h) == (width, height):
    return image
  return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """Centre ``size × size`` crop at offset ``(side - size) // 2``, the HF image processors' rule.

  (torchvision's ``CenterCrop`` rounds ``(side - size) / 2`` half to even instead: one pixel off
  when the margin is odd.) Images are at least ``size`` on both sides after the resize.
  """
  width, height = image.size
  top = (height - size) // 2
  left = (width - size) // 2
  return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 ``[H, W, 3]`` → float32 ``(x / 255 - mean) / std``."""
  offset = np.asarray(mean, np.float32) * 255.0
  inv_scale = 1.0 / (np.asarray(std, np.float32) * 255.0)
  out = np.subtract(pixels, offset, dtype=np.float32)  # One float buffer, updated in place:
  out *= inv_scale  # half the time of (x.astype(f32) - m) / s on a 256-px image.
  return out


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """RandomResizedCrop → flip → optional RandAugment → normalise (picklable for grain workers)."""

  size: int
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  randaugment_ops: int = 0
  randaugment_magnitude: int = 7

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    image = image.convert("RGB")
    left, top, crop_w, crop_h = random_resized_crop_box(*image.size, rng, self.scale, self.ratio)
    image = image.resize(
        (self.size, self.size), Image.Resampling.BILINEAR,
        box=(left, top, left + crop_w, top + crop_h))
    if self.flip and rng.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if self.randaugment_ops:
      image = randaugment.rand_augment(
          image, rng, num_ops=self.randaugment_ops, magnitude=self.randaugment_magnitude)
    return normalize(np.asarray(image), self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Shorter side → ``size`` (bicubic), centre crop, normalise. Ignores the generator."""

  size: int
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
    del rng  # Deterministic by design; the argument keeps one signature for both transforms.
    image = center_crop(resize_shorter_side(image.convert("RGB"), self.size), self.size)
    return normalize(np.asarray(image), self.mean, self.std)


def make_image_transform(
    image_size: int,
    *,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    randaugment: bool = False,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    randaugment_ops: int = 2,
    randaugment_magnitude: int = 7,
    flip: bool = True,
) -> ImageTransform:
  """Builds the train or eval transform: ``f(pil_image, rng) -> float32 [size, size, 3]``.

  Args:
    image_size: output side in pixels (256 in the paper).
    train: random crop + flip (+ RandAugment) if True, resize + centre crop if False.
    mean, std: the image encoder's per-channel normalisation (0–1 pixel scale).
    randaugment: add RandAugment(``randaugment_ops``, ``randaugment_magnitude``) when training.
    scale, ratio: RandomResizedCrop ranges.
    randaugment_ops, randaugment_magnitude: RandAugment N and M (paper: 2 and 7).
    flip: random horizontal flips when training (off where captions say "left" / "right").
  """
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f"mean/std need 3 channels and positive std, got mean={mean}, std={std}")
  if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                     f"got scale={scale}, ratio={ratio}")
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if not train:
    return EvalTransform(image_size, mean, std)
  return TrainTransform(
      image_size, mean, std, tuple(scale), tuple(ratio), flip=flip,
      randaugment_ops=randaugment_ops if randaugment else 0,
      randaugment_magnitude=randaugment_magnitude)
