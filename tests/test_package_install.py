"""``pip install .`` gives a package that imports from any folder, with its data and the ``align-jax``
command (issue: align_jax as an installable package)."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = (".git", ".venv", "__pycache__", "build", "*.egg-info", ".pytest_cache")


def _packages_in_tree() -> set[str]:
  """Every folder of align_jax/ with an __init__.py, as a dotted name."""
  found = set()
  for folder, dirs, files in os.walk(os.path.join(REPO, "align_jax")):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    if "__init__.py" in files:
      found.add(os.path.relpath(folder, REPO).replace(os.sep, "."))
  return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """The repository pip-installed (no dependencies: they are this venv's) into a fresh folder."""
  if importlib.util.find_spec("setuptools") is None:
    pytest.skip("setuptools is not installed (pip's isolated build would download it)")
  root = tmp_path_factory.mktemp("install")
  source, target = root / "source", root / "site"
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*SKIP))
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--no-build-isolation", "--target", str(target), str(source)],
                 check=True, capture_output=True, timeout=600)
  return target


def _python(code: str, target, cwd) -> str:
  env = {**os.environ, "PYTHONPATH": str(target)}
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                        text=True, check=True, timeout=300).stdout


def test_installed_package_imports_from_any_folder(installed, tmp_path):
  out = _python(
      "import os, align_jax, align_jax.configs.demo_online as c\n"
      "from align_jax.testing import demos\n"
      "from align_jax.evaluate import suite\n"
      "print(align_jax.__file__)\n"
      "print(os.path.exists(suite.IMAGENET_CLASSES_FILE))\n"
      "print(demos.config_file('demo', '').batch_size)\n"
      "print(callable(align_jax.AlignedModel.load))\n", installed, tmp_path)
  file, classes, batch, load = out.split()
  assert file.startswith(str(installed))  # the installed copy, not the clone
  assert (classes, load) == ("True", "True")
  from configs import demo
  assert int(batch) == demo.get_config("").batch_size


def test_package_list_names_every_subpackage(installed):
  installed_packages = {os.path.relpath(folder, installed).replace(os.sep, ".")
                        for folder, _, files in os.walk(installed / "align_jax")
                        if "__init__.py" in files}
  assert _packages_in_tree() | {"align_jax.configs"} == installed_packages


def test_console_command_lists_and_runs_subcommands(installed, tmp_path):
  env = {**os.environ, "PYTHONPATH": str(installed)}
  command = str(installed / "bin" / "align-jax")
  listing = subprocess.run([command, "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
  assert listing.returncode == 0
  for name in ("train", "evaluate", "extract_features", "export", "eval_suite", "select",
               "curate", "aot", "plot"):
    assert f"\n  {name} " in listing.stdout
  bad = subprocess.run([command, "fly"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode != 0 and "unknown command 'fly'" in bad.stderr
  export = subprocess.run([command, "export", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert export.returncode == 0 and "--workdir" in export.stdout
  assert export.stdout.startswith("usage: align-jax export [flags]")  # the command as typed


def test_installed_command_finds_the_packaged_configs_by_name(installed, tmp_path):
  """From any folder, --config=NAME is the packaged config; a wrong name lists the packaged ones."""
  env = {**os.environ, "PYTHONPATH": str(installed)}
  command = str(installed / "bin" / "align-jax")
  bad = subprocess.run([command, "train", "--config=configs/demoo.py", f"--workdir={tmp_path}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert ("packaged config by name: demo, demo_online, dinov2_llm, dinov2_roberta, dinov3_qwen3, "
          "siglip2_nvembed") in bad.stderr
  found = _python("from align_jax.config import files as config_files; print(config_files.resolve('demo:steps=2'))"
                  "; print(config_files.resolve('configs/dinov2_roberta.py'))", installed, tmp_path)
  assert found.splitlines() == [f"{installed}/align_jax/configs/demo.py:steps=2",
                                f"{installed}/align_jax/configs/dinov2_roberta.py"]


def test_runtime_requirements_hold_no_test_tools():
  """pytest and the test-only tools are in tests/requirements.txt (pip install ".[test]")."""
  def names(path):
    with open(os.path.join(REPO, path)) as f:
      return {line.split("==")[0].strip().lower() for line in f
              if line.strip() and not line.startswith("#")}
  runtime, test = names("requirements.txt"), names("tests/requirements.txt")
  assert "pytest" in test and not runtime & {"pytest", "nbclient", "torch", "tensorboard",
                                             "gcp-storage-emulator"}
  assert "matplotlib" in runtime  # the pictures (align_jax.analysis.plotting)
