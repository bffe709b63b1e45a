"""Shared pieces of the text-encoder parity tests: seeded random PyTorch checkpoints, loading them
back as align_jax does, and the error measure the tests bound."""

import numpy as np

from align_jax.encoders import weights


def max_rel(ours, ref) -> float:
  """Largest absolute difference, relative to the reference's largest magnitude (float64)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def save_random_models(root, variants: dict, base: dict, perturb, torch) -> dict[str, str]:
  """Each ``name: (config class, model class, extra config)`` of ``variants`` built by transformers
  from ``base`` + extra with torch seeded at 0, every param whose name ``perturb`` maps to
  ``(mean, std)`` redrawn from that normal (so norms and biases are not their defaults), and saved
  as safetensors under ``root/name``; ``{name: folder}``."""
  import transformers
  torch.manual_seed(0)
  made = {}
  for name, (config_class, model_class, extra) in variants.items():
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**base,
                                                                                   **extra))
    with torch.no_grad():
      for key, value in model.named_parameters():
        draw = perturb(key)
        if draw is not None:
          value.normal_(*draw)
    folder = str(root / name)
    model.save_pretrained(folder, safe_serialization=True)
    made[name] = folder
  return made


def load(folder: str):
  """(config.json dict, PyTorch-named state dict) of a saved checkpoint, as align_jax reads them."""
  return weights.read_config(folder), weights.read_state_dict(folder)
