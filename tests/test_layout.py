"""The README's Layout section is the package tree: every module listed once, nothing listed that
is not there (issue 22: a new engineer reads the layers from it)."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layout_paths(readme: str) -> list[str]:
  """The paths the README's Layout block names under ``align_jax/`` (folders end with '/')."""
  block = readme.split("## Layout", 1)[1].split("```", 2)[1]
  paths, stack = [], []
  for line in block.splitlines():
    match = re.match(r"^( *)(\S+)", line)
    if not match:
      continue
    depth, name = len(match.group(1)) // 2, match.group(2)
    stack[depth:] = [name]
    if stack[0] == "align_jax/" and depth > 0:
      paths.append("".join(stack))
  return paths


def test_layout_parser_reads_nesting():
  text = "## Layout\n\n```\nmain.py  x\nalign_jax/\n  a.py  A\n  b/  B\n    c.py  C\n  d.py  D\ntests/  t\n```\n"
  assert layout_paths(text) == ["align_jax/a.py", "align_jax/b/", "align_jax/b/c.py",
                                "align_jax/d.py"]


def test_readme_layout_lists_every_module_once():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    listed = layout_paths(f.read())
  on_disk = set()
  for root, dirs, files in os.walk(os.path.join(REPO, "align_jax")):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    rel = os.path.relpath(root, REPO).replace(os.sep, "/") + "/"
    if rel != "align_jax/":
      on_disk.add(rel)
    on_disk.update(rel + name for name in files if name.endswith(".py") and name != "__init__.py")
  duplicates = sorted({p for p in listed if listed.count(p) > 1})
  assert not duplicates, f"listed more than once in README Layout: {duplicates}"
  assert not sorted(on_disk - set(listed)), (
      f"modules missing from README Layout: {sorted(on_disk - set(listed))}")
  assert not sorted(set(listed) - on_disk), (
      f"README Layout lists what is not there: {sorted(set(listed) - on_disk)}")
