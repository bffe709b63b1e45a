"""Online CPU demo: the real loading path (Hugging Face safetensors checkpoints, image-caption pipeline).

    python main.py --config=configs/demo_online.py --workdir=/tmp/align_demo_online

A tiny random DINOv2 and a tiny random BERT (with a WordPiece tokenizer trained on the captions'
words) are written as safetensors checkpoints (from align_jax's own modules) on first use, under ``$ALIGN_JAX_CACHE`` (default
``$XDG_CACHE_HOME/align_jax`` or ``~/.cache/align_jax``; a private folder, align_jax.run.cache_dir),
then loaded through ``align_jax.encoders`` exactly as ``facebook/dinov2-large`` would be. Images
are rendered coloured shapes with captions ("a large red circle in the top left";
align_jax.data.synthetic_images), decoded, augmented, normalised and
tokenized by the same pipeline as real WebDataset/TFDS data, and both encoders run frozen inside
the train step. Retrieval is scored on 256 held-out scenes (chance R@1 = 1/256 ~ 0.004).
Nothing is downloaded.

    python main.py --config=configs/demo_online.py:hub=True,steps=300 --workdir=/tmp/align_demo_hub

is the same demo with real models, for machines with the Hugging Face hub and TFDS downloads (the
notebooks' hub path, :mod:`align_jax.testing.hub_demo`): ``facebook/dinov2-small`` +
``sentence-transformers/all-MiniLM-L6-v2`` aligned on CIFAR-100 images captioned with their class
names, evaluated zero-shot on CIFAR-10's ten unseen classes. Its variants: ``data_root`` (TFDS
data and the caption manifest), ``num_train``, ``num_eval``, ``image_size``, ``batch``, and
``image_encoder`` / ``text_encoder`` (other ids or local folders).
"""

import os

from align_jax.config import schema as config_lib


def tiny_encoders(cache_dir: str | None = None) -> tuple[str, str]:
  """Paths of the demo's tiny image and text checkpoints, written once (atomically) if missing."""
  from align_jax.data import synthetic_images
  from align_jax.testing import tiny_checkpoints as tiny
  from align_jax.run import cache_dir as cache_lib  # private per-user folders (mode 0700)
  cache_dir = cache_lib.private_dir(cache_dir) if cache_dir else cache_lib.user_cache_dir()
  paths = {}
  for name, make in (
      ("tiny_dinov2", lambda p: tiny.make_tiny_dinov2(p, image_size=32, patch_size=4,
                                                      save_format="flax", seed=0)),
      ("tiny_bert", lambda p: tiny.make_tiny_bert(
          p, save_format="flax", seed=0, corpus=[" ".join(synthetic_images.vocabulary())] * 4))):
    path = os.path.join(cache_lib.private_dir(os.path.join(cache_dir, "demo_online")), name)
    if not os.path.exists(os.path.join(path, "config.json")):
      staging = f"{path}.tmp{os.getpid()}"
      make(staging)
      try:
        os.rename(staging, path)
      except OSError:  # another process finished first
        pass
    paths[name] = path
  return paths["tiny_dinov2"], paths["tiny_bert"]


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, steps=600, cache="", hub=False, data_root="align_demo_data",
                                 num_train=5000, num_eval=500, image_size=112, batch=128,
                                 image_encoder="", text_encoder="")
  if variant.hub:
    from align_jax.testing import hub_demo
    return hub_demo.hub_config(variant.steps, data_root=variant.data_root,
                               num_train=variant.num_train, num_eval=variant.num_eval,
                               image_size=variant.image_size, batch_size=variant.batch,
                               image_encoder=variant.image_encoder,
                               text_encoder=variant.text_encoder)
  image_path, text_path = tiny_encoders(variant.cache or None)
  config = config_lib.default_config()
  config.total_steps = variant.steps
  config.batch_size = 64
  config.log_every = 25
  config.eval_every = 100
  config.checkpoint_every = 100
  config.eval_at_start = True

  config.data.source = "synthetic_shapes"
  config.data.num_pairs = 8192
  config.data.num_threads = 2
  config.data.crop_scale = (0.8, 1.0)  # captions name the quadrant: keep it in view
  config.data.flip = False  # ... and do not swap left and right

  m = config.model
  m.image_encoder = image_path
  m.image_pooling = "tokens"
  m.text_encoder = text_path
  m.text_pooling = "tokens"
  m.max_text_length = 16
  m.image_projector = "freeze_align_image"
  m.text_projector = "freeze_align_text"
  m.embed_dim = 64
  m.dropout = 0.0

  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 30
  config.evals.heldout = dict(type="retrieval", data=dict(split="heldout"), batch_size=256,
                              ks=(1, 5, 10))
  return config
