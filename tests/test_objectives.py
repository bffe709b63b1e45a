"""align_jax.objectives as a package: its imports go one way, and the variants take what they need
from the loss kind (its logits) through its public methods."""

import ast
import os

import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.config import schema as config_lib
from align_jax.objectives import cwcl, kinds, multi_positive
from train_utils import aligned_unit_pairs

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "align_jax", "objectives")

# Each module may import only modules of a lower level: the losses, the loss kinds, the losses
# built on a kind, the objective composing them. config_checks (the package's config checks,
# registered with align_jax.config) reads the kinds and is imported by none of them.
LEVELS = {"contrastive": 0, "kinds": 1, "multi_positive": 2, "cwcl": 2, "structure": 2,
          "objective": 3, "config_checks": 4}
# Layers above the objective: the trainer, serving and the commands use it, never the reverse.
ABOVE = ("align_jax.train", "align_jax.serving", "align_jax.cli")


def _referenced(tree: ast.AST) -> set[str]:
  """Dotted align_jax module names a module refers to: imports (function-local and relative ones
  included, relative to align_jax.objectives) and module names as strings (importlib)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(["align_jax", "objectives"][:3 - node.level] + ([base] if base else []))
      names.update(f"{base}.{alias.name}" for alias in node.names)
      names.add(base)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      if node.value.startswith("align_jax."):
        names.add(node.value)
  return {n for n in names if n.startswith("align_jax.")}


def import_problems(package_dir: str) -> list[str]:
  problems = []
  for name in sorted(os.listdir(package_dir)):
    if not name.endswith(".py") or name == "__init__.py":
      continue
    module = name[:-3]
    if module not in LEVELS:
      problems.append(f"{module}: not placed in the package's LEVELS")
      continue
    tree = ast.parse(open(os.path.join(package_dir, name)).read())
    found = set()
    for ref in _referenced(tree):
      parts = ref.split(".")
      above = [layer for layer in ABOVE if ref == layer or ref.startswith(layer + ".")]
      if above:
        found.add(f"{module} imports {above[0]}, a layer above the objectives")
      elif parts[:2] == ["align_jax", "objectives"] and len(parts) > 2 and parts[2] != module:
        other = parts[2]
        if other not in LEVELS:
          found.add(f"{module} imports {other}, not placed in LEVELS")
        elif LEVELS[other] >= LEVELS[module]:
          found.add(f"{module} (level {LEVELS[module]}) imports {other} "
                    f"(level {LEVELS[other]}): imports must go one way")
    problems.extend(sorted(found))
  return problems


def test_objectives_imports_go_one_way():
  assert import_problems(PACKAGE) == []


def test_the_import_check_sees_back_calls(tmp_path):
  """The check itself: a kind calling back into a variant, a relative import, a module loaded by
  name and an unplaced module are each reported."""
  (tmp_path / "kinds.py").write_text("from align_jax.objectives import multi_positive\n")
  (tmp_path / "contrastive.py").write_text("def f():\n  from .kinds import LossKind\n")
  (tmp_path / "structure.py").write_text(
      "import importlib\nm = importlib.import_module('align_jax.objectives.objective')\n")
  (tmp_path / "cwcl.py").write_text("from align_jax.train import loop\n")
  (tmp_path / "variants.py").write_text("")
  assert import_problems(str(tmp_path)) == [
      "contrastive (level 0) imports kinds (level 1): imports must go one way",
      "cwcl imports align_jax.train, a layer above the objectives",
      "kinds (level 1) imports multi_positive (level 2): imports must go one way",
      "structure (level 2) imports objective (level 3): imports must go one way",
      "variants: not placed in the package's LEVELS",
  ]


def _kind(name):
  config = config_lib.default_config()
  config.loss.update(name=name, temperature_init=0.25, scale_init=3.0, bias_init=-1.5)
  kind = kinds.get(config.loss)
  return kind, kind.loss_args(kind.init_params())


def test_kind_logits_match_numpy():
  s = np.random.default_rng(0).uniform(-1, 1, size=(3, 4))
  kind, args = _kind("softmax")
  np.testing.assert_allclose(np.asarray(kind.logits(jnp.float32(s), args)), s / 0.25, rtol=1e-6)
  kind, args = _kind("sigmoid")
  np.testing.assert_allclose(np.asarray(kind.logits(jnp.float32(s), args)), 3.0 * s - 1.5,
                             rtol=1e-6, atol=1e-6)


def test_every_loss_kind_has_a_multi_positive_form():
  assert set(multi_positive.FORMS) == set(kinds.NAMES)


def test_cwcl_takes_the_temperature_from_the_kind():
  img, txt = aligned_unit_pairs(6, 5)
  rng = np.random.default_rng(1)
  x, y = jnp.float32(rng.normal(size=(6, 7))), jnp.float32(rng.normal(size=(6, 4)))
  kind, args = _kind("softmax")
  got = float(cwcl.cwcl_loss(kind, jnp.float32(img), jnp.float32(txt), args, x, y, 0.4))
  want = float(cwcl.cwcl_softmax_loss(jnp.float32(img), jnp.float32(txt), x, y, 0.25, 0.4))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  other = float(cwcl.cwcl_softmax_loss(jnp.float32(img), jnp.float32(txt), x, y, 0.5, 0.4))
  assert abs(other - got) > 1e-3  # the temperature matters, so the check above can fail
  kind, args = _kind("sigmoid")
  with pytest.raises(ValueError, match="loss.cwcl_weight is for the softmax loss"):
    cwcl.cwcl_loss(kind, jnp.float32(img), jnp.float32(txt), args, x, y, 0.4)
