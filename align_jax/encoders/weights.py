"""Checkpoint files -> host numpy arrays -> align_jax's Flax param trees, with no transformers model.

A Hugging Face checkpoint folder holds ``config.json`` and its weights as one ``model.safetensors``,
as shards named by ``model.safetensors.index.json``, or (older Flax uploads) ``flax_model.msgpack``.
:func:`read_state_dict` returns every tensor as ``{PyTorch name: numpy array}``: safetensors files
are parsed here (an 8-byte header length, a JSON header, raw little-endian bytes) and memory-mapped,
so a 7B checkpoint is read lazily and bfloat16 tensors come back as ``ml_dtypes.bfloat16``; Flax
msgpack names (``a/b/kernel``) are turned into the PyTorch names the same model saves
(``a.b.weight``, kernels transposed back), so one name table per family serves both formats.

A family's name table is a list of :class:`Rule`: a PyTorch name (with ``{i}`` for the layer index),
the Flax param path it fills, and how the array changes (a Linear weight is transposed, a Conv
weight goes OIHW -> HWIO, ...). :func:`to_flax` applies it: per-layer tensors are stacked on a
leading axis (the scanned layers' params), and every param the module declares (``expected``, its
abstract tree) must be found with the right shape. :func:`from_flax` is the reverse, used to write
checkpoints from Flax params (the tiny test and demo checkpoints) that transformers reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Iterable

import numpy as np

SINGLE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _numpy_dtype(name: str) -> np.dtype:
  """numpy dtype of a safetensors dtype name (bfloat16 / float8 through ml_dtypes)."""
  if name in _DTYPES:
    return np.dtype(_DTYPES[name])
  import ml_dtypes
  extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
           "F8_E5M2": ml_dtypes.float8_e5m2}
  if name not in extra:
    raise ValueError(f"unsupported safetensors dtype {name}")
  return np.dtype(extra[name])


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file as a read-only memory-mapped numpy array."""
  with open(path, "rb") as f:
    header_len = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(header_len))
  base = 8 + header_len
  raw = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    dtype = _numpy_dtype(info["dtype"])
    out[name] = raw[base + start:base + end].view(dtype).reshape(info["shape"])
  return out


def write_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
  """Writes numpy arrays as one safetensors file (via the safetensors library), as transformers."""
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
            metadata={"format": "pt"})


def _shard_paths(folder: str) -> list[str]:
  """The shard files ``model.safetensors.index.json`` names; ValueError on a missing one."""
  index = os.path.join(folder, SHARD_INDEX)
  with open(index, encoding="utf-8") as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index} has no weight_map: is it a safetensors index?")
  paths = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"{folder}: shard {os.path.basename(path)} listed in {SHARD_INDEX} is "
                       "missing; download the whole folder (`hf download REPO --local-dir DIR`)")
  return paths


def weight_files(folder: str) -> list[str]:
  """The folder's weight files in the format it will be read in; ValueError when it has none."""
  files = set(os.listdir(folder))
  if SINGLE in files:
    return [os.path.join(folder, SINGLE)]
  if SHARD_INDEX in files:
    return _shard_paths(folder)
  if FLAX_MSGPACK in files:
    return [os.path.join(folder, FLAX_MSGPACK)]
  if "pytorch_model.bin" in files:
    raise ValueError(
      f"{folder} holds only pytorch_model.bin, a pickle file, which align_jax does not load "
      "(unpickling can run code). Convert it once on a machine you trust: `transformers."
      "AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`, or use the "
      "hub revision that ships model.safetensors")
  raise ValueError(f"{folder} has no weights: expected {SINGLE}, {SHARD_INDEX} + shards, or "
                   f"{FLAX_MSGPACK}")


def flax_name_to_torch(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
  """A ``flax_model.msgpack`` param (path, array) as the PyTorch model's (name, array).

  Those files were written by transformers' Flax classes (removed in transformers 5), whose
  module names mirror PyTorch's; only the leaf differs: Dense ``kernel`` [in, out] is
  Linear ``weight`` [out, in], Conv ``kernel`` HWIO is ``weight`` OIHW, LayerNorm ``scale`` and
  Embed ``embedding`` are ``weight``.
  """
  *parents, leaf = path
  if leaf == "kernel":
    value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
    leaf = "weight"
  elif leaf in ("scale", "embedding"):
    leaf = "weight"
  return ".".join([*parents, leaf]), value


def _read_msgpack(path: str) -> dict[str, np.ndarray]:
  """A Flax msgpack checkpoint as ``{PyTorch name: array}`` (see :func:`flax_name_to_torch`)."""
  from flax import serialization
  from flax import traverse_util
  with open(path, "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  out = {}
  for key, value in traverse_util.flatten_dict(tree).items():
    name, array = flax_name_to_torch(tuple(str(k) for k in key), np.asarray(value))
    out[name] = array
  return out


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder as ``{PyTorch name: numpy array}`` (lazily mapped)."""
  out: dict[str, np.ndarray] = {}
  for path in weight_files(folder):
    out.update(_read_msgpack(path) if path.endswith(FLAX_MSGPACK) else read_safetensors(path))
  return out


def read_config(folder: str) -> dict[str, Any]:
  """The folder's ``config.json`` as a dict; ValueError when it has none."""
  config_file = os.path.join(folder, "config.json")
  if not os.path.isfile(config_file):
    raise ValueError(f"{folder} has no config.json: pass the folder of a Hugging Face checkpoint "
                     "(the one holding config.json and the weights)")
  with open(config_file, encoding="utf-8") as f:
    return json.load(f)


# How an array changes between PyTorch and Flax (forward; from_flax applies the inverse).
_KINDS = ("copy", "linear", "conv")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One entry of a family's name table.

  Attributes:
    torch: the PyTorch state-dict name, ``{i}`` standing for the layer index (a per-layer param:
      stacked over layers on axis 0 in Flax).
    flax: the param's path in the Flax tree.
    kind: "copy", "linear" (transpose [out, in] -> [in, out]) or "conv" (OIHW -> HWIO).
    chunk: ``(j, n)``: the param is the j-th of n equal row blocks of the PyTorch tensor (a fused
      q/k/v projection such as ``nn.MultiheadAttention.in_proj_weight``).
    unsqueeze: leading unit axes the Flax param has in addition (CLIP's [D] class embedding is a
      [1, 1, D] param here, as every family's class token).
  """
  torch: str
  flax: tuple[str, ...]
  kind: str = "copy"
  chunk: tuple[int, int] | None = None
  unsqueeze: int = 0

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"unknown rule kind {self.kind!r}; valid: {', '.join(_KINDS)}")

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.torch

  def forward(self, value: np.ndarray) -> np.ndarray:
    """PyTorch array -> Flax array."""
    if self.chunk is not None:
      value = np.split(value, self.chunk[1], axis=0)[self.chunk[0]]
    if self.kind == "linear":
      value = value.T
    elif self.kind == "conv":
      value = np.transpose(value, (2, 3, 1, 0))
    return value.reshape((1,) * self.unsqueeze + value.shape)

  def backward(self, value: np.ndarray) -> np.ndarray:
    """Flax array -> PyTorch array (one chunk of it when ``chunk`` is set)."""
    value = value.reshape(value.shape[self.unsqueeze:])
    if self.kind == "linear":
      value = value.T
    elif self.kind == "conv":
      value = np.transpose(value, (3, 2, 0, 1))
    return value


def linear(torch: str, flax: tuple[str, ...], bias: bool = True, **kw: Any) -> list[Rule]:
  """Rules of one ``nn.Linear``: ``weight`` -> ``kernel`` (transposed) and ``bias``."""
  rules = [Rule(f"{torch}.weight", flax + ("kernel",), "linear", **kw)]
  return rules + ([Rule(f"{torch}.bias", flax + ("bias",), **kw)] if bias else [])


def norm(torch: str, flax: tuple[str, ...], bias: bool = True) -> list[Rule]:
  """Rules of one LayerNorm / RMSNorm: ``weight`` -> ``scale`` (and ``bias``)."""
  rules = [Rule(f"{torch}.weight", flax + ("scale",))]
  return rules + ([Rule(f"{torch}.bias", flax + ("bias",))] if bias else [])


def _flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def find_prefix(state: dict[str, np.ndarray], rules: Iterable[Rule], num_layers: int) -> str:
  """The prefix the checkpoint puts before the table's names ("" or e.g. "dinov2.", "model.").

  Task models (``...ForImageClassification``, ``...ForCausalLM``) save their base model under a
  prefix; the first rule's name found as a suffix of a checkpoint name gives it.
  """
  for rule in rules:
    name = rule.torch.format(i=0) if rule.per_layer else rule.torch
    if name in state:
      return ""
    for key in state:
      if key.endswith("." + name):
        return key[:-len(name)]
  return ""


def to_flax(state: dict[str, np.ndarray], rules: list[Rule], num_layers: int,
            expected: dict[str, Any], dtype: Any = None, prefix: str | None = None) -> dict[str, Any]:
  """Builds the Flax param tree ``expected`` describes from a PyTorch-named state dict.

  Args:
    state: ``{PyTorch name: array}`` (:func:`read_state_dict`).
    rules: the family's name table.
    num_layers: layers in the checkpoint; per-layer params are stacked over ``range(num_layers)``.
    expected: the module's abstract param tree (``jax.eval_shape`` of its init); rules for params
      it lacks (a bias the config turns off) are skipped, and each of its params must be filled
      with its exact shape.
    dtype: cast floating arrays to this dtype (e.g. ``ml_dtypes.bfloat16``); None keeps float32
      for float checkpoints (bf16 checkpoints are upcast to float32).
    prefix: the checkpoint's name prefix (found with :func:`find_prefix` when None).

  Returns:
    nested dict of host numpy arrays.
  """
  want = _flatten(expected)
  if prefix is None:
    prefix = find_prefix(state, rules, num_layers)
  out: dict[tuple[str, ...], np.ndarray] = {}
  for rule in rules:
    if rule.flax not in want:
      continue

    def fetch(name: str) -> np.ndarray:
      if prefix + name not in state:
        raise ValueError(f"checkpoint is missing weight {prefix + name} (for {'/'.join(rule.flax)}"
                         "): is it the right model family?")
      return rule.forward(np.asarray(state[prefix + name]))
    if rule.per_layer:
      value = np.stack([fetch(rule.torch.format(i=i)) for i in range(num_layers)])
    else:
      value = fetch(rule.torch)
    shape = tuple(want[rule.flax].shape)
    if value.shape != shape:
      raise ValueError(f"checkpoint weight {prefix + rule.torch} gives {'/'.join(rule.flax)} shape "
                       f"{value.shape}, expected {shape}: config.json and weights disagree")
    out[rule.flax] = _cast(value, dtype)
  missing = sorted("/".join(p) for p in want if p not in out)
  if missing:
    raise ValueError(f"no name-table entry fills params {missing[:5]}: family table incomplete")
  return _unflatten(out)


def _cast(value: np.ndarray, dtype: Any) -> np.ndarray:
  """Floats to ``dtype`` (float32 when None); integer arrays unchanged."""
  if value.dtype.kind not in "fV" and value.dtype.name not in ("bfloat16",):
    return value
  return np.asarray(value, np.float32 if dtype is None else dtype)


def from_flax(params: dict[str, Any], rules: list[Rule], num_layers: int,
              prefix: str = "") -> dict[str, np.ndarray]:
  """The PyTorch-named state dict of a Flax param tree (inverse of :func:`to_flax`), float32."""
  flat = _flatten(params)
  chunks: dict[str, dict[int, np.ndarray]] = {}
  out: dict[str, np.ndarray] = {}
  for rule in rules:
    if rule.flax not in flat:
      continue
    value = np.asarray(flat[rule.flax], np.float32)
    items = ([(rule.torch.format(i=i), value[i]) for i in range(num_layers)] if rule.per_layer
             else [(rule.torch, value)])
    for name, array in items:
      array = rule.backward(array)
      if rule.chunk is None:
        out[prefix + name] = np.ascontiguousarray(array)
      else:
        chunks.setdefault(prefix + name, {})[rule.chunk[0]] = array
  for name, parts in chunks.items():
    out[name] = np.ascontiguousarray(np.concatenate([parts[j] for j in sorted(parts)], axis=0))
  return out
