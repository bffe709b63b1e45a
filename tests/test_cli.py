"""The command line: the demo learns, and bad configs stop with one clear line (no traceback)."""

import json
import os
import subprocess
import sys

import pytest

import helpers_cli
from align_jax.cli import absl_app, main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, check=False):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=check)


def test_demo_learns_held_out_retrieval(tmp_path):
  _main("--config=configs/demo.py:steps=150", f"--workdir={tmp_path}", check=True)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r for r in records if "eval/i2t@1" in r}
  assert evals[0]["eval/i2t@1"] < 0.05 and evals[0]["eval/t2i@1"] < 0.05  # untrained: near chance
  assert evals[150]["eval/i2t@1"] > 0.5 and evals[150]["eval/t2i@1"] > 0.5
  assert evals[150]["eval/i2t@10"] >= evals[150]["eval/i2t@1"]


@pytest.mark.parametrize("args, message", [
    (["--config.batchsize=8"], "unknown config key 'batchsize'; did you mean 'batch_size'?"),
    (["--config.batch_size=100"], "batch_size 100 is not divisible by the 8 devices"),
    (["--config.model.image_projector=transformer"], "unknown projector 'transformer'"),
    (["--config.loss.name=hinge"], "unknown loss 'hinge'"),
    (["--config.mesh.shape=(3,)"], "mesh shape (3,) needs 3 devices, but 8 are present"),
    (["--config.mesh.dcn_shape=(2,)"], "mesh.dcn_shape (2,) needs 2 processes (one slice: each "
     "process a granule), but 1 are present"),
])
def test_bad_config_gives_one_clear_error(tmp_path, args, message):
  result = _main("--config=configs/demo.py:steps=2", f"--workdir={tmp_path}", *args)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr + result.stdout


def test_bad_variant_and_missing_config_file(tmp_path):
  result = _main("--config=configs/demo.py:stepz=2", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "unknown config variant 'stepz'" in result.stderr
  assert "Traceback" not in result.stderr
  result = _main("--config=configs/no_such_config.py", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "error: no config file 'configs/no_such_config.py'; give a " \
      "path to a config .py file, or a packaged config by name: demo," in result.stderr
  assert "Traceback" not in result.stderr


# One flag of each command that its --help must list (a new command needs an entry here).
HELP_FLAG = {"train": "--workdir", "evaluate": "--step", "extract_features": "--mode",
             "export": "--out", "eval_suite": "--only", "select": "--image_encoders",
             "curate": "--quota", "aot": "--topology", "plot": "--out"}


def test_every_command_help_exits_0_and_names_the_command(capsys):
  """``align-jax COMMAND --help`` (and -h, --helpfull) for every command of the dispatcher, in
  this process: status 0, ``usage: align-jax COMMAND``, its own flags and the shared ones."""
  assert set(HELP_FLAG) == set(cli_main.COMMANDS)
  for name, flag in HELP_FLAG.items():
    for asked in ("--help", "-h", "--helpfull"):
      status = helpers_cli.run_command(lambda args: cli_main.main(["align-jax", *args]),
                                       [name, asked])
      out, err = capsys.readouterr()
      assert status in (0, None), (name, asked, status, err[-2000:])
      assert out.startswith(f"usage: align-jax {name} "), (name, asked, out[:300])
      assert f"  {flag}:" in out, (name, asked, out)
      if name not in ("plot", "aot"):  # the others run over several processes too
        assert "  --coordinator_address:" in out, (name, asked)
      assert "Traceback" not in err
  assert helpers_cli.run_command(cli_main.main, ["align-jax", "--help"]) == 0
  assert capsys.readouterr().out.startswith("usage: align-jax COMMAND")


def test_help_names_the_program_as_started():
  """``python main.py --help`` and ``python -m align_jax.cli.NAME --help``: exit 0, and the usage
  line is the command as typed."""
  for command, program in ((["main.py"], "python main.py"),
                           (["-m", "align_jax.cli.aot"], "python -m align_jax.cli.aot")):
    result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: {program} [flags]\n"), result.stdout[:300]
    assert "  --topology:" in result.stdout or "  --coordinator_address:" in result.stdout


def test_a_stray_argument_is_one_line(tmp_path):
  from align_jax.cli import export as export_cli
  status = helpers_cli.run_command(export_cli, [f"--workdir={tmp_path}", f"--out={tmp_path}/o",
                                                "stray"])
  assert status == ("error: unexpected arguments ['stray']: this command takes flags only (see "
                    "--help)")
  assert not os.path.exists(tmp_path / "o")


def test_only_the_commands_have_a_main_block():
  """``if __name__ == "__main__"`` lives in align_jax/cli/ only: the library has no command line."""
  import ast
  found = []
  for folder, _, files in os.walk(os.path.join(REPO, "align_jax")):
    for name in files:
      path = os.path.join(folder, name)
      if not name.endswith(".py") or os.path.basename(folder) == "cli":
        continue
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
          found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
  assert found == []


def test_help_is_found_before_a_double_dash():
  assert absl_app.help_asked(["--workdir=x", "--help"]) == "short"
  assert absl_app.help_asked(["-?"]) == absl_app.help_asked(["-helpshort"]) == "short"
  assert absl_app.help_asked(["--helpfull"]) == "full"
  assert absl_app.help_asked(["--workdir=x", "--", "--help"]) is None
  assert absl_app.help_asked(["--helper=1", "--workdir=--help"]) is None


def test_console_command_rejects_an_unknown_subcommand():
  result = subprocess.run([sys.executable, "-m", "align_jax.cli.main", "fly"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "unknown command 'fly'; one of: train," in result.stderr


def _cli(*args, cwd):
  """``align-jax ARGS`` started in ``cwd`` (another folder than the clone), as an installed user."""
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, "-m", "align_jax.cli.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _info_lines(result):
  return [line for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.slow  # four runs of the command (~100 s on a 2-core CPU)
def test_packaged_config_by_name_console_and_a_complete_run(tmp_path):
  """From another folder: --config=demo:steps=2 trains; the console shows the config as one line
  (+ the path of config.json); run again, it says in one line that the run is complete and exits
  0; evaluate prints where eval_results.json is."""
  workdir = tmp_path / "run"
  result = _cli("train", "--config=demo:steps=2", "--config.log_every=1", f"--workdir={workdir}",
                cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _info_lines(result)
  config_lines = [line for line in lines if " config: " in line]
  assert len(config_lines) == 1 and "2 steps; batch 512; seed 0; data synthetic[train]" in (
      config_lines[0]) and f"Full config: {workdir}/config.json" in config_lines[0], lines
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 2
  assert not any("ml_collections" in line or line.startswith("  ") for line in lines), lines
  assert any("trainable parameters: " in line for line in lines)
  step1 = next(line for line in lines if "step 1/2" in line)
  assert "(first step, compiled)" in step1 and "ETA" not in step1  # compile time not in the ETA
  assert "steps/s  ETA" in next(line for line in lines if "step 2/2" in line)
  assert len(lines) <= 8, lines  # config, parameters, step-0 eval, 2 steps, final eval

  again = _cli("train", "--config=demo:steps=2", f"--workdir={workdir}", cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  lines = _info_lines(again)
  assert len(lines) == 1 and "run complete: checkpoint step 2 of 2 in " in lines[0], lines
  assert f"metrics in {workdir}/metrics.jsonl" in lines[0]

  evaluated = _cli("evaluate", "--config=demo:steps=2", f"--workdir={workdir}", cwd=tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert _info_lines(evaluated)[-1].endswith(f"wrote {workdir}/eval_results.json")
  assert json.loads((workdir / "eval_results.json").read_text())["step"] == 2

  printed = _cli("evaluate", "--config=demo:steps=2", f"--workdir={workdir}", "--print_config",
                 cwd=tmp_path)
  assert printed.returncode == 0 and "config:\nasync_checkpointing: true" in printed.stdout


def test_unknown_config_name_lists_the_packaged_ones(tmp_path, monkeypatch):
  result = _cli("train", "--config=demoo", f"--workdir={tmp_path}", cwd=tmp_path)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip() == (
      "error: no config file 'demoo'; give a path to a config .py file, or a packaged config by "
      "name: demo, demo_online, dinov2_llm, dinov2_roberta, dinov3_qwen3, siglip2_nvembed (e.g. "
      "--config=demo, or --config=NAME:variant)")
  from align_jax.config import files as config_files
  monkeypatch.chdir(tmp_path)  # where configs/demo.py is not
  assert config_files.resolve("dinov2_roberta:batch=32768") == os.path.join(
      REPO, "configs", "dinov2_roberta.py") + ":batch=32768"
  assert config_files.resolve("configs/demo.py") == os.path.join(REPO, "configs", "demo.py")
