"""Frozen image encoders (DINOv2, ViT, CLIP vision tower) from Hugging Face Flax models.

``ImageEncoder.apply(params, {"pixel_values": [B, H, W, 3]})`` is a pure function of its frozen
params, so the train step can call it inside ``jax.jit`` on sharded batches; ``encode`` is the
user-facing path (preprocess + jitted apply, fixed batch shape so it compiles once).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import interfaces
from align_jax.encoders import hub
from align_jax.encoders import image_processing
from align_jax.encoders import layers as layers_lib
from align_jax.encoders import pooling as pooling_lib
from align_jax.encoders import pos_embed

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


def _dinov2_processor() -> Any:
  """The processor every facebook/dinov2-* checkpoint ships (resize 256, crop 224, ImageNet)."""
  import transformers
  return transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size=224, resample=3,
                                        image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD)


def _default_processor(name: str) -> Callable[[], Any]:
  def make() -> Any:
    import transformers
    return getattr(transformers, name)()
  return make


@dataclasses.dataclass(frozen=True)
class ImageFamily:
  """How to run one model family.

  Attributes:
    flax_class: transformers Flax model class name.
    config_class: transformers config class (for CLIP, the vision sub-config of a full checkpoint).
    pos_embed_path: where the position embeddings sit in the params (CLS first, then the grid).
    has_pooler: the module takes ``add_pooling_layer`` (the pooler is left out; it is not a feature).
    post_layernorm_path: a LayerNorm applied to every token after the module (CLIP's vision tower
      applies its final LayerNorm to the CLS token only; here all tokens get it, as in DINOv2).
    default_processor: processor used when the folder has no preprocessor_config.json.
  """
  flax_class: str
  config_class: str
  pos_embed_path: tuple[str, ...]
  has_pooler: bool
  post_layernorm_path: tuple[str, ...] | None
  default_processor: Callable[[], Any]


_CLIP_VISION = ImageFamily("FlaxCLIPVisionModel", "CLIPVisionConfig",
                           ("vision_model", "embeddings", "position_embedding", "embedding"),
                           False, ("vision_model", "post_layernorm"),
                           _default_processor("CLIPImageProcessor"))
IMAGE_FAMILIES: dict[str, ImageFamily] = {
  "dinov2": ImageFamily("FlaxDinov2Model", "Dinov2Config", ("embeddings", "position_embeddings"),
                        False, None, _dinov2_processor),
  "vit": ImageFamily("FlaxViTModel", "ViTConfig", ("embeddings", "position_embeddings"), True,
                     None, _default_processor("ViTImageProcessor")),
  "clip": _CLIP_VISION,
  "clip_vision_model": _CLIP_VISION,
}


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


def _abstract_params(module: Any, config: Any) -> dict[str, Any]:
  """Shapes of the module's params at ``config.image_size``, traced without computing anything."""
  size = int(config.image_size)
  dummy = jax.ShapeDtypeStruct((1, size, size, int(config.num_channels)), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), dummy)["params"]


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _undo_flax_layerscale(params: dict[str, Any], value: float) -> None:
  """Divides DINOv2 layer-scale weights by ``layerscale_value ** 2``, in place.

  transformers' FlaxDinov2LayerScale multiplies its stored ``lambda1`` by ``layerscale_value``
  twice, where PyTorch uses the stored weight as is. Real checkpoints have ``layerscale_value`` 1.0,
  so this only matters for other configs, but then every layer would be off.
  """
  if value == 1.0:
    return
  for layer in params["encoder"]["layer"].values():
    for name in ("layer_scale1", "layer_scale2"):
      layer[name]["lambda1"] = np.asarray(layer[name]["lambda1"]) / np.float32(value * value)


def layer_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, eps: float) -> jnp.ndarray:
  """LayerNorm over the last axis in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(
    jnp.float32)


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
    preprocessing: the checkpoint's HF image processor at ``image_size``
      (:class:`align_jax.encoders.image_processing.ImageProcessor`).
    num_tokens: tokens per image (CLS + patches).
    layers: the layer indices ``apply`` pools (see :mod:`align_jax.encoders.layers`); ``(N,)``,
      the final output, by default.
    input_kind: ``interfaces.RAW``: it reads images (a ``interfaces.RawInputEncoder``).
  """

  input_kind = interfaces.RAW

  def __init__(self, *, name: str, family: ImageFamily, module: Any, params: Any, config: Any,
               pooling: str, preprocessing: image_processing.ImageProcessor,
               dtype: jnp.dtype, layers: tuple[int, ...] | None = None):
    self.name = name
    self.family = family
    self.module = module
    self.params = params
    self.config = config
    self.pooling = pooling
    self.preprocessing = preprocessing
    self.dtype = dtype
    self.image_size = preprocessing.image_size
    self.mean = preprocessing.mean
    self.std = preprocessing.std
    self.num_tokens = 1 + (self.image_size // config.patch_size) ** 2
    width = int(config.hidden_size)
    self.output_dim = 2 * width if pooling == "cls+mean_patch" else width
    self.num_layers = int(config.num_hidden_layers)
    self.layers = (self.num_layers,) if layers is None else tuple(layers)
    self._jit_apply = jax.jit(self.apply)

  @classmethod
  def from_pretrained(cls, name_or_path: str, pooling: str = "cls", image_size: int | None = None,
                      dtype: str = "float32", layer: Any = layers_lib.FINAL,
                      abstract: bool = False) -> "ImageEncoder":
    """Loads a checkpoint (local folder or hub id) as a frozen Flax encoder.

    Args:
      name_or_path: folder with config.json and weights (Flax msgpack or one PyTorch safetensors),
        or a hub id (from the local cache when offline).
      pooling: "cls", "mean" (patch tokens), "cls+mean_patch" or "tokens".
      image_size: square input size; defaults to the processor's output (224 for DINOv2). At a
        patch grid other than the checkpoint's, position embeddings are resampled once, exactly as
        PyTorch does at run time.
      dtype: compute (and frozen-param) dtype, e.g. "bfloat16"; outputs are always float32.
      layer: which layer's tokens are pooled, or a list of layers to average (see
        :mod:`align_jax.encoders.layers`): -1 (default) is the final output after the family's
        final LayerNorm, as always; other indices are HF's raw ``hidden_states[k]``.
      abstract: ``params`` are ``jax.ShapeDtypeStruct``s, the shapes and dtypes loading would give
        (position embeddings at the resampled grid), from ``config.json`` alone: no weights file is
        needed or read. For ahead-of-time compiles (align_jax.aot); ``apply`` needs real params.
    """
    pooling_lib.check_pooling(pooling, pooling_lib.IMAGE_POOLINGS, "image")
    dtype = compute_dtype(dtype)
    folder, model_type, family = hub.resolve_family(name_or_path, IMAGE_FAMILIES, "image",
                                                    "--config.model.image_encoder",
                                                    weights=not abstract)
    import transformers
    with hub.quiet_transformers():
      config = getattr(transformers, family.config_class).from_pretrained(folder)
      processor = image_processing.load_image_processor(folder, family.default_processor)
    layers = layers_lib.parse_layers(layer, int(config.num_hidden_layers),
                                     "--config.model.image_layer")
    preprocessing = image_processing.ImageProcessor(processor, image_size,
                                                    default_size=int(config.image_size))
    image_size = preprocessing.image_size
    if image_size < config.patch_size:
      raise ValueError(f"image_size {image_size} is smaller than the patch size {config.patch_size}")
    flax_class = getattr(transformers, family.flax_class)
    kwargs = {"add_pooling_layer": False} if family.has_pooler else {}
    module = flax_class.module_class(config=config, dtype=dtype, **kwargs)
    old_grid = int(config.image_size) // int(config.patch_size)
    new_grid = image_size // int(config.patch_size)
    run_config, run_module = config, module
    if new_grid != old_grid:
      run_config = copy.deepcopy(config)
      run_config.image_size = image_size  # The module sizes its position table from this.
      run_module = flax_class.module_class(config=run_config, dtype=dtype, **kwargs)

    if abstract:
      params = _abstract_params(run_module, run_config)
    else:
      params = hub.load_flax_params(flax_class, folder, config, _abstract_params(module, config))
      if model_type == "dinov2":
        _undo_flax_layerscale(params, float(config.layerscale_value))
      if new_grid != old_grid:
        pos = _get(params, family.pos_embed_path)
        _set(params, family.pos_embed_path,
             pos_embed.resample_position_embeddings(pos, (new_grid, new_grid)))
        params = hub.select_like(params, _abstract_params(run_module, run_config))
    params = cast_params(params, dtype)
    return cls(name=str(name_or_path), family=family, module=run_module, params=params,
               config=run_config, pooling=pooling, preprocessing=preprocessing, dtype=dtype,
               layers=layers)

  def apply(self, params: Any, inputs: dict[str, Any]) -> dict[str, jnp.ndarray]:
    """Features of normalised NHWC pixels; pure and jit-able.

    Args:
      params: the frozen params (``self.params`` or a sharded copy).
      inputs: ``{"pixel_values": float32 [B, image_size, image_size, 3]}``.

    Returns:
      ``{"pooled": float32 [B, output_dim]}``, or for "tokens" ``{"tokens": [B, T, D], "mask":
      bool [B, T]}`` (CLS first, mask all True).
    """
    pixels = inputs["pixel_values"]
    if pixels.ndim != 4 or tuple(pixels.shape[1:3]) != (self.image_size, self.image_size):
      raise ValueError(f"pixel_values must be [B, {self.image_size}, {self.image_size}, 3] (NHWC), "
                       f"got {tuple(pixels.shape)}: load the encoder with image_size=... to match")
    if layers_lib.is_final(self.layers, self.num_layers):
      out = self.module.apply({"params": params}, jnp.asarray(pixels, self.dtype),
                              deterministic=True)
      return pooling_lib.pool_image(self._final_tokens(params, out.last_hidden_state),
                                    self.pooling)
    out = self.module.apply({"params": params}, jnp.asarray(pixels, self.dtype),
                            deterministic=True, output_hidden_states=True)
    return pooling_lib.pool_image(layers_lib.combine(self._layer_tokens(params, out), self.layers),
                                  self.pooling)

  def apply_all_layers(self, params: Any, inputs: dict[str, Any]) -> jnp.ndarray:
    """Pooled features of every layer's output (embeddings first): float32 [layers + 1, B, D].

    Intermediate layers are pooled without the final LayerNorm, the last one exactly as
    ``apply`` pools it; ``pooling`` "tokens" pools by mean over patches. For choosing which layer
    to align (RECIPES §5, STRUCTURE).
    """
    pixels = jnp.asarray(inputs["pixel_values"], self.dtype)
    out = self.module.apply({"params": params}, pixels, deterministic=True,
                            output_hidden_states=True)
    pooling = "mean" if self.pooling == "tokens" else self.pooling
    return jnp.stack([pooling_lib.pool_image(h, pooling)["pooled"]
                      for h in self._layer_tokens(params, out)])

  def _layer_tokens(self, params: Any, out: Any) -> list[jnp.ndarray]:
    """Layers 0..N (:mod:`align_jax.encoders.layers`): raw hidden states, then the final tokens."""
    return list(out.hidden_states[:-1]) + [self._final_tokens(params, out.last_hidden_state)]

  def _final_tokens(self, params: Any, tokens: jnp.ndarray) -> jnp.ndarray:
    """The last layer's tokens after the family's final LayerNorm (CLIP applies it to all)."""
    if self.family.post_layernorm_path is not None:
      norm = _get(params, self.family.post_layernorm_path)
      tokens = layer_norm(tokens, norm["scale"], norm["bias"], self.config.layer_norm_eps)
    return tokens

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
