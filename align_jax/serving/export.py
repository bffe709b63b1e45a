"""Export a trained run as a small, shareable folder: projector weights, config and a model card.

    python -m align_jax.cli.export --workdir=/tmp/align_demo_online --out=/tmp/my_model [--step=N]
    hf upload USER/my-model /tmp/my_model .     # optional: share it on the hub

The folder holds

* ``projectors.safetensors``: every trainable array (image and text projectors, and the logit
  params) as float32, named by its "/"-joined path (``image/norm/scale``, ``logit/bias``); no
  pickle, readable by any safetensors client;
* ``config.json``: the training config (``align_jax.AlignedModel.load`` rebuilds the model from it);
* ``align_jax_model.json``: what a reader needs to know without align_jax: the frozen encoders
  (ids or paths), their poolings, image size, maximum text length, embedding width, loss type and
  learned temperature (or scale and bias), the step and the align_jax version.

Frozen encoder weights are not copied: they are named by their hub id (or the path they were
loaded from), and ``AlignedModel.load(folder, image_encoder=..., text_encoder=...)`` points at
another copy. ``AlignedModel.load`` of the folder gives bit-identical embeddings to loading the run.
The command line is :mod:`align_jax.cli.export`.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np

import align_jax
from align_jax.serving import inference
from align_jax.objectives import kinds as loss_kinds
from align_jax.run import reader as run_dir
from align_jax.run import storage

FORMAT = inference.EXPORT_FORMAT


def model_card(config: ml_collections.ConfigDict, params: dict, step: int) -> dict:
  """The ``align_jax_model.json`` contents for a config and its trained params."""
  m = config.model
  logit_values = loss_kinds.get(config.loss).host_loss_args(params["logit"])
  return {
      "format": FORMAT, "align_jax_version": align_jax.__version__, "step": int(step),
      "image_encoder": m.image_encoder, "text_encoder": m.text_encoder,
      "image_pooling": m.image_pooling, "text_pooling": m.text_pooling,
      "image_size": m.image_size,  # 0: the image encoder checkpoint's own resolution
      "max_text_length": m.max_text_length, "encoder_dtype": m.encoder_dtype,
      "image_projector": m.image_projector, "text_projector": m.text_projector,
      "embed_dim": m.embed_dim, "loss": config.loss.name, **logit_values,
      "weights": inference.WEIGHTS_FILE,
      "num_params": int(sum(np.asarray(x).size for x in _flatten(params).values())),
  }


def _flatten(params: dict) -> dict[str, np.ndarray]:
  from flax import traverse_util
  # np.array, not np.ascontiguousarray: the latter turns 0-d scalars (the logit params) into [1].
  return {name: np.array(value, np.float32, order="C")
          for name, value in traverse_util.flatten_dict(params, sep="/").items()}


def export(workdir: str, out: str, *, step: int | None = None,
           config: ml_collections.ConfigDict | None = None) -> dict:
  """Writes the export folder ``out`` for a run's checkpoint; returns the model card.

  Args:
    workdir: the training workdir (``checkpoints/`` and ``config.json``).
    out: the folder to write (created; files of an earlier export there are replaced).
    step: the checkpoint step (default: the latest; if that one is damaged, the newest that
      restores, named in one warning line and nothing moved).
    config: the training config, instead of ``WORKDIR/config.json``.
  """
  from safetensors.numpy import save
  if storage.is_url(out):  # an unreachable bucket: one line now, not after gcsfs's retries
    storage.check_writable(out)
  if not storage.isdir(workdir):
    raise FileNotFoundError(f"--workdir {workdir!r} is not a folder: pass a training workdir")
  if config is None:
    config = run_dir.read_config(workdir, fix="pass config= (the run's config) or re-run "
                                 "training once with a current align_jax to write it")
  params, step, _ = run_dir.restore_params(workdir, step)  # every process (orbax syncs them)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  card = model_card(config, params, step)
  if jax.process_index() != 0:  # a multi-process run: process 0 writes the folder
    return card
  # Each file is replaced whole (atomic; locally with the mode open() gives, 0644 under the usual
  # umask); the model card, which marks the folder as an export, comes last.
  storage.makedirs(out)
  storage.write_bytes(storage.join(out, inference.WEIGHTS_FILE),
                      save(_flatten(params), metadata={"format": FORMAT, "step": str(step)}))
  run_dir.write_config(out, config)
  storage.write_text(storage.join(out, inference.MODEL_FILE), json.dumps(card, indent=2))
  return card
