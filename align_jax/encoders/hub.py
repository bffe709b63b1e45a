"""Finding a checkpoint (local folder or hub id) and loading its weights into Flax, offline-safe.

A name is first taken as a local folder; otherwise as a Hugging Face hub id, resolved through
``huggingface_hub.snapshot_download`` (the local cache only when ``HF_HUB_OFFLINE=1``). When neither
gives a folder, ``EncoderNotFoundError`` says, in one line, how to point the config at a local copy.
Weights are read from ``flax_model.msgpack`` when present, else from a single PyTorch
``model.safetensors`` (converted by transformers without torch); ``pytorch_model.bin`` (a pickle) is
refused. With ``weights=False`` only the config and tokenizer/processor files are needed (the
encoders' ``abstract=True`` path, for ahead-of-time compiles).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import types
from typing import Any, Iterator

import jax
import numpy as np

# Config, tokenizer and processor files; weights are fetched in the order below, stopping at the
# first format the repo has, so a repo with several formats is downloaded once (TF, ONNX never).
_CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]
# Sharded safetensors (multi-GB LLMs) are read by align_jax.encoders.host_weights.
_WEIGHT_PATTERNS = (["model.safetensors"], ["model-*-of-*.safetensors"], ["flax_model.msgpack*"],
                    ["pytorch_model.bin"])
_WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "flax_model.msgpack",
                 "flax_model.msgpack.index.json", "pytorch_model.bin")


class EncoderNotFoundError(OSError):
  """The named encoder is neither a local folder nor reachable on (or cached from) the hub."""


def resolve_checkpoint(name_or_path: str, config_flag: str = "--config.model.image_encoder",
                       weights: bool = True) -> str:
  """Returns a local folder holding the checkpoint ``name_or_path``.

  Args:
    name_or_path: a local folder, or a hub id such as ``facebook/dinov2-large``.
    config_flag: the config override shown in the error message, so the fix names the right flag.
    weights: also fetch the weights of a hub id (False: config and tokenizer/processor files only).

  Raises:
    EncoderNotFoundError: no such folder, and the hub id is not cached and cannot be downloaded.
  """
  path = os.path.expanduser(str(name_or_path))
  if os.path.isdir(path):
    return path
  fix = (f"point the config at a local copy ({config_flag}=/path/to/folder), made on a machine with "
         f"internet by `huggingface-cli download {name_or_path} --local-dir /path/to/folder`")
  if path.startswith((os.sep, ".", "~")) or os.path.exists(path):
    raise EncoderNotFoundError(f"Encoder {name_or_path!r} not found: no such folder; {fix}.")
  try:
    import huggingface_hub  # Imported here: local folders never need it.
    for patterns in _WEIGHT_PATTERNS if weights else ([],):
      folder = huggingface_hub.snapshot_download(repo_id=str(name_or_path),
                                                 allow_patterns=_CONFIG_PATTERNS + patterns)
      if not weights or any(glob.glob(os.path.join(glob.escape(folder), f)) for f in _WEIGHT_FILES):
        break
    return folder
  except Exception as e:  # Offline cache miss, unknown repo, invalid id, network error, ...
    raise EncoderNotFoundError(
      f"Encoder {name_or_path!r} not found: not a local folder and not in the Hugging Face cache "
      f"(offline or unreachable hub: {type(e).__name__}); {fix}.") from e


def resolve_with_revision(name_or_path: str, config_flag: str = "--config.model.image_encoder",
                          weights: bool = True) -> tuple[str, str | None]:
  """(local folder, hub revision) of ``name_or_path``: the commit a hub id resolved to, else None.

  ``snapshot_download`` returns ``.../snapshots/<commit>``, so the revision is the folder's name;
  a local folder (not in the hub cache layout) has none. Recorded with the features (config.json,
  the feature store's fingerprint) so a moved ``main`` branch is noticed.
  """
  path = os.path.expanduser(str(name_or_path))
  folder = resolve_checkpoint(name_or_path, config_flag, weights)
  if os.path.isdir(path):
    return folder, None
  parent = os.path.basename(os.path.dirname(os.path.normpath(folder)))
  commit = os.path.basename(os.path.normpath(folder))
  return folder, commit if parent == "snapshots" else None


def resolve_family(name_or_path: str, families: dict[str, Any], kind: str,
                   config_flag: str, weights: bool = True) -> tuple[str, str, Any]:
  """(folder, model_type, family) of a checkpoint; ValueError for a family align_jax lacks."""
  folder = resolve_checkpoint(name_or_path, config_flag, weights)
  model_type = read_config_dict(folder).get("model_type")
  if model_type not in families:
    raise ValueError(f"{name_or_path}: unsupported {kind} encoder family {model_type!r}; "
                     f"valid: {', '.join(families)}")
  return folder, model_type, families[model_type]


def read_config_dict(folder: str) -> dict[str, Any]:
  """The folder's ``config.json`` as a dict; ValueError when it has none."""
  config_file = os.path.join(folder, "config.json")
  if not os.path.isfile(config_file):
    raise ValueError(f"{folder} has no config.json: pass the folder of a Hugging Face checkpoint "
                     "(the one holding config.json and the weights)")
  with open(config_file, encoding="utf-8") as f:
    return json.load(f)


def weights_from_pt(folder: str) -> bool:
  """True when the folder's weights are PyTorch (converted on load), False for Flax msgpack."""
  files = set(os.listdir(folder))
  if "flax_model.msgpack" in files or "flax_model.msgpack.index.json" in files:
    return False
  if "model.safetensors" in files:
    return True
  if "pytorch_model.bin" in files:
    raise ValueError(
      f"{folder} holds only pytorch_model.bin, a pickle file, which align_jax does not load "
      "(unpickling can run code). Convert it once on a machine you trust: `transformers."
      "AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`, or use the "
      "hub revision that ships model.safetensors")
  if "model.safetensors.index.json" in files:
    raise ValueError(
      f"{folder} holds sharded safetensors, which transformers' Flax loader cannot read: save the "
      "model once as a single file (PyTorch `save_pretrained(dir, max_shard_size='100GB')`) or in "
      "Flax (`FlaxAutoModel.from_pretrained(dir, from_pt=True).save_pretrained(out)`)")
  raise ValueError(f"{folder} has no weights: expected flax_model.msgpack or model.safetensors")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
  """Silences transformers' info/warning logs (unused-weight lists, Flax deprecation) for a block."""
  from transformers.utils import logging as hf_logging
  level = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()
  try:
    yield
  finally:
    hf_logging.set_verbosity(level)


def load_flax_params(flax_class: Any, folder: str, config: Any,
                     expected: dict[str, Any]) -> dict[str, Any]:
  """Loads the folder's weights as a numpy pytree shaped like ``expected``.

  Args:
    flax_class: the transformers Flax model class (its ``base_model_prefix`` guides the renaming).
    folder: checkpoint folder.
    config: the checkpoint's config.
    expected: the module's abstract param tree (``jax.eval_shape`` of its init), which the result
      is checked against and restricted to.

  PyTorch weights are renamed and transposed by transformers' converter against the abstract tree
  directly, so no random Flax model is initialised (that compile costs minutes for a large model).
  """
  if weights_from_pt(folder):
    from transformers import modeling_flax_pytorch_utils as pt_utils
    name = "model.safetensors"
    shim = types.SimpleNamespace(params=expected, base_model_prefix=flax_class.base_model_prefix)
    with quiet_transformers():
      params = pt_utils.load_pytorch_checkpoint_in_flax_state_dict(
        shim, os.path.join(folder, name), is_sharded=False)
  else:
    with quiet_transformers():
      _, params = flax_class.from_pretrained(folder, config=config, _do_init=False)
  return select_like(jax.tree.map(np.asarray, params), expected)


def select_like(params: dict[str, Any], expected: dict[str, Any], path: str = "") -> dict[str, Any]:
  """Keeps the entries of ``params`` that ``expected`` (an abstract param tree) names; checks shapes.

  Drops what the module does not use (a full CLIP checkpoint's other tower, BERT's pooler) and fails
  clearly on a missing or mis-shaped weight instead of silently using random values.
  """
  out = {}
  for key, want in expected.items():
    where = f"{path}/{key}"
    if key not in params:
      raise ValueError(f"checkpoint is missing weight {where}: is it the right model family?")
    if isinstance(want, dict):
      out[key] = select_like(params[key], want, where)
    else:
      got = np.asarray(params[key])
      if got.shape != tuple(want.shape):
        raise ValueError(f"checkpoint weight {where} has shape {got.shape}, expected {want.shape}")
      out[key] = got
  return out
