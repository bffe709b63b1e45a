"""What the notebooks run: real hub encoders on a small TFDS set with network, tiny models without.

Every notebook in ``notebooks/`` starts with :func:`use_hub`: a bounded check (``HF_HUB_OFFLINE``
/ ``ALIGN_JAX_OFFLINE`` set, else one HEAD request to the Hugging Face hub with a 3 s timeout)
that prints which path it took.

* **Hub path** (Colab): ``facebook/dinov2-small`` + ``sentence-transformers/all-MiniLM-L6-v2``,
  frozen, aligned on TFDS ``cifar100`` training images whose captions are their class name in
  CLIP's CIFAR templates ("a photo of a maple tree.", ...), and evaluated zero-shot on TFDS
  ``cifar10``, whose ten classes CIFAR-100 deliberately does not contain (no airplane,
  automobile, bird, cat, deer, dog, frog, horse, ship or truck): the accuracy is zero-shot
  transfer to unseen classes, with CIFAR-100's test split (seen class names, unseen images and
  prompts) beside it. ``configs/demo_online.py:hub=True`` is its config (also for ``main.py``;
  built, with its data, by :mod:`align_jax.testing.hub_demo`). TFDS downloads and prepares the
  two sets once as ``array_record`` (about 160 MB each; preparing CIFAR needs TensorFlow, which
  Colab has).
* **Offline path** (tests, machines without the hub): the online CPU demo as before, a tiny
  random DINOv2 and BERT on rendered coloured shapes; "zero-shot" there names the shape's colour.

The functions below hide the difference, so the notebooks' cells are the same on both paths and
hold no logic of their own: :func:`zero_shot_examples` and :func:`show_zero_shot`,
:func:`heldout_recall`, :func:`search`, :func:`extract_feature_stores` and
:func:`features_config` (training on stored features) and :func:`selection_candidates`
(encoder-pair selection). Nothing here has been run against the real hub or TFDS downloads
on our machines (no network): ``tests/test_demos.py`` runs the hub path with local stand-ins.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable

import ml_collections
import numpy as np

from align_jax.testing.hub_demo import (HUB_IMAGE_ENCODER, HUB_TEXT_ENCODER, TRAIN_SET,
                                        ZERO_SHOT_SET)

PROBE_URL = f"https://huggingface.co/api/models/{HUB_IMAGE_ENCODER}"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "ALIGN_JAX_OFFLINE")
# More candidates for the hub path of encoder-pair selection (small enough for a Colab CPU).
HUB_SELECTION = ((HUB_IMAGE_ENCODER, "google/vit-base-patch16-224-in21k"),
                 (HUB_TEXT_ENCODER, "sentence-transformers/all-mpnet-base-v2"))


def network_available(url: str = PROBE_URL, timeout_s: float = 3.0) -> tuple[bool, str]:
  """(whether ``url`` is reachable, why) within ``timeout_s``; offline variables win.

  Any HTTP answer, even an error status, means the network is there.
  """
  for name in OFFLINE_VARIABLES:
    value = os.environ.get(name, "")
    if value.strip().lower() not in ("", "0", "false", "no"):
      return False, f"{name}={value}"
  try:
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
      return True, f"{url} answered"
  except urllib.error.HTTPError as error:
    return True, f"{url} answered {error.code}"
  except (urllib.error.URLError, OSError, ValueError) as error:
    reason = getattr(error, "reason", error)
    return False, f"{url} unreachable within {timeout_s:g} s ({reason})"


def use_hub(url: str = PROBE_URL, timeout_s: float = 3.0,
            echo: Callable[[str], None] = print) -> bool:
  """Checks the network once and prints which path the notebook takes; True for the hub path."""
  online, why = network_available(url, timeout_s)
  if online:
    echo(f"network: {why} -> hub path: {HUB_IMAGE_ENCODER} + {HUB_TEXT_ENCODER}, aligned on "
         f"TFDS {TRAIN_SET}, zero-shot on TFDS {ZERO_SHOT_SET}")
  else:
    echo(f"no network: {why} -> offline path: the demo's tiny random encoders and rendered "
         "shapes")
  return online


def config_file(name: str, arg: str = "") -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the repository's ``configs/<name>.py`` (e.g. ``"demo_online"``).

  An installed align_jax has them as ``align_jax.configs`` (pyproject.toml maps the clone's
  ``configs/`` there); a clone on the path (the tests, Jupyter started at its root) as ``configs``.
  """
  try:
    module = importlib.import_module(f"align_jax.configs.{name}")
  except ModuleNotFoundError as error:
    if not (error.name or "").startswith("align_jax.configs"):
      raise
    module = importlib.import_module(f"configs.{name}")
  return module.get_config(arg)


def _is_hub(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config`` is the hub path's (its zero-shot evaluators name the TFDS sets)."""
  return ZERO_SHOT_SET in config.evals and config.data.source != "synthetic_shapes"


# ------------------------------------------------------------------------------ notebook cells


@dataclasses.dataclass
class Examples:
  """Images with their true class, for zero-shot classification by name."""
  images: list[np.ndarray]
  labels: list[str]
  class_names: list[str]
  templates: list[str] | str
  captions: list[str]  # what each image shows, for printing


def zero_shot_examples(config: ml_collections.ConfigDict, count: int = 0) -> Examples:
  """Labelled images the run never trained on: CIFAR-10 test images (hub), held-out shapes.

  ``count`` defaults to the hub path's zero-shot evaluation split, or 12 offline scenes.
  """
  if _is_hub(config):
    from align_jax.data import records
    from align_jax.evaluate import datasets
    data = config.evals[ZERO_SHOT_SET].data
    reader = datasets.TfdsClassificationReader(
        ZERO_SHOT_SET, split=f"test[:{count}]" if count else data.split, data_dir=data.data_dir)
    images, labels = [], []
    for i in range(len(reader)):
      record = reader.read(i)
      image = records.decode_image(record.image, key=record.key, max_pixels=1 << 24, min_size=1)
      images.append(np.asarray(image.convert("RGB")))
      labels.append(reader.class_names[record.label])
    return Examples(images, labels, list(reader.class_names), "cifar",
                    [f"CIFAR-10 test image: {label}" for label in labels])
  from align_jax.data import synthetic_images
  count = count or 12
  reader = synthetic_images.ShapesReader(split="heldout", seed=config.data.data_seed)
  step = max(len(reader) // count, 1)
  records = [reader.read(i) for i in range(0, step * count, step)]
  # The demo's tokenizer knows only the captions' words, so the templates use them.
  templates = ["a small {} circle", "a large {} square", "a small {} triangle",
               "a large {} cross"]
  return Examples([r.image for r in records],
                  [synthetic_images.SCENES[i % len(synthetic_images.SCENES)][0]
                   for i in range(0, step * count, step)],
                  list(synthetic_images.COLORS), templates, [r.captions[0] for r in records])


def show_zero_shot(model, examples: Examples, rows: int = 12) -> float:
  """Classifies ``examples`` with ``model.zero_shot_classify``; prints ``rows`` and the accuracy."""
  probs, predicted = model.zero_shot_classify(examples.images, examples.class_names,
                                              examples.templates)
  for caption, label, name, p in list(zip(examples.captions, examples.labels, predicted,
                                          probs.max(axis=1)))[:rows]:
    print(f"{caption:40s} -> {name:12s} (p={p:.2f}){'' if name == label else '  x'}")
  accuracy = float(np.mean([name == label for name, label in zip(predicted, examples.labels)]))
  print(f"zero-shot accuracy: {accuracy:.3f} on {len(examples.labels)} images, "
        f"{len(examples.class_names)} classes (chance {1 / len(examples.class_names):.3f})")
  return accuracy


def heldout_recall(model, config: ml_collections.ConfigDict) -> dict[str, float] | None:
  """Image<->text recall@1/5/10 on the offline demo's 256 held-out scenes, printed.

  The hub path has no caption set to rank (CIFAR captions name only the class, so many images
  share one): it says so and returns None; its evaluation is the zero-shot accuracy.
  """
  if _is_hub(config):
    print("hub path: no held-out caption set (CIFAR captions name only the class); see the "
          "zero-shot accuracy")
    return None
  from align_jax.data import synthetic_images
  from align_jax.evaluate import metrics
  reader = synthetic_images.ShapesReader(split="heldout", seed=config.data.data_seed)
  heldout = [reader.read(i) for i in range(len(reader))]
  image_emb = model.embed_images([record.image for record in heldout])
  text_emb = model.embed_texts([caption for record in heldout for caption in record.captions])
  recall = metrics.retrieval_recall(image_emb, text_emb, np.repeat(np.arange(len(heldout)), 2),
                                    k=(1, 5, 10))
  print(recall)
  return recall


def extract_feature_stores(config: ml_collections.ConfigDict, folder: str) -> dict[str, dict]:
  """Encodes the training set (and, offline, the held-out scenes) once into ``folder/<name>``.

  Offline: 1,024 training scenes and the 256 held-out ones; hub: the CIFAR-100 caption set.
  Returns each store's manifest (``align_jax.train.extract``), after printing a summary.
  """
  from align_jax.train import extract as feature_store
  sets = {"train": config.copy_and_resolve_references()}
  if not _is_hub(config):
    sets["train"].data.num_pairs = 1024  # small, for a CPU
    sets["heldout"] = config.copy_and_resolve_references()
    sets["heldout"].data.split = "heldout"
  stores = {name: feature_store.extract_features(c, os.path.join(folder, name))
            for name, c in sets.items()}
  for name, manifest in stores.items():
    print(name, {k: manifest[k] for k in ("image_encoder", "image_pooling", "text_pooling",
                                           "num_images", "num_texts")})
  return stores


def features_config(config: ml_collections.ConfigDict, folder: str,
                    steps: int = 0) -> ml_collections.ConfigDict:
  """``config`` trained on the stores of :func:`extract_feature_stores` (encoders never run).

  Offline, retrieval is evaluated on the stored held-out features; the hub path's zero-shot
  evaluators need raw images, so they move to after training (:func:`show_zero_shot`), and it
  trains ``steps`` (default: 1,000, cheap without the encoders).
  """
  hub = _is_hub(config)
  config = config.copy_and_resolve_references()
  config.data.source = "features"
  config.data.path = os.path.join(folder, "train")
  config.model.image_encoder = config.model.text_encoder = "features"
  if hub:
    config.evals = {}
    config.total_steps = steps or max(config.total_steps, 1000)
    config.eval_every = config.checkpoint_every = config.total_steps
  else:
    config.total_steps = steps or config.total_steps
    config.evals.heldout.data = {"path": os.path.join(folder, "heldout")}
  return config


def selection_candidates(config: ml_collections.ConfigDict, folder: str
                         ) -> tuple[list[str], list[str], ml_collections.ConfigDict, int]:
  """(image encoders, text encoders, data, number of images) for encoder-pair selection.

  Hub: DINOv2-S and a ViT-B/16 against MiniLM and MPNet, scored on 1,000 CIFAR-100 training
  images with their class-name captions. Offline: the demo's tiny DINOv2 and BERT and a tiny ViT
  and RoBERTa written to ``folder``, scored on the 256 held-out scenes.
  """
  if _is_hub(config):
    data = ml_collections.ConfigDict({"source": "manifest", "path": config.data.path})
    return list(HUB_SELECTION[0]), list(HUB_SELECTION[1]), data, 1000
  from align_jax.testing import tiny_checkpoints as tiny
  vit = tiny.make_tiny_vit(os.path.join(folder, "tiny_vit"), image_size=32, patch_size=4,
                           save_format="flax")
  roberta = tiny.make_tiny_roberta(os.path.join(folder, "tiny_roberta"), save_format="flax")
  data = ml_collections.ConfigDict({"source": "synthetic_shapes", "split": "heldout"})
  return ([config.model.image_encoder, vit], [config.model.text_encoder, roberta], data, 256)


def search(model, config: ml_collections.ConfigDict, query: str = "", k: int = 5) -> list[str]:
  """The ``k`` images that best match a free-text query, printed as what they show."""
  examples = zero_shot_examples(config, count=0 if _is_hub(config) else 64)
  query = query or ("a photo of a red sports car." if _is_hub(config)
                    else "a large red circle in the top left")
  index, scores = model.retrieve(model.embed_texts([query]), model.embed_images(examples.images),
                                 k=k)
  print(f"query: {query!r}")
  shown = [examples.captions[i] for i in index[0]]
  for caption, score in zip(shown, scores[0]):
    print(f"{score:.3f}  {caption}")
  return shown
