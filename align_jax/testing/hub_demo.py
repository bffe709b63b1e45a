"""The notebooks' hub path: its training config and the data it prepares (TFDS CIFAR sets).

``configs/demo_online.py:hub=True`` is :func:`hub_config`: ``facebook/dinov2-small`` +
``sentence-transformers/all-MiniLM-L6-v2`` aligned on TFDS ``cifar100`` training images captioned
with their class name (:func:`caption_manifest`), evaluated zero-shot on TFDS ``cifar10``. A
module of its own, apart from :mod:`align_jax.testing.demos` (the notebooks' cells), because the
config file imports it while ``demos`` loads config files by name: one direction of imports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import ml_collections

HUB_IMAGE_ENCODER = "facebook/dinov2-small"
HUB_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
TRAIN_SET = "cifar100"  # aligned on: class-name captions of its training images
ZERO_SHOT_SET = "cifar10"  # evaluated on: ten classes CIFAR-100 does not have


def prepare_tfds(name: str, data_dir: str) -> None:
  """Downloads and prepares TFDS ``name`` under ``data_dir`` as array_record, once."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(file_format="array_record")  # a no-op when already prepared


def caption_manifest(name: str, split: str, out_dir: str, *, data_dir: str,
                     templates: str | Sequence[str] = "cifar") -> str:
  """A TFDS classification split as image files + a caption manifest; returns its path.

  Each row is ``{"image": "<i>.png", "caption": [template.format(class name), ...],
  "label": class name}``: an image-caption set for ``data.source = "manifest"`` whose captions
  name only the class. Written once (the manifest appears last, atomically) and reused.
  """
  from align_jax.run import storage
  from align_jax.evaluate import datasets, prompts
  path = os.path.join(out_dir, "manifest.jsonl")
  if os.path.isfile(path):
    return path
  filled = prompts.TEMPLATES[templates] if isinstance(templates, str) else tuple(templates)
  reader = datasets.TfdsClassificationReader(name, split=split, data_dir=data_dir)
  os.makedirs(out_dir, exist_ok=True)
  lines = []
  for i in range(len(reader)):
    record = reader.read(i)
    if not isinstance(record.image, bytes):
      raise ValueError(f"{reader.name} #{i}: expected encoded image bytes from TFDS.")
    file = f"{i}.png" if record.image[:4] == b"\x89PNG" else f"{i}.jpg"
    with open(os.path.join(out_dir, file), "wb") as f:
      f.write(record.image)
    label = reader.class_names[record.label]
    lines.append(json.dumps({"image": file, "caption": [t.format(label) for t in filled],
                             "label": label}))
  storage.write_text(path, "\n".join(lines) + "\n")
  return path


def hub_config(steps: int = 300, *, data_root: str = "align_demo_data", num_train: int = 5000,
               num_eval: int = 500, image_size: int = 112, batch_size: int = 128,
               image_encoder: str = "", text_encoder: str = "") -> ml_collections.ConfigDict:
  """The hub path's training config (``configs/demo_online.py:hub=True``); prepares its data.

  DINOv2 runs at ``image_size`` (112 px: CIFAR's images are 32 px, and 64 patches are ~4x cheaper
  than 224 px's 256), the token projectors of freeze-align train, and the two zero-shot
  evaluators run at the end of training on ``num_eval`` test images each.
  """
  from align_jax.config import schema as config_lib
  data_dir = os.path.join(data_root, "tfds")
  for name in (TRAIN_SET, ZERO_SHOT_SET):
    prepare_tfds(name, data_dir)
  manifest = caption_manifest(TRAIN_SET, f"train[:{num_train}]",
                              os.path.join(data_root, f"{TRAIN_SET}_train_{num_train}"),
                              data_dir=data_dir)
  config = config_lib.default_config()
  config.total_steps = steps
  config.batch_size = batch_size
  config.log_every = 25
  config.eval_every = steps  # zero-shot at the end only: each evaluation encodes 2 x num_eval
  config.checkpoint_every = max(steps // 3, 1)
  config.data.source = "manifest"
  config.data.path = manifest
  config.data.num_threads = 4
  config.data.crop_scale = (0.6, 1.0)
  m = config.model
  m.image_encoder = image_encoder or HUB_IMAGE_ENCODER
  m.text_encoder = text_encoder or HUB_TEXT_ENCODER
  m.image_size = image_size
  m.image_pooling = m.text_pooling = "tokens"
  m.image_projector, m.text_projector = "freeze_align_image", "freeze_align_text"
  m.max_text_length = 32
  m.embed_dim = 256
  m.dropout = 0.0
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = min(30, steps // 5)
  for name in (ZERO_SHOT_SET, TRAIN_SET):
    config.evals[name] = dict(type="zero_shot", templates="cifar", batch_size=256, ks=(1, 5),
                              data=dict(source="tfds", name=name, data_dir=data_dir,
                                        split=f"test[:{num_eval}]"))
  return config
