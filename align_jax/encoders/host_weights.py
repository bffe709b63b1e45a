"""Loading multi-billion-parameter checkpoints without putting them whole on one accelerator.

A 7B text encoder in bfloat16 is ~14.5 GB: more than a v5e chip's HBM once activations are added.
The train step shards the frozen params with ``config.mesh.frozen_param_rules``, so the weights
must reach ``jax.device_put`` from *host* memory. transformers' safetensors reader creates
``jax.Array``s on the default device, so here it runs with the host CPU as the default device, and
the params are kept as numpy arrays (``ml_dtypes`` bfloat16 when asked), never committed to an
accelerator. Hub checkpoints of this size ship *sharded* safetensors
(``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors``), which transformers' Flax
loader cannot read (its sharded path is ``torch.load``); :func:`load_params` converts each shard
with transformers' own PyTorch-to-Flax renaming, so no torch is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.encoders import hub

SHARD_INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def on_host() -> Iterator[None]:
  """Makes the host CPU the default JAX device for the block (a no-op without a CPU backend)."""
  try:
    cpu = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes cpu
    yield
    return
  with jax.default_device(cpu):
    yield


def is_sharded(folder: str) -> bool:
  """True for a folder whose only weights are sharded safetensors."""
  files = set(os.listdir(folder))
  single = {"model.safetensors", "flax_model.msgpack", "flax_model.msgpack.index.json"}
  return SHARD_INDEX in files and not files & single


def _shard_files(folder: str) -> list[str]:
  """The shard paths the index names; ValueError naming the first missing one."""
  with open(os.path.join(folder, SHARD_INDEX), encoding="utf-8") as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{os.path.join(folder, SHARD_INDEX)} has no weight_map: is it a "
                     "safetensors index?")
  paths = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"{folder}: shard {os.path.basename(path)} listed in {SHARD_INDEX} is "
                       "missing; download the whole folder (`huggingface-cli download REPO "
                       "--local-dir DIR`)")
  return paths


def _load_sharded(flax_class: Any, folder: str, expected: dict[str, Any]) -> dict[str, Any]:
  """Every shard converted by transformers' PyTorch-to-Flax renaming, merged, as numpy."""
  from flax import traverse_util
  from safetensors import safe_open
  from transformers import modeling_flax_pytorch_utils as pt_utils
  shim = types.SimpleNamespace(params=expected, base_model_prefix=flax_class.base_model_prefix)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for path in _shard_files(folder):
    with safe_open(path, framework="flax") as f:
      state = {key: f.get_tensor(key) for key in f.keys()}
    with hub.quiet_transformers():
      converted = pt_utils.convert_pytorch_state_dict_to_flax(state, shim)
    del state
    flat.update({k: np.asarray(v) for k, v in traverse_util.flatten_dict(converted).items()})
  return traverse_util.unflatten_dict(flat)


def load_params(flax_class: Any, folder: str, config: Any, expected: dict[str, Any],
                dtype: Any) -> dict[str, Any]:
  """The folder's weights as host numpy arrays shaped like ``expected``, floats in ``dtype``.

  Reads Flax msgpack, one PyTorch safetensors file (as :func:`hub.load_flax_params`) or sharded
  safetensors, all with the CPU as JAX's default device; nothing is placed on an accelerator.
  """
  with on_host():
    if is_sharded(folder):
      params = hub.select_like(_load_sharded(flax_class, folder, expected), expected)
    else:
      params = hub.load_flax_params(flax_class, folder, config, expected)

  def cast(x: np.ndarray) -> np.ndarray:  # jnp.issubdtype: bfloat16 checkpoints count as floats
    return np.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x)
  return jax.tree.map(cast, params)
