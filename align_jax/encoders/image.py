"""Frozen image encoders (DINOv2, DINOv3, ViT, CLIP and SigLIP vision towers) on align_jax's modules.

Checkpoints are Hugging Face folders or hub ids; the weights are read by
:mod:`align_jax.encoders.weights` into the modules of :mod:`align_jax.encoders.vit` (no
transformers model class, no torch).

``ImageEncoder.apply(params, {"pixel_values": [B, H, W, 3]})`` is a pure function of its frozen
params, so the train step can call it inside ``jax.jit`` on sharded batches; ``encode`` is the
user-facing path (preprocess + jitted apply, fixed batch shape so it compiles once).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.model import interfaces
from align_jax.encoders import hub
from align_jax.encoders import image_processing
from align_jax.encoders import layers as layers_lib
from align_jax.encoders import pooling as pooling_lib
from align_jax.encoders import vit
from align_jax.encoders import weights as weights_lib

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


def _processor(kind: str, **settings: Any) -> Callable[[], dict[str, Any]]:
  return lambda: {"image_processor_type": kind, **settings}


_DINOV2 = _processor("BitImageProcessor", size={"shortest_edge": 256}, crop_size=224, resample=3,
                     image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD)
# The processor a family's checkpoints use when a folder has no preprocessor_config.json
# (DINOv2's: resize 256, crop 224, ImageNet statistics, as every facebook/dinov2-* ships).
_DEFAULT_PROCESSORS: dict[str, Callable[[], dict[str, Any]]] = {
  "dinov2": _DINOV2,
  "dinov3_vit": _processor("DINOv3ViTImageProcessorFast"),
  "vit": _processor("ViTImageProcessor"),
  "clip": _processor("CLIPImageProcessor"),
  "clip_vision_model": _processor("CLIPImageProcessor"),
  "siglip": _processor("SiglipImageProcessor"),
  "siglip_vision_model": _processor("SiglipImageProcessor"),
}
IMAGE_FAMILIES: dict[str, vit.Family] = vit.FAMILIES


def compute_dtype(dtype: Any) -> jnp.dtype:
  """Parses a floating compute dtype name; ValueError otherwise."""
  try:
    parsed = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from e
  if not jnp.issubdtype(parsed, jnp.floating):
    raise ValueError(f"dtype must be floating (float32, bfloat16, float16), got {dtype!r}")
  return parsed


def cast_params(params: Any, dtype: jnp.dtype) -> Any:
  """Frozen params as device arrays, floating leaves in the compute dtype (halves memory in bf16).

  ``jax.ShapeDtypeStruct`` leaves (the ``abstract=True`` path) stay abstract, with the dtype the
  cast would give, so abstract and loaded params have the same shapes and dtypes.
  """
  def cast(x: Any) -> Any:
    floating = np.issubdtype(x.dtype, np.floating)
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype if floating else x.dtype)
    return jnp.asarray(x, dtype) if floating else jnp.asarray(x)
  return jax.tree.map(cast, params)


def _check_pooling_fits(pooling: str, config: vit.VisionConfig, name: str) -> None:
  """ValueError when the family lacks what the pooling reads (a class token, SigLIP's head)."""
  if pooling in ("cls", "cls+mean_patch") and not config.cls_token:
    raise ValueError(f"{name} ({config.model_type}) has no class token, so pooling {pooling!r} "
                     "does not exist: use --config.model.image_pooling=map (its attention-pool "
                     "head), mean or tokens")
  if pooling == "map" and not config.head:
    raise ValueError(f"{name} ({config.model_type}) has no attention-pool head, so pooling 'map' "
                     "does not exist: use cls, mean, cls+mean_patch or tokens")


class ImageEncoder:
  """A frozen image encoder: params, a pure ``apply`` and its checkpoint's HF preprocessing.

  Attributes:
    params: the frozen parameter pytree (never trained; pass it to ``apply``).
    output_dim: width of ``apply(...)["pooled"]`` (hidden size, doubled for "cls+mean_patch"), or
      of each token for "tokens".
    image_size: square input resolution ``apply`` expects.
    mean, std: the normalisation ``preprocess`` applies (for data pipelines).
    name: the name or folder it was loaded from.
    pooling: the pooling ``apply`` returns.
    preprocessing: the checkpoint's image processor at ``image_size``
      (:class:`align_jax.encoders.image_processing.ImageProcessor`).
    num_tokens: tokens per image (class and register tokens + patches).
    layers: the layer indices ``apply`` pools (see :mod:`align_jax.encoders.layers`); ``(N,)``,
      the final output, by default.
    config: the family config (:class:`align_jax.encoders.vit.VisionConfig`).
    revision: the hub commit the checkpoint was resolved to (None for a local folder).
    input_kind: ``interfaces.RAW``: it reads images (a ``interfaces.RawInputEncoder``).
  """

  input_kind = interfaces.RAW

  def __init__(self, *, name: str, config: vit.VisionConfig, params: Any, pooling: str,
               preprocessing: image_processing.ImageProcessor, dtype: jnp.dtype,
               layers: tuple[int, ...] | None = None, revision: str | None = None):
    self.name = name
    self.config = config
    self.params = params
    self.pooling = pooling
    self.preprocessing = preprocessing
    self.dtype = dtype
    self.revision = revision
    self.image_size = preprocessing.image_size
    self.mean = preprocessing.mean
    self.std = preprocessing.std
    self.grid = self.image_size // config.patch_size
    self.num_tokens = config.num_prefix_tokens + self.grid ** 2
    width = int(config.hidden_size)
    self.output_dim = 2 * width if pooling == "cls+mean_patch" else width
    self.num_layers = int(config.num_layers)
    self.layers = (self.num_layers,) if layers is None else tuple(layers)
    self._jit_apply = jax.jit(self.apply)

  @classmethod
  def from_pretrained(cls, name_or_path: str, pooling: str = "cls", image_size: int | None = None,
                      dtype: str = "float32", layer: Any = layers_lib.FINAL,
                      abstract: bool = False) -> "ImageEncoder":
    """Loads a checkpoint (local folder or hub id) as a frozen encoder (align_jax's own modules).

    Args:
      name_or_path: folder with config.json and weights (safetensors, single or sharded, or a
        Flax msgpack), or a hub id (from the local cache when offline).
      pooling: "cls", "mean" (patch tokens), "cls+mean_patch", "tokens" or "map" (SigLIP's
        attention-pool head).
      image_size: square input size; defaults to the processor's output (224 for DINOv2). At a
        patch grid other than the checkpoint's, position embeddings are resampled once, exactly as
        PyTorch does at run time (DINOv3's RoPE is computed for the grid it gets).
      dtype: compute (and frozen-param) dtype, e.g. "bfloat16"; outputs are always float32.
      layer: which layer's tokens are pooled, or a list of layers to average (see
        :mod:`align_jax.encoders.layers`): -1 (default) is the final output after the family's
        final LayerNorm; other indices are HF's raw ``hidden_states[k]``; only layers up to the
        deepest one asked for are run.
      abstract: ``params`` are ``jax.ShapeDtypeStruct``s, the shapes and dtypes loading would give
        (position embeddings at the resampled grid), from ``config.json`` alone: no weights file is
        needed or read. For ahead-of-time compiles (align_jax.train.aot); ``apply`` needs real params.
    """
    pooling_lib.check_pooling(pooling, pooling_lib.IMAGE_POOLINGS, "image")
    dtype = compute_dtype(dtype)
    folder, revision = hub.resolve_with_revision(name_or_path, "--config.model.image_encoder",
                                                 weights=not abstract)
    raw_config = weights_lib.read_config(folder)
    model_type = raw_config.get("model_type")
    if model_type not in IMAGE_FAMILIES:
      raise ValueError(f"{name_or_path}: unsupported image encoder family {model_type!r}; "
                       f"valid: {', '.join(IMAGE_FAMILIES)}")
    config = vit.read_config(raw_config)
    _check_pooling_fits(pooling, config, str(name_or_path))
    layers = layers_lib.parse_layers(layer, config.num_layers, "--config.model.image_layer")
    if pooling == "map" and not layers_lib.is_final(layers, config.num_layers):
      raise ValueError(f"{name_or_path}: pooling 'map' is the head on the final output; use "
                       "--config.model.image_layer=-1 with it, or pool another layer by mean")
    processor = image_processing.load_image_processor(folder, _DEFAULT_PROCESSORS[model_type])
    preprocessing = image_processing.ImageProcessor(processor, image_size,
                                                    default_size=config.image_size)
    image_size = preprocessing.image_size
    if image_size < config.patch_size:
      raise ValueError(f"image_size {image_size} is smaller than the patch size {config.patch_size}")
    grid = image_size // config.patch_size
    if abstract:
      params = vit.abstract_params(config, grid)
    else:
      params = vit.load_params(weights_lib.read_state_dict(folder), config, grid=grid)
    params = cast_params(params, dtype)
    return cls(name=str(name_or_path), config=config, params=params, pooling=pooling,
               preprocessing=preprocessing, dtype=dtype, layers=layers, revision=revision)

  def _run(self, params: Any, pixels: jnp.ndarray, num_layers: int,
           collect: bool) -> dict[str, jnp.ndarray]:
    module = vit.VisionTransformer(self.config, self.grid, num_layers, collect=collect,
                                   dtype=self.dtype)
    return module.apply({"params": vit.slice_layers(params, num_layers)},
                        jnp.asarray(pixels, self.dtype))

  def _layer_tokens(self, out: dict[str, jnp.ndarray], ran: int) -> list[jnp.ndarray]:
    """Layers 0..ran: raw hidden states, the final output (normed) in place of layer N."""
    hidden = [out["hidden"][k] for k in range(ran + 1)]
    if ran == self.num_layers:
      hidden[-1] = out["final"]
    return hidden

  def apply(self, params: Any, inputs: dict[str, Any]) -> dict[str, jnp.ndarray]:
    """Features of normalised NHWC pixels; pure and jit-able.

    Args:
      params: the frozen params (``self.params`` or a sharded copy).
      inputs: ``{"pixel_values": float32 [B, image_size, image_size, 3]}``.

    Returns:
      ``{"pooled": float32 [B, output_dim]}``, or for "tokens" ``{"tokens": [B, T, D], "mask":
      bool [B, T]}`` (class and register tokens first, mask all True).
    """
    pixels = inputs["pixel_values"]
    if pixels.ndim != 4 or tuple(pixels.shape[1:3]) != (self.image_size, self.image_size):
      raise ValueError(f"pixel_values must be [B, {self.image_size}, {self.image_size}, 3] (NHWC), "
                       f"got {tuple(pixels.shape)}: load the encoder with image_size=... to match")
    ran = max(self.layers)
    if self.pooling == "map":
      return {"pooled": self._run(params, pixels, ran, False)["map"].astype(jnp.float32)}
    if len(self.layers) == 1:
      out = self._run(params, pixels, ran, False)
      tokens = out["final"] if ran == self.num_layers else out["last"]
    else:
      tokens = layers_lib.combine(self._layer_tokens(self._run(params, pixels, ran, True), ran),
                                  self.layers)
    return pooling_lib.pool_image(tokens, self.pooling, self.config.num_prefix_tokens)

  def apply_all_layers(self, params: Any, inputs: dict[str, Any]) -> jnp.ndarray:
    """Pooled features of every layer's output (embeddings first): float32 [layers + 1, B, D].

    Intermediate layers are pooled without the final LayerNorm, the last one exactly as
    ``apply`` pools it; ``pooling`` "tokens" and "map" pool by mean over patches. For choosing
    which layer to align (RECIPES §5, STRUCTURE).
    """
    out = self._run(params, inputs["pixel_values"], self.num_layers, True)
    pooling = "mean" if self.pooling in ("tokens", "map") else self.pooling
    return jnp.stack([pooling_lib.pool_image(h, pooling, self.config.num_prefix_tokens)["pooled"]
                      for h in self._layer_tokens(out, self.num_layers)])

  def preprocess(self, images: Sequence[Any] | np.ndarray) -> dict[str, np.ndarray]:
    """PIL images or uint8 [N, H, W, 3] -> ``{"pixel_values": float32 [N, S, S, 3]}`` (HF's)."""
    return {"pixel_values": self.preprocessing(images)}

  def encode(self, images: Sequence[Any] | np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pooled features (or tokens, for "tokens") of raw images, in batches of ``batch_size``.

    The last batch is zero-padded to ``batch_size`` so the jitted forward compiles once.
    """
    outputs = []
    for start in range(0, len(images), batch_size):
      pixels = self.preprocess(images[start:start + batch_size])["pixel_values"]
      count = pixels.shape[0]
      pixels = np.pad(pixels, [(0, batch_size - count)] + [(0, 0)] * 3)
      out = self._jit_apply(self.params, {"pixel_values": pixels})
      outputs.append(np.asarray(out["pooled" if "pooled" in out else "tokens"])[:count])
    if not outputs:
      raise ValueError("encode got no images")
    return np.concatenate(outputs)
