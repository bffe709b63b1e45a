"""A trained align_jax model for users: load a run or an export, embed images and texts, classify.

    model = align_jax.AlignedModel.load("/tmp/align_demo_online")   # a workdir or an export
    image_emb = model.embed_images(pil_images)                      # [N, D], unit rows
    probs, names = model.zero_shot_classify(pil_images, ["circle", "square"], templates=None)

``load`` accepts either a training workdir (its latest checkpoint, or ``step=``; the run's
``config.json``, or ``config=``) or a folder written by ``python -m align_jax.cli.export``
(projector weights as safetensors, no orbax needed). Both give bit-identical embeddings. The frozen
encoders are rebuilt from the config, exactly as in training.

What ``embed_images`` / ``embed_texts`` take depends on the config's encoders:

* Hugging Face encoders (an id or folder): PIL images or uint8 ``[N, H, W, 3]`` arrays, and lists
  of strings (tokenized by the text encoder's tokenizer at ``max_text_length``). Images are
  preprocessed at the image encoder's resolution with its mean/std, by one of two pipelines
  (``image_preprocessing=``):

  - ``"eval"`` (default): the trainer's own evaluation transform (shorter side to the image size,
    centre crop; ``align_jax.data.transforms``), the view the run's held-out metrics were measured
    on and the one the projectors were trained near. On the online demo a model trained on stored
    features retrieves held-out scenes at R@1 0.125 with it, 0.082 with ``"encoder"``.
  - ``"encoder"``: the checkpoint's Hugging Face image processor (for DINOv2: resize to 8/7 of the
    size, then crop), as the encoder alone would be used.
* ``random_mlp`` (the CPU demo's fixed random encoders): raw float vectors
  ``[N, data.image_input_dim]`` / ``[N, data.text_input_dim]``, the demo world's "images" and
  "texts".
* ``features`` (stored encoder outputs): the features themselves, ``[N, D]`` pooled or a dict
  ``{"tokens": [N, T, D], "mask": [N, T]}``.

Embeddings are computed by the jitted ``AlignModel.embed_images`` / ``embed_texts`` in fixed-size
batches (the last one padded, so each tower compiles once) and returned as float32 numpy arrays
with unit L2 norm.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from align_jax import version
from align_jax.model import interfaces
from align_jax.objectives import kinds as loss_kinds
from align_jax.model import two_tower as model_lib
from align_jax.run import reader as run_dir, storage
from align_jax.train import step as step_builder

MODEL_FILE = "align_jax_model.json"  # marks an exported folder
EXPORT_FORMAT = "align_jax.model/1"
WEIGHTS_FILE = "projectors.safetensors"
CONFIG_FILE = run_dir.CONFIG_FILE
IMAGE_PREPROCESSING = ("eval", "encoder")


def load_exported_params(folder: str) -> dict:
  """The params pytree of an exported folder's safetensors file."""
  from flax import traverse_util
  from safetensors.numpy import load
  path = storage.join(folder, WEIGHTS_FILE)
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path} is missing: export the run again with python -m "
                            "align_jax.cli.export --workdir=RUN --out=FOLDER")
  return traverse_util.unflatten_dict(load(storage.read_bytes(path)), sep="/")


def _as_rows(x: Any, name: str) -> np.ndarray:
  array = np.asarray(x, np.float32)
  if array.ndim == 1:
    array = array[None]
  if array.ndim != 2:
    raise ValueError(f"{name} must be a [N, D] array of vectors, got shape {array.shape}")
  return array


class AlignedModel:
  """Frozen encoders + trained projectors, as a model that embeds, classifies and retrieves.

  Attributes:
    config: the training config the model was built from.
    params: trainable params (projectors and logit params), on the default device.
    step: the training step the params come from.
    model: the :class:`align_jax.model.two_tower.AlignModel`.
    loss_kind: the :mod:`align_jax.objectives.kinds` object of the config's loss (logit params ->
      temperature or scale and bias -> probabilities).
    batch_size: rows per jitted embedding call.
    image_preprocessing: "eval" or "encoder" (how raw images become pixels; module docstring).
  """

  def __init__(self, config: ml_collections.ConfigDict, params: dict, *, step: int,
               batch_size: int = 64, image_preprocessing: str = "eval"):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_preprocessing not in IMAGE_PREPROCESSING:
      raise ValueError(f"image_preprocessing must be one of {IMAGE_PREPROCESSING}, got "
                       f"{image_preprocessing!r}")
    self.image_preprocessing = image_preprocessing
    self.config = config
    self.step = int(step)
    self.batch_size = int(batch_size)
    self.model = model_lib.build_model(config)
    self.loss_kind = loss_kinds.get(config.loss)
    self.params = jax.device_put(params)
    self.frozen, _ = step_builder.place_frozen(self.model, None, config)  # the default device
    self._embed_images = jax.jit(self.model.embed_images)
    self._embed_texts = jax.jit(self.model.embed_texts)
    self._eval_transform = None

  @classmethod
  def load(cls, path: str | os.PathLike, *, config: ml_collections.ConfigDict | None = None,
           step: int | None = None, image_encoder: str | None = None,
           text_encoder: str | None = None, batch_size: int = 64,
           image_preprocessing: str = "eval") -> "AlignedModel":
    """Loads a training workdir or a folder written by ``python -m align_jax.cli.export``.

    Args:
      path: the workdir (needs ``checkpoints/`` and ``config.json``) or exported folder.
      config: the training config, instead of the folder's ``config.json``.
      step: a workdir's checkpoint step (default: the latest); exports hold one step.
      image_encoder / text_encoder: another location of the same frozen encoder (a folder or hub
        id), for a model trained on a machine whose encoder paths do not exist here.
      batch_size: rows per embedding call.
      image_preprocessing: "eval" (the trainer's evaluation transform) or "encoder" (the image
        encoder's Hugging Face processor); see the module docstring.
    """
    path = os.fspath(path)
    if not storage.isdir(path):
      raise FileNotFoundError(f"{path!r} is not a folder: pass a training workdir or a folder "
                              "written by python -m align_jax.cli.export")
    exported = storage.isfile(storage.join(path, MODEL_FILE))
    if config is None:
      config = run_dir.read_config(
          path, fix="pass the run's config, e.g. AlignedModel.load(path, "
          "config=configs.demo.get_config()), or train with a current align_jax (it writes "
          "config.json into the workdir)")
    else:
      config = ml_collections.ConfigDict(config.to_dict())
    if image_encoder is not None:
      config.model.image_encoder = image_encoder
    if text_encoder is not None:
      config.model.text_encoder = text_encoder
    if exported:
      info = json.loads(storage.read_text(storage.join(path, MODEL_FILE)))
      if info.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} holds an export of format {info.get('format')!r}; this "
                         f"align_jax ({version.__version__}) reads {EXPORT_FORMAT!r}: upgrade "
                         "align_jax or export the run again")
      if step is not None and step != info.get("step"):
        raise ValueError(f"{path} is an export of step {info.get('step')}, not {step}: export "
                         f"that step (python -m align_jax.cli.export --step={step}) or drop step=")
      params, step = load_exported_params(path), info.get("step", 0)
    else:
      params, step, _ = run_dir.restore_params(path, step)
      params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return cls(config, params, step=step, batch_size=batch_size,
               image_preprocessing=image_preprocessing)

  # ----------------------------------------------------------------------------------- inputs

  def _inputs(self, encoder: Any, items: Any, tower: str) -> tuple[dict, int]:
    """Raw user inputs -> (the encoder's input dict of host arrays, row count)."""
    if encoder.input_kind == interfaces.RAW:  # Hugging Face: images / strings
      if tower == "image" and isinstance(items, np.ndarray) and items.ndim == 3:
        items = items[None]
      if tower == "text" and isinstance(items, str):
        items = [items]
      if len(items) == 0:
        raise ValueError(f"embed_{tower}s got no inputs")
      if tower == "image" and self.image_preprocessing == "eval":
        return {"pixel_values": self._eval_pixels(items)}, len(items)
      return dict(encoder.preprocess(items)), len(items)
    if encoder.input_kind == interfaces.VECTORS:  # the demo's random MLPs
      values = _as_rows(items, f"{tower} inputs (raw demo vectors)")
      if values.shape[1] != encoder.input_dim:
        raise ValueError(f"the demo's random {tower} encoder takes vectors of width "
                         f"{encoder.input_dim} (config.data.{tower}_input_dim), got "
                         f"{values.shape[1]}")
      return {"values": values}, values.shape[0]
    if isinstance(items, Mapping):  # stored token features
      if set(items) != {"tokens", "mask"}:
        raise ValueError(f"token features must be a dict with 'tokens' [N, T, D] and 'mask' "
                         f"[N, T], got keys {sorted(items)}")
      tokens = np.asarray(items["tokens"], np.float32)
      return {"tokens": tokens, "mask": np.asarray(items["mask"], bool)}, tokens.shape[0]
    pooled = _as_rows(items, f"{tower} features")
    return {"pooled": pooled}, pooled.shape[0]

  def _eval_pixels(self, images: Any) -> np.ndarray:
    """The trainer's evaluation transform of PIL images or uint8 arrays: float32 NHWC."""
    from align_jax.data import factory
    from align_jax.encoders import image_processing
    if self._eval_transform is None:
      self._eval_transform = factory.make_image_transform(self.model, self.config.data,
                                                          train=False)
    return np.stack([self._eval_transform(image_processing.to_rgb_pil(image))
                     for image in images])

  def _embed(self, fn, encoder, items, tower: str) -> np.ndarray:
    inputs, count = self._inputs(encoder, items, tower)
    if count == 0:
      raise ValueError(f"embed_{tower}s got no inputs")
    outputs = []
    for start in range(0, count, self.batch_size):
      chunk = jax.tree.map(lambda x: x[start:start + self.batch_size], inputs)
      rows = jax.tree.leaves(chunk)[0].shape[0]
      pad = self.batch_size - rows
      if pad:  # one shape for every call: the jitted tower compiles once
        chunk = jax.tree.map(lambda x: np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), chunk)
      outputs.append(np.asarray(fn(self.params, self.frozen, chunk))[:rows])
    return np.concatenate(outputs)

  def embed_images(self, images: Any) -> np.ndarray:
    """Images (see the module docstring for what each encoder takes) -> [N, D] unit embeddings."""
    return self._embed(self._embed_images, self.model.image_encoder, images, "image")

  def embed_texts(self, texts: Any) -> np.ndarray:
    """Texts (strings for a Hugging Face encoder) -> [N, D] unit embeddings."""
    return self._embed(self._embed_texts, self.model.text_encoder, texts, "text")

  # ------------------------------------------------------------------------------ zero-shot

  @property
  def logit_params(self) -> dict[str, float]:
    """The learned ``{"temperature"}`` (softmax loss) or ``{"scale", "bias"}`` (sigmoid loss)."""
    return self.loss_kind.host_loss_args(jax.device_get(self.params["logit"]))

  def class_embeddings(self, class_names: Sequence[str],
                       templates: str | Sequence[str] | None = "imagenet80") -> np.ndarray:
    """[C, D] prompt-ensemble class embeddings (``align_jax.evaluate.prompts.class_embeddings``)."""
    if self.model.text_encoder.input_kind != interfaces.RAW:
      raise ValueError(f"class names need a text encoder that reads strings; this model's is "
                       f"{self.model.text_encoder.name!r}: pass class_embeddings= (e.g. "
                       "embed_texts of one text input per class) to zero_shot_classify")
    from align_jax.evaluate import prompts
    return prompts.class_embeddings(class_names, self.embed_texts, templates,
                                    batch_size=max(self.batch_size, 1))

  def probabilities(self, image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Class probabilities from embeddings, with the loss the model was trained with.

    Softmax loss: ``softmax(image_emb @ class_emb.T / temperature)`` over classes (rows sum to 1).
    Sigmoid loss: ``sigmoid(scale * image_emb @ class_emb.T + bias)``, one independent
    probability per class (SigLIP).
    """
    return self.loss_kind.probabilities(image_emb, class_emb, self.logit_params)

  def zero_shot_classify(self, images: Any, class_names: Sequence[str],
                         templates: str | Sequence[str] | None = "imagenet80", *,
                         class_embeddings: np.ndarray | None = None,
                         ) -> tuple[np.ndarray, list[str]]:
    """Classifies images among named classes, with no classifier training.

    Args:
      images: images in the form ``embed_images`` takes.
      class_names: the C class names, in column order.
      templates: prompt templates (a name in ``align_jax.evaluate.templates.TEMPLATES`` such as
        "imagenet80", a list of "... {} ..." strings, or None for the bare names).
      class_embeddings: [C, D] precomputed class embeddings, used instead of encoding the names
        (needed for encoders that do not read strings, e.g. the random_mlp demo).

    Returns:
      ([N, C] float32 probabilities (see :meth:`probabilities`), the N predicted class names).
    """
    names = list(class_names)
    if class_embeddings is None:
      class_embeddings = self.class_embeddings(names, templates)
    class_embeddings = _as_rows(class_embeddings, "class_embeddings")
    if class_embeddings.shape[0] != len(names):
      raise ValueError(f"class_embeddings has {class_embeddings.shape[0]} rows for "
                       f"{len(names)} class names; pass one row per class")
    probs = self.probabilities(self.embed_images(images), class_embeddings)
    return probs, [names[i] for i in np.argmax(probs, axis=1)]

  @staticmethod
  def retrieve(query_emb: np.ndarray, key_emb: np.ndarray, k: int = 5
               ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` keys most similar to each query: ([Q, k] indices, [Q, k] cosine scores).

    Ties keep the lower key index first (stable sort), so the result does not depend on backend.
    """
    queries, keys = _as_rows(query_emb, "query_emb"), _as_rows(key_emb, "key_emb")
    if queries.shape[1] != keys.shape[1]:
      raise ValueError(f"query width {queries.shape[1]} != key width {keys.shape[1]}: embed both "
                       "with the same model")
    if not 1 <= k <= keys.shape[0]:
      raise ValueError(f"k must be in [1, {keys.shape[0]}] (the number of keys), got {k}")
    scores = queries @ keys.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)

  def __repr__(self) -> str:
    m = self.config.model
    return (f"AlignedModel(step={self.step}, image_encoder={m.image_encoder!r}, "
            f"text_encoder={m.text_encoder!r}, embed_dim={m.embed_dim}, "
            f"loss={self.config.loss.name!r})")
