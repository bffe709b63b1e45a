"""The frozen encoder a config names: a Hugging Face id or folder, stored features, or the demo's.

``config.model.image_encoder`` / ``text_encoder`` is one string; this is the one place that turns it
into a :class:`align_jax.model.interfaces.FrozenEncoder` (``features``: the batch holds stored
encoder outputs; ``random_mlp``: the CPU demo's fixed random networks; anything else: a checkpoint
loaded by :class:`align_jax.encoders.image.ImageEncoder` / :class:`align_jax.encoders.text.TextEncoder`).
"""

from __future__ import annotations

import ml_collections

from align_jax.encoders import image, random_mlp, stored_features, text


def build_encoder(spec: str, config: ml_collections.ConfigDict, tower: str,
                  abstract: bool = False):
  """The frozen encoder named by ``config.model.<tower>_encoder``.

  ``abstract=True``: a Hugging Face encoder's params are ``jax.ShapeDtypeStruct``s from its
  config.json alone (no weights read; see ``ImageEncoder.from_pretrained``), for compiling without
  the checkpoint. The demo encoders are small and computed from a seed, so they are built as usual.
  """
  if spec == "features":
    return stored_features.StoredFeatures()
  if spec == "random_mlp":
    data = config.data
    input_dim = data.image_input_dim if tower == "image" else data.text_input_dim
    return random_mlp.RandomMLPEncoder(
        input_dim=input_dim, width=config.model.encoder_width,
        output_dim=config.model.encoder_output_dim,
        seed=data.data_seed + (101 if tower == "image" else 202),
        activation="tanh" if tower == "image" else "sin")
  if not spec:
    raise ValueError(f"no {tower} encoder: set config.model.{tower}_encoder to a Hugging Face id "
                     "or folder, 'features' (stored features) or 'random_mlp' (demo)")
  m = config.model
  if tower == "image":
    return image.ImageEncoder.from_pretrained(
        spec, pooling=m.image_pooling, image_size=m.image_size or None, dtype=m.encoder_dtype,
        layer=m.image_layer, abstract=abstract)
  return text.TextEncoder.from_pretrained(
      spec, pooling=m.text_pooling, max_length=m.max_text_length, dtype=m.encoder_dtype,
      layer=m.text_layer, prefix=m.text_prefix, abstract=abstract)
