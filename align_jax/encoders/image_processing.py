"""Image preprocessing from a checkpoint's ``preprocessor_config.json``, as NHWC float32, in numpy.

:class:`ImageProcessor` reads the processor settings a checkpoint ships (a dict from
``preprocessor_config.json``, or a transformers image processor object's ``to_dict()``) and runs
the steps of transformers' slow (PIL + numpy) processors itself, in the same order and dtypes, so
``ImageEncoder.preprocess`` equals HF's output (tested against BitImageProcessor (DINOv2),
ViTImageProcessor, CLIPImageProcessor and SiglipImageProcessor) with no transformers, torch or
torchvision at run time:

1. resize with PIL (``resample``; ``shortest_edge`` keeps the aspect ratio with ``int()`` on the
   long side, ``height``/``width`` is exact), on uint8 pixels;
2. centre crop (offset ``(side - crop) // 2``; zero padding when the image is smaller), if asked;
3. rescale in float64, cast to float32; normalise ``(x - mean) / std`` in float32.

DINOv3 checkpoints ship only a fast-processor config (``DINOv3ViTImageProcessorFast``: rescale,
then an antialiased bilinear resize of the float image, then normalise, in torchvision); here the
float resize is PIL's, per channel (mode "F"), whose antialiased bilinear filter torchvision's
``antialias=True`` was written to match: equal to float rounding (tested against the processor
and against the torch operations it runs).

The wrapper adds what the encoders need: the NHWC layout (HF returns NCHW); an output size other
than the checkpoint's (``image_size``), given as the processor's own ``size`` / ``crop_size``
overrides, the resize scaled by the same ratio so that the crop keeps the checkpoint's field of
view (DINOv2: short side 256, crop 224; at 256 px, 293 and 256); inputs as PIL images of any mode
or uint8 ``[H, W, 3]`` / ``[N, H, W, 3]`` arrays, made RGB. The training and evaluation transforms
of the data pipeline (:mod:`align_jax.data.transforms`) run per image in worker processes and stay
on PIL + numpy; their evaluation crop uses the processors' rounding and is tested against them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image


# Defaults of the processor classes, for keys a preprocessor_config.json leaves out; and whether an
# integer ``size`` means a square (True) or the short side (False).
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
  "BitImageProcessor": dict(size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                            crop_size={"height": 224, "width": 224}, square=False,
                            image_mean=[0.48145466, 0.4578275, 0.40821073],
                            image_std=[0.26862954, 0.26130258, 0.27577711]),
  "CLIPImageProcessor": dict(size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                             crop_size={"height": 224, "width": 224}, square=False,
                             image_mean=[0.48145466, 0.4578275, 0.40821073],
                             image_std=[0.26862954, 0.26130258, 0.27577711]),
  "ViTImageProcessor": dict(size={"height": 224, "width": 224}, resample=2, do_center_crop=False,
                            square=True, image_mean=[0.5] * 3, image_std=[0.5] * 3),
  "SiglipImageProcessor": dict(size={"height": 224, "width": 224}, resample=3,
                               do_center_crop=False, square=True, image_mean=[0.5] * 3,
                               image_std=[0.5] * 3),
  "DINOv3ViTImageProcessorFast": dict(size={"height": 224, "width": 224}, resample=2,
                                      do_center_crop=False, square=True, rescale_first=True,
                                      image_mean=[0.485, 0.456, 0.406],
                                      image_std=[0.229, 0.224, 0.225]),
}
_SUFFIXES = ("Fast", "Pil")  # transformers 5: torchvision ("Fast") and PIL ("Pil") backends


def _size_dict(size: Any, square: bool) -> dict[str, int]:
  """``size`` as HF's get_size_dict makes it: an int is a square or a short side."""
  if isinstance(size, int):
    return {"height": size, "width": size} if square else {"shortest_edge": size}
  return {k: int(v) for k, v in dict(size).items() if v is not None}


def read_processor_config(config: Any) -> dict[str, Any]:
  """The steps of a processor: from a ``preprocessor_config.json`` dict or a processor object.

  Known classes fill keys the file leaves out with their defaults; a fast (or transformers 5
  "Pil") processor other than DINOv3's is read as its slow counterpart (the same settings).
  """
  if not isinstance(config, dict):
    config = dict(config.to_dict(), image_processor_type=type(config).__name__)
  kind = str(config.get("image_processor_type") or "")
  for suffix in _SUFFIXES:
    if kind not in _PROCESSOR_DEFAULTS and kind.endswith(suffix):
      kind = kind[:-len(suffix)]
  if kind not in _PROCESSOR_DEFAULTS:
    raise ValueError(f"unsupported image processor {config.get('image_processor_type')!r}; "
                     f"supported: {', '.join(_PROCESSOR_DEFAULTS)}")
  merged = {**_PROCESSOR_DEFAULTS[kind], **{k: v for k, v in config.items() if v is not None}}
  square = merged.pop("square")
  out = {"type": kind, "do_resize": bool(merged.get("do_resize", True)),
         "size": _size_dict(merged["size"], square), "resample": int(merged["resample"]),
         "do_center_crop": bool(merged.get("do_center_crop", False)),
         "crop_size": _size_dict(merged.get("crop_size") or 224, True),
         "do_rescale": bool(merged.get("do_rescale", True)),
         "rescale_factor": float(merged.get("rescale_factor", 1 / 255)),
         "do_normalize": bool(merged.get("do_normalize", True)),
         "image_mean": [float(m) for m in merged["image_mean"]],
         "image_std": [float(s) for s in merged["image_std"]],
         "rescale_first": bool(merged.get("rescale_first", False))}
  return out


def _resize_shape(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
  """(new_h, new_w) as HF's resize: short side to ``shortest_edge`` (long side ``int()``)."""
  if "shortest_edge" in size:
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)
  return size["height"], size["width"]


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """HF's centre crop of [H, W, C]: offset ``(side - crop) // 2``, zero padding if smaller."""
  h, w = image.shape[:2]
  top, left = (h - height) // 2, (w - width) // 2
  if top >= 0 and left >= 0:
    return image[top:top + height, left:left + width]
  new_h, new_w = max(height, h), max(width, w)
  padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
  pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
  padded[pad_top:pad_top + h, pad_left:pad_left + w] = image
  top, left = top + pad_top, left + pad_left
  return padded[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def _process_one(image: Image.Image, steps: dict[str, Any]) -> np.ndarray:
  """One RGB PIL image -> float32 [H, W, 3], transformers' slow-processor steps in order."""
  size = _resize_shape(image.height, image.width, steps["size"]) if steps["do_resize"] else None
  if steps["rescale_first"]:  # DINOv3's fast processor: rescale, resize the floats, normalise
    x = (np.asarray(image).astype(np.float64) * steps["rescale_factor"]).astype(np.float32)
    if size is not None:
      x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]), mode="F").resize(
        (size[1], size[0]), resample=steps["resample"])) for c in range(x.shape[-1])], axis=-1)
    if steps["do_center_crop"]:
      x = center_crop(x, steps["crop_size"]["height"], steps["crop_size"]["width"])
  else:
    if size is not None:
      image = image.resize((size[1], size[0]), resample=steps["resample"], reducing_gap=None)
    x = np.asarray(image)
    if steps["do_center_crop"]:
      x = center_crop(x, steps["crop_size"]["height"], steps["crop_size"]["width"])
    if steps["do_rescale"]:
      x = (x.astype(np.float64) * steps["rescale_factor"]).astype(np.float32)
  x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
  if steps["do_normalize"]:
    x = (x - np.asarray(steps["image_mean"], x.dtype)) / np.asarray(steps["image_std"], x.dtype)
  return x


class ImageProcessor:
  """A checkpoint's image processing at a fixed square output size, returning float32 NHWC pixels.

  Attributes:
    steps: the processor settings (:func:`read_processor_config`) at ``image_size``.
    image_size: side of every output image.
    mean, std: the processor's per-channel normalisation (0-1 pixel scale), for data pipelines.
    overrides: the ``size`` / ``crop_size`` settings changed from the checkpoint's to reach
      ``image_size`` (empty at the processor's own output size).
  """

  def __init__(self, processor: Any, image_size: int | None = None,
               default_size: int | None = None):
    """Reads the processor's sizes and normalisation.

    Args:
      processor: a ``preprocessor_config.json`` dict or a transformers image processor object.
      image_size: side of the outputs; None: the processor's own square output, else
        ``default_size`` (e.g. the model config's image size).
      default_size: the side used when neither ``image_size`` nor the processor gives one.
    """
    steps = read_processor_config(processor)
    size = dict(steps["size"]) if steps["do_resize"] else {}
    if size and "shortest_edge" not in size and "height" not in size:
      raise ValueError(f"unsupported image processor size {size}: expected shortest_edge or "
                       "height/width")
    crop = None
    if steps["do_center_crop"]:
      crop = (int(steps["crop_size"]["height"]), int(steps["crop_size"]["width"]))
    native = crop or ((int(size["height"]), int(size["width"])) if "height" in size else None)
    if image_size is None:
      image_size = native[0] if native is not None and native[0] == native[1] else default_size
    if image_size is None:
      raise ValueError(f"image processor {steps['type']} has no square output size "
                       f"(size {size}, crop {crop}): pass image_size=...")
    self.image_size = int(image_size)
    self.overrides = _size_overrides(size, crop, native, self.image_size)
    self.steps = {**steps, **self.overrides}
    if steps["do_normalize"]:
      self.mean = tuple(steps["image_mean"])
      self.std = tuple(steps["image_std"])
    else:
      self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

  def __call__(self, images: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Preprocesses PIL images or uint8 [N, H, W, 3] arrays; returns float32 [N, S, S, 3]."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
      images = images[None]
    images = [to_rgb_pil(image) for image in images]
    if not images:
      return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
    return np.ascontiguousarray(np.stack([_process_one(im, self.steps) for im in images]),
                                dtype=np.float32)


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
  """The folder's ``preprocessor_config.json`` as a dict, or ``default()`` if it has none."""
  path = os.path.join(folder, "preprocessor_config.json")
  if not os.path.isfile(path):
    return default()
  with open(path, encoding="utf-8") as f:
    return json.load(f)
