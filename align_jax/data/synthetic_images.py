"""Rendered image-caption pairs for the online demo: coloured shapes and the words that describe them.

Each record draws one shape of a colour, size and position on a noisy background and captions it
in two phrasings ("a large red circle in the top left" / "top left: red circle, large"), so the
captions are several per image as in COCO. 8 colours x 4 shapes x 4 positions x 2 sizes = 256
distinct scenes; every record is a new instance (jittered place and size, fresh noise), so the
held-out split — one record per scene — is never seen in training and retrieval among its 256
pairs has chance R@1 = 1/256.

The reader follows ``align_jax.data.records.RecordReader`` (sized, picklable, random access), so
the image-caption pipeline shuffles, augments, tokenizes and resumes it like any real source.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image, ImageDraw

from align_jax.data.records import RawRecord

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
          "yellow": (230, 210, 40), "purple": (150, 50, 200), "orange": (245, 140, 30),
          "white": (245, 245, 245), "cyan": (40, 205, 215)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
SCENES = tuple(itertools.product(COLORS, SHAPES, POSITIONS, SIZES))


def render(color: str, shape: str, position: str, size: str, rng: np.random.Generator,
           image_size: int = 64) -> np.ndarray:
  """One scene as uint8 [image_size, image_size, 3]."""
  noise = rng.integers(0, 60, size=(image_size, image_size, 3), dtype=np.uint8)
  image = Image.fromarray(noise)
  draw = ImageDraw.Draw(image)
  half = image_size / 2
  radius = (0.16 if size == "small" else 0.32) * half * rng.uniform(0.9, 1.1)
  cx = (0.5 if "left" in position else 1.5) * half + rng.uniform(-0.1, 0.1) * half
  cy = (0.5 if "top" in position else 1.5) * half + rng.uniform(-0.1, 0.1) * half
  box = (cx - radius, cy - radius, cx + radius, cy + radius)
  fill = COLORS[color]
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  elif shape == "triangle":
    draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                 fill=fill)
  else:
    bar = radius / 3
    draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=fill)
    draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=fill)
  return np.asarray(image)


def captions(color: str, shape: str, position: str, size: str) -> list[str]:
  return [f"a {size} {color} {shape} in the {position}", f"{position}: {color} {shape}, {size}"]


def vocabulary() -> list[str]:
  """Every word the captions use (for the demo's tiny tokenizer)."""
  words = set()
  for scene in SCENES:
    for caption in captions(*scene):
      words.update(caption.replace(":", " : ").replace(",", " , ").split())
  return sorted(words)


class ShapesReader:
  """``num_records`` rendered pairs; split "heldout" holds each of the 256 scenes once.

  The defaults are the config schema's (``data.num_pairs`` 8192, ``data.data_seed`` 1234), so a
  reader built here and one built from a config (``readers.make_reader``) show the same world.
  """

  def __init__(self, *, split: str = "train", num_records: int = 8192, seed: int = 1234,
               image_size: int = 64):
    if split not in ("train", "heldout"):
      raise ValueError(f"unknown split {split!r} for synthetic shapes; use 'train' or 'heldout'")
    self.split, self.seed, self.image_size = split, seed, image_size
    self.num_records = len(SCENES) if split == "heldout" else num_records
    self.name = f"synthetic shapes ({split})"
    self.index_skips: dict[str, int] = {}

  def __len__(self) -> int:
    return self.num_records

  def read(self, index: int) -> RawRecord:
    rng = np.random.default_rng([self.seed, self.split == "heldout", index])
    scene = SCENES[index % len(SCENES)] if self.split == "heldout" else SCENES[
        rng.integers(len(SCENES))]
    return RawRecord(key=f"{self.split}-{index}", image=render(*scene, rng, self.image_size),
                     captions=captions(*scene))
