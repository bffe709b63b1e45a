"""The package runs its encoders with no transformers model class and no torch (issue 20).

A fresh interpreter imports align_jax, writes the online demo's tiny checkpoints (align_jax's own
modules + the reverse name table, no torch), builds both encoders as training does and encodes a
batch; then no ``modeling_flax*`` / ``modeling_*`` transformers module and no torch is imported.
torch is installed here for the tests' references, and transformers (4.57 on import, 5.x when its
tokenizer / config modules load) imports it whenever it is installed; the child process blocks it
(``sys.modules["torch"] = None``: ``import torch`` fails and ``find_spec`` says not installed), as
an install from requirements.txt has no torch, and everything must still run. The package's own
source is also scanned: no ``import torch`` and no transformers model module anywhere in it.
"""

import ast
import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json, sys
sys.modules["torch"] = None  # as if torch were not installed
import numpy as np
import align_jax
from align_jax.encoders import factory as encoder_factory
from configs import demo_online
config = demo_online.get_config("cache=" + sys.argv[1])
image = encoder_factory.build_encoder(config.model.image_encoder, config, "image")
text = encoder_factory.build_encoder(config.model.text_encoder, config, "text")
size = image.image_size
features = image.encode(np.zeros((2, size + 3, size + 5, 3), np.uint8), batch_size=2)
words = text.encode(["a red circle"], batch_size=2)
print(json.dumps({"modules": sorted(sys.modules), "shapes": [features.shape, words.shape]}))
"""


def test_no_modeling_module_or_torch_is_imported(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  modules = result["modules"]
  assert result["shapes"][0][0] == 2 and result["shapes"][1][0] == 1
  assert "align_jax.encoders.vit" in modules and "align_jax.encoders.bert" in modules
  flax_classes = [m for m in modules if "modeling_flax" in m]
  model_classes = [m for m in modules if m.startswith("transformers.models.") and ".modeling_" in m]
  assert flax_classes == [] and model_classes == []
  assert "transformers.modeling_utils" not in modules  # PreTrainedModel, every model's base
  assert not [m for m in modules if m.startswith("torch.")]  # "torch" itself: the None block


def test_package_source_imports_no_torch_and_no_model_class():
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "align_jax")
  found = []
  for folder, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if isinstance(node, ast.ImportFrom):
          names += [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
          if n == "torch" or n.startswith("torch.") or "modeling_" in n:
            found.append(f"{os.path.relpath(path, root)}: {n}")
  # testing/tiny_checkpoints.py's save_format="pt" writes the tests' PyTorch-saved checkpoints
  # (torch imported inside that branch only; the demo and "flax" format never reach it).
  assert found == ["testing/tiny_checkpoints.py: torch"]
