"""main.py config for the multi-host image-caption tests: manifests and tiny encoders under ROOT.

    python main.py --config=tests/multihost_config.py:root=ROOT ...

ROOT is written by ``write_data`` (called by tests/test_multihost.py): ``models/dinov2`` and
``models/bert`` (tiny random Hugging Face Flax checkpoints), ``train/`` + ``train.jsonl`` (64
rendered scenes with their captions), ``heldout/`` + ``heldout.jsonl`` (retrieval) and ``shapes/`` +
``shapes.jsonl`` (labelled images for zero-shot accuracy). One input thread and a small prefetch
keep each process's image reads in stream order, so the tests can tell which process read what.
"""

import os

from align_jax.config import schema as config_lib

SHAPE_CLASSES = ["red", "green", "blue", "yellow", "purple"]
NUM_TRAIN = 64


def write_data(root: str) -> None:
  """The files the config points at (images, manifests, tiny encoders), under ``root``."""
  import helpers_data
  import numpy as np
  from PIL import Image

  from align_jax.data import synthetic_images
  from align_jax.testing import tiny_checkpoints as tiny
  tiny.make_tiny_dinov2(os.path.join(root, "models", "dinov2"), image_size=16, patch_size=4,
                        save_format="flax")
  tiny.make_tiny_bert(os.path.join(root, "models", "bert"), save_format="flax",
                      corpus=[" ".join(synthetic_images.vocabulary())] * 4)
  rng = np.random.default_rng(0)
  scenes = synthetic_images.SCENES
  for split, count, offset in (("train", NUM_TRAIN, 0), ("heldout", 24, 5)):
    os.makedirs(os.path.join(root, split), exist_ok=True)
    rows = []
    for i in range(count):
      scene = scenes[(7 * i + offset) % len(scenes)]  # captions in the tiny tokenizer's words
      name = f"{split}/{i:04d}.png"
      Image.fromarray(synthetic_images.render(*scene, rng, image_size=24)).save(
          os.path.join(root, name))
      rows.append({"image": name, "caption": synthetic_images.captions(*scene)})
    helpers_data.write_manifest(os.path.join(root, f"{split}.jsonl"), rows)
  os.makedirs(os.path.join(root, "shapes"), exist_ok=True)
  rows = []
  for i in range(20):
    colour = SHAPE_CLASSES[i % len(SHAPE_CLASSES)]
    pixels = synthetic_images.render(colour, synthetic_images.SHAPES[i % 4], "top left", "large",
                                     rng, image_size=24)
    Image.fromarray(pixels).save(os.path.join(root, "shapes", f"{i}.png"))
    rows.append({"image": f"shapes/{i}.png", "label": colour})
  helpers_data.write_manifest(os.path.join(root, "shapes.jsonl"), rows)


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, root="", steps=8)
  if not variant.root:
    raise ValueError("tests/multihost_config.py needs :root=FOLDER (see its docstring)")
  root = variant.root
  c = config_lib.default_config()
  c.total_steps = variant.steps
  c.batch_size = 16
  c.log_every = 1
  c.eval_every = 4
  c.checkpoint_every = 4
  c.eval_at_start = False

  c.data.source = "manifest"
  c.data.path = os.path.join(root, "train.jsonl")
  c.data.num_workers = 0
  c.data.num_threads = 1
  c.data.prefetch = 2

  m = c.model
  m.image_encoder = os.path.join(root, "models", "dinov2")
  m.text_encoder = os.path.join(root, "models", "bert")
  m.image_pooling = "tokens"
  m.text_pooling = "tokens"
  m.max_text_length = 12
  m.image_projector = "freeze_align_image"
  m.text_projector = "freeze_align_text"
  m.embed_dim = 16
  m.hidden_dim = 32
  m.dropout = 0.0
  c.optim.warmup_steps = 2

  c.evals.heldout = dict(type="retrieval", data=dict(path=os.path.join(root, "heldout.jsonl")),
                         batch_size=16, ks=(1, 5))
  c.evals.shapes = dict(type="zero_shot",
                        data=dict(source="manifest", path=os.path.join(root, "shapes.jsonl")),
                        class_names=SHAPE_CLASSES, templates=["a {} square", "{} circle"],
                        batch_size=8, ks=(1, 3))
  return c
