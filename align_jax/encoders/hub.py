"""Finding a checkpoint (local folder or hub id), offline-safe, and the hub revision it resolved to.

A name is first taken as a local folder; otherwise as a Hugging Face hub id, resolved through
``huggingface_hub.snapshot_download`` (the local cache only when ``HF_HUB_OFFLINE=1``). When neither
gives a folder, ``EncoderNotFoundError`` says, in one line, how to point the config at a local copy.
The weights in the folder are read by :mod:`align_jax.encoders.weights` (safetensors, single or
sharded, or a Flax msgpack; ``pytorch_model.bin``, a pickle, is refused). With ``weights=False``
only the config and tokenizer/processor files are fetched (the encoders' ``abstract=True`` path,
for ahead-of-time compiles).
"""

from __future__ import annotations

import glob
import os

# Config, tokenizer and processor files; weights are fetched in the order below, stopping at the
# first format the repo has, so a repo with several formats is downloaded once (TF, ONNX never).
_CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]
_WEIGHT_PATTERNS = (["model.safetensors"],
                    ["model.safetensors.index.json", "model-*-of-*.safetensors"],
                    ["flax_model.msgpack*"], ["pytorch_model.bin"])
_WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "flax_model.msgpack",
                 "pytorch_model.bin")


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
         f"internet by `hf download {name_or_path} --local-dir /path/to/folder`")
  if path.startswith((os.sep, ".", "~")) or os.path.exists(path):
    # A path, not a hub id: the fix is the path itself (a hub download command would make no sense).
    parent = os.path.dirname(os.path.abspath(path))
    near = (f"{parent} does not exist" if not os.path.isdir(parent) else
            f"{parent} holds {', '.join(sorted(os.listdir(parent))[:8]) or 'nothing'}")
    raise EncoderNotFoundError(
        f"Encoder {name_or_path!r} not found: no such folder ({near}); check the path given to "
        f"{config_flag}, or pass a folder holding the checkpoint's config.json and weights (or a "
        "Hugging Face hub id such as facebook/dinov2-large).")
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
