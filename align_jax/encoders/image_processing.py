"""Image preprocessing by the checkpoint's own Hugging Face image processor, as NHWC float32.

:class:`ImageProcessor` wraps the transformers image processor a checkpoint ships
(``preprocessor_config.json``, loaded with ``AutoImageProcessor``; the family's default when the
folder has none) and calls it as it is: resize, crop, rescale and normalisation are the
processor's own code, so ``ImageEncoder.preprocess`` equals HF by construction. The wrapper adds
only what the Flax encoders need:

* the layout: NHWC float32 (what the Flax vision models take), where HF returns NCHW;
* an output size other than the checkpoint's (``image_size``), handed to the processor as its own
  ``size`` / ``crop_size`` arguments, the resize scaled by the same ratio so that the crop keeps the
  checkpoint's field of view (DINOv2: short side 256, crop 224; at 256 px, 293 and 256);
* inputs as PIL images of any mode or uint8 ``[H, W, 3]`` / ``[N, H, W, 3]`` arrays, made RGB.

The slow (PIL + numpy) processors are used: they are the reference that transformers' fast
(torchvision) ones only approximate, and they need no torch. Called on a batch they cost about
what a PIL + numpy copy of their steps did (within ~20 % on 480 x 640 images, 224 px output), so
no copy is kept. The training and evaluation transforms of the data pipeline
(:mod:`align_jax.data.transforms`) run per image in worker processes and stay on PIL + numpy;
their evaluation crop uses the processors' rounding and is tested against them.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image


class ImageProcessor:
  """A HF image processor at a fixed square output size, returning float32 NHWC pixels.

  Attributes:
    processor: the transformers image processor (the definition of every step).
    image_size: side of every output image.
    mean, std: the processor's per-channel normalisation (0-1 pixel scale), for data pipelines.
    overrides: the ``size`` / ``crop_size`` arguments given to the processor to reach
      ``image_size`` (empty at the processor's own output size).
  """

  def __init__(self, processor: Any, image_size: int | None = None,
               default_size: int | None = None):
    """Reads the processor's sizes and normalisation.

    Args:
      processor: a transformers image processor (slow, PIL + numpy).
      image_size: side of the outputs; None: the processor's own square output, else
        ``default_size`` (e.g. the model config's image size).
      default_size: the side used when neither ``image_size`` nor the processor gives one.
    """
    self.processor = processor
    size = dict(processor.size) if getattr(processor, "do_resize", True) else {}
    if size and "shortest_edge" not in size and "height" not in size:
      raise ValueError(f"unsupported image processor size {size}: expected shortest_edge or "
                       "height/width")
    crop = None
    if getattr(processor, "do_center_crop", False):
      crop = (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
    native = crop or ((int(size["height"]), int(size["width"])) if "height" in size else None)
    if image_size is None:
      image_size = native[0] if native is not None and native[0] == native[1] else default_size
    if image_size is None:
      raise ValueError(f"image processor {type(processor).__name__} has no square output size "
                       f"(size {size}, crop {crop}): pass image_size=...")
    self.image_size = int(image_size)
    self.overrides = _size_overrides(size, crop, native, self.image_size)
    if getattr(processor, "do_normalize", True):
      self.mean = tuple(float(m) for m in processor.image_mean)
      self.std = tuple(float(s) for s in processor.image_std)
    else:
      self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

  def __call__(self, images: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Preprocesses PIL images or uint8 [N, H, W, 3] arrays; returns float32 [N, S, S, 3]."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
      images = images[None]
    images = [to_rgb_pil(image) for image in images]
    if not images:
      return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
    pixels = self.processor(images, return_tensors="np", **self.overrides)["pixel_values"]
    return np.ascontiguousarray(np.transpose(pixels, (0, 2, 3, 1)), dtype=np.float32)


def _size_overrides(size: dict, crop: tuple[int, int] | None, native: tuple[int, int] | None,
                    image_size: int) -> dict[str, Any]:
  """The processor arguments producing ``image_size`` squares (resize scaled as the crop)."""
  if native == (image_size, image_size):
    return {}
  if crop is None:
    if "height" not in size:
      raise ValueError("image processor neither resizes to a fixed size nor crops: cannot set "
                       "image_size")
    return {"size": {"height": image_size, "width": image_size}}
  ratio = image_size / crop[0]
  if "shortest_edge" in size:
    resize = {"shortest_edge": int(round(size["shortest_edge"] * ratio))}
  elif "height" in size:
    resize = {"height": int(round(size["height"] * ratio)),
              "width": int(round(size["width"] * ratio))}
  else:
    resize = {}
  return {**({"size": resize} if resize else {}),
          "crop_size": {"height": image_size, "width": image_size}}


def to_rgb_pil(image: Any) -> Image.Image:
  """A PIL RGB image from a PIL image (any mode) or a uint8 [H, W, 3] / [H, W] array."""
  if isinstance(image, Image.Image):
    return image.convert("RGB") if image.mode != "RGB" else image
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f"image arrays must be uint8 [H, W, 3], got {array.dtype}: pass raw pixels "
                     "(0-255); preprocess resizes and normalises them")
  return Image.fromarray(array).convert("RGB")


def load_image_processor(folder: str, default: Callable[[], Any]) -> Any:
  """The folder's slow HF image processor (``AutoImageProcessor``), or ``default()`` if it has none."""
  if not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
    return default()
  import transformers
  return transformers.AutoImageProcessor.from_pretrained(folder, use_fast=False)
