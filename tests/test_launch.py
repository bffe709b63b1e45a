"""The launch scripts run exactly the commands they should, and --dry-run prints exactly those.

tests/fakebin/ (first on PATH) holds fake gcloud, git, srun, sbatch, nvidia-smi and python that
record their arguments; each script runs for real against them and with --dry-run, and both the
recorded calls and the printed "+ ..." lines (parsed back with shlex) must equal the expected
argument lists.
"""

import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
FAKEBIN = os.path.join(REPO, "tests", "fakebin")
FAKES = {"gcloud", "git", "srun", "sbatch", "nvidia-smi", "python"}
SCRIPTS = ["tpu_create.sh", "tpu_setup.sh", "tpu_run.sh", "tpu_delete.sh", "gpu_single_node.sh",
           "gpu_multinode.sh", "slurm_submit.sh", "slurm_multinode.sbatch"]
TEE = ["2>&1", "|", "tee", "-a"]


def _launch(tmp_path, script, *args, env=None, path=None):
  """Runs launch/<script> with the fakes first on PATH -> (result, recorded calls)."""
  return _bash(tmp_path, [os.path.join(LAUNCH, script), *args], env=env, path=path)


def _bash(tmp_path, argv, env=None, path=None):
  """Runs `bash *argv` in tmp_path with the fakes first on PATH -> (result, recorded calls)."""
  record = tmp_path / "calls.bin"
  record.unlink(missing_ok=True)
  full_env = {k: v for k, v in os.environ.items() if k not in (
      "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PYTHON", "DRY_RUN",
      "SLURM_JOB_ID", "SLURM_SUBMIT_DIR", "COORDINATOR", "NUM_NODES", "NODE_RANK")}
  full_env.update(PATH=path or f"{FAKEBIN}{os.pathsep}{os.environ['PATH']}",
                  FAKEBIN_LOG=str(record), TMPDIR=str(tmp_path), **(env or {}))
  result = subprocess.run(["bash", *argv], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=30)
  calls = []
  if record.exists():
    for entry in record.read_bytes().split(b"\x1e\0")[:-1]:
      calls.append([word.decode() for word in entry.split(b"\0")[:-1]])
  return result, calls


def _printed(stdout):
  """The "+ " lines, parsed back into argument lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _check(tmp_path, script, args, expected, env=None):
  """Real run records `expected`; --dry-run prints `expected` (tee suffixes kept) and runs none."""
  result, calls = _launch(tmp_path, script, *args, env=env)
  assert result.returncode == 0, result.stderr
  assert _printed(result.stdout) == expected
  untee = [c[:c.index("2>&1")] if "2>&1" in c else c for c in expected]
  assert calls == [c for c in untee if c[0] in FAKES]
  dry, dry_calls = _launch(tmp_path, script, "--dry-run", *args, env=env)
  assert dry.returncode == 0, dry.stderr
  assert _printed(dry.stdout) == expected
  assert dry_calls == []
  return result


def test_tpu_create_on_demand_v4_pod(tmp_path):
  _check(tmp_path, "tpu_create.sh",
         ["--name", "align-v4", "--zone=us-central2-b", "--accelerator-type", "v4-32"],
         [["gcloud", "compute", "tpus", "tpu-vm", "create", "align-v4", "--zone=us-central2-b",
           "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]])


def test_tpu_create_spot_queued_v5e_from_env(tmp_path):
  env = dict(TPU_NAME="align-v5e", ZONE="us-west4-a", PROJECT="my-proj",
             ACCELERATOR_TYPE="v5e-256")
  result = _check(tmp_path, "tpu_create.sh", ["--spot", "--queued", "--valid-until", "6h"],
                  [["gcloud", "compute", "tpus", "queued-resources", "create", "align-v5e",
                    "--node-id=align-v5e", "--zone=us-west4-a", "--project=my-proj",
                    "--accelerator-type=v5litepod-256", "--runtime-version=v2-alpha-tpuv5-lite",
                    "--spot", "--valid-until-duration=6h"]], env=env)
  assert "queued-resources describe align-v5e --zone=us-west4-a" in result.stderr


def test_tpu_create_spot_single_host_with_runtime_override(tmp_path):
  _check(tmp_path, "tpu_create.sh",
         ["--name=t", "--zone=europe-west4-a", "--accelerator-type=v6e-8", "--spot",
          "--runtime-version=my-image"],
         [["gcloud", "compute", "tpus", "tpu-vm", "create", "t", "--zone=europe-west4-a",
           "--accelerator-type=v6e-8", "--version=my-image", "--spot"]])


def test_tpu_setup_ships_git_head_and_installs_jax_tpu_on_all_workers(tmp_path):
  tarball = str(tmp_path / "align_jax-src.tar.gz")
  result, calls = _launch(tmp_path, "tpu_setup.sh", "--name", "align-v4", "--zone",
                          "us-central2-b")
  assert result.returncode == 0, result.stderr
  assert calls[0][:4] == ["git", "-C", REPO, "status"]  # the uncommitted-changes check
  expected = [
      ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "align-v4:align_jax-src.tar.gz",
       "--zone=us-central2-b", "--worker=all"]]
  assert calls[1:3] == expected
  ssh = calls[3]
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "align-v4",
                     "--zone=us-central2-b", "--worker=all"] and len(ssh) == 9
  steps = [shlex.split(step) for step in ssh[8].removeprefix("--command=").split(" && ")]
  assert steps == [
      ["set", "-e"], ["sudo", "apt-get", "update", "-qq"],
      ["sudo", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq", "python3.11",
       "python3.11-venv"],
      ["python3.11", "-m", "venv", "align_jax_venv"], ["rm", "-rf", "align_jax"],
      ["mkdir", "-p", "align_jax"], ["tar", "-xzf", "align_jax-src.tar.gz", "-C", "align_jax"],
      ["align_jax_venv/bin/pip", "install", "-q", "--upgrade", "pip"],
      ["align_jax_venv/bin/pip", "install", "-q", "-r", "align_jax/requirements.txt",
       "jax[tpu]==0.10.2"],
      ["cd", "align_jax"],
      ["../align_jax_venv/bin/python", "-c", "import align_jax, jax; print(jax.__version__)"]]
  dry, dry_calls = _launch(tmp_path, "tpu_setup.sh", "--name", "align-v4", "--zone",
                           "us-central2-b", "--dry-run")
  assert dry.returncode == 0 and dry_calls == []
  assert _printed(dry.stdout) == calls[1:]


def test_tpu_setup_git_clone(tmp_path):
  result, calls = _launch(tmp_path, "tpu_setup.sh", "--name=t", "--zone=z", "--no-apt",
                          "--git-url=https://example.com/align_jax.git", "--branch=v1")
  assert result.returncode == 0, result.stderr
  assert [c[0] for c in calls] == ["gcloud"]  # nothing built or copied locally
  steps = calls[0][-1].removeprefix("--command=").split(" && ")
  assert "git clone --depth=1 --branch=v1 https://example.com/align_jax.git align_jax" in steps
  assert not any("apt-get" in step for step in steps)


def test_tpu_run_all_workers_distributed_with_log(tmp_path):
  log = str(tmp_path / "logs" / "run.log")
  remote = ("cd align_jax && ../align_jax_venv/bin/python main.py --config=configs/demo.py "
            "--workdir=/mnt/shared/runs/demo --distributed --config.batch_size=4096 "
            "--config.seed=3")
  _check(tmp_path, "tpu_run.sh",
         ["--name", "align-v4", "--zone", "us-central2-b", "--project", "p",
          "--config", "configs/demo.py", "--workdir", "/mnt/shared/runs/demo", "--log", log,
          "--config.batch_size=4096", "--", "--config.seed=3"],
         [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "align-v4", "--zone=us-central2-b",
           "--project=p", "--worker=all", f"--command={remote}", *TEE, log]])
  with open(log) as f:
    assert f.read() == "fake gcloud ran\n"  # the workers' output was copied to the log


def test_tpu_run_detached_with_env(tmp_path):
  result, calls = _launch(tmp_path, "tpu_run.sh", "--name=t", "--zone=z", "--config=c.py",
                          "--workdir=/shared/w x", "--env", "XLA_FLAGS=--xla_dump_to=/tmp/d",
                          "--detach")
  assert result.returncode == 0, result.stderr
  (call,) = calls
  assert call[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z",
                      "--worker=all"]
  assert shlex.split(call[8].removeprefix("--command=")) == [
      "cd", "align_jax", "&&", "nohup", "env", "XLA_FLAGS=--xla_dump_to=/tmp/d",
      "../align_jax_venv/bin/python", "main.py", "--config=c.py", "--workdir=/shared/w x",
      "--distributed", ">", "../align_jax_run.log", "2>&1", "<", "/dev/null", "&"]
  assert "--worker=0 --command='tail -n 100 -f align_jax_run.log'" in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["--name=t", "--zone=z"], ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t",
                                "--zone=z", "--quiet"]),
    (["--name=t", "--zone=z", "--queued", "--project=p"],
     ["gcloud", "compute", "tpus", "queued-resources", "delete", "t", "--zone=z", "--project=p",
      "--force", "--quiet"]),
])
def test_tpu_delete(tmp_path, args, expected):
  _check(tmp_path, "tpu_delete.sh", args, [expected])


def test_gpu_single_node_checks_gpus_installs_and_trains(tmp_path):
  result = _check(
      tmp_path, "gpu_single_node.sh",
      ["--config", "configs/demo.py", "--workdir", "/tmp/run", "--python", "python", "--install",
       "--config.batch_size=4096"],
      [["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
       ["python", "-m", "pip", "install", "-q", "-r", "requirements.txt", "jax[cuda13]==0.10.2"],
       ["python", "main.py", "--config=configs/demo.py", "--workdir=/tmp/run",
        "--config.batch_size=4096"]])
  assert "7, NVIDIA H100 80GB HBM3" in result.stdout
  dry, _ = _launch(tmp_path, "gpu_single_node.sh", "--config=c.py", "--workdir=w", "--gpus=0,1",
                   "--dry-run", env={"PYTHON": "/venv/bin/python"})
  assert _printed(dry.stdout)[-1] == ["env", "CUDA_VISIBLE_DEVICES=0,1", "/venv/bin/python",
                                      "main.py", "--config=c.py", "--workdir=w"]


def test_gpu_single_node_without_gpus_stops(tmp_path):
  result, calls = _launch(tmp_path, "gpu_single_node.sh", "--config=c.py", "--workdir=w",
                          env={"FAKEBIN_GPUS": "0"})
  assert result.returncode != 0 and "nvidia-smi lists no GPUs" in result.stderr
  assert [c[0] for c in calls] == ["nvidia-smi"]  # main.py never started
  if shutil.which("nvidia-smi", path="/usr/bin:/bin") is None:
    result, calls = _launch(tmp_path, "gpu_single_node.sh", "--config=c.py", "--workdir=w",
                            path="/usr/bin:/bin")
    assert result.returncode != 0 and "nvidia-smi not found" in result.stderr


def test_gpu_multinode_one_command_per_node(tmp_path):
  node = ["--coordinator", "10.0.0.1:8476", "--num-nodes", "2", "--config", "configs/demo.py",
          "--workdir", "/shared/runs/demo", "--python", "python", "--config.batch_size=16384"]
  for rank in ("0", "1"):
    result = _check(
        tmp_path, "gpu_multinode.sh", [*node, "--node-rank", rank, "--", "--config.seed=3"],
        [["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
         ["python", "main.py", "--config=configs/demo.py", "--workdir=/shared/runs/demo",
          "--coordinator_address=10.0.0.1:8476", "--num_processes=2", f"--process_id={rank}",
          "--config.batch_size=16384", "--config.seed=3"]])
    assert "7, NVIDIA H100 80GB HBM3" in result.stdout
  log = str(tmp_path / "node.log")
  env = {"COORDINATOR": "[fd00::1]:1234", "NUM_NODES": "4", "NODE_RANK": "3",
         "PYTHON": "/venv/bin/python"}
  dry, calls = _launch(tmp_path, "gpu_multinode.sh", "--config=c.py", "--workdir=/w", "--install",
                       "--gpus=0,1", "--timeout=60", "--log", log, "--dry-run", env=env)
  assert dry.returncode == 0 and calls == [], dry.stderr
  assert _printed(dry.stdout) == [
      ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
      ["/venv/bin/python", "-m", "pip", "install", "-q", "-r", "requirements.txt",
       "jax[cuda13]==0.10.2"],
      ["env", "CUDA_VISIBLE_DEVICES=0,1", "/venv/bin/python", "main.py", "--config=c.py",
       "--workdir=/w", "--coordinator_address=[fd00::1]:1234", "--num_processes=4",
       "--process_id=3", "--initialization_timeout=60", *TEE, log]]


def test_slurm_submit_two_nodes_by_eight_gpus(tmp_path):
  logs = str(tmp_path / "slurm-logs")
  result = _check(
      tmp_path, "slurm_submit.sh",
      ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account", "acct",
       "--python", "/shared/venv/bin/python", "--config", "configs/demo.py", "--workdir",
       "/shared/runs/demo", "--log-dir", logs, "--config.batch_size=16384"],
      [["mkdir", "-p", logs],
       ["sbatch", "--job-name=align_jax", "--nodes=2", "--ntasks-per-node=1",
        "--gpus-per-node=8", "--time=24:00:00", f"--output={logs}/%x-%j.out",
        "--partition=gpu", "--account=acct", "launch/slurm_multinode.sbatch",
        "--config=configs/demo.py", "--workdir=/shared/runs/demo",
        "--python=/shared/venv/bin/python", "--", "--config.batch_size=16384"]])
  assert "Submitted batch job 4242" in result.stdout
  assert os.path.isdir(logs)


def test_slurm_batch_script_runs_one_distributed_task_per_node(tmp_path):
  args = ["--config=configs/demo.py", "--workdir=/shared/runs/demo", "--python=python", "--",
          "--config.batch_size=16384"]
  _check(tmp_path, "slurm_multinode.sbatch", args,
         [["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "main.py",
           "--config=configs/demo.py", "--workdir=/shared/runs/demo", "--distributed",
           "--config.batch_size=16384"]], env={"SLURM_JOB_ID": "4242"})
  result, calls = _launch(tmp_path, "slurm_multinode.sbatch", *args)  # not inside a job
  assert result.returncode != 0 and "not inside a SLURM job" in result.stderr and calls == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_runs_nothing(tmp_path, script):
  result, calls = _launch(tmp_path, script, "--help")
  assert result.returncode == 0 and result.stdout.startswith("Usage:") and calls == []
  assert "--dry-run" in result.stdout


@pytest.mark.parametrize("script, message", [
    ("tpu_create.sh", "missing required --name (or TPU_NAME), --zone (or ZONE)"),
    ("tpu_setup.sh", "missing required --name (or TPU_NAME), --zone (or ZONE)"),
    ("tpu_run.sh", "missing required --name (or TPU_NAME), --zone (or ZONE), --config, --workdir"),
    ("tpu_delete.sh", "missing required --name (or TPU_NAME), --zone (or ZONE)"),
    ("gpu_single_node.sh", "missing required --config, --workdir"),
    ("gpu_multinode.sh", "missing required --coordinator (or COORDINATOR), --num-nodes (or "
     "NUM_NODES), --node-rank (or NODE_RANK), --config, --workdir"),
    ("slurm_submit.sh", "missing required --config, --workdir"),
    ("slurm_multinode.sbatch", "missing required --config, --workdir"),
])
def test_missing_arguments_stop_with_a_message(tmp_path, script, message):
  result, calls = _launch(tmp_path, script, "--dry-run")
  assert result.returncode == 2 and f"error: {message}; see --help" in result.stderr
  assert calls == [] and result.stdout == ""


@pytest.mark.parametrize("script, args, message", [
    ("tpu_create.sh", ["--name=t", "--zone"], "--zone needs a value"),
    ("tpu_create.sh", ["--name=t", "--zone=z", "--reserved"], "only apply with --queued"),
    ("tpu_run.sh", ["--name=t", "--zone=z", "--config=c", "--workdir=w", "--bogus"],
     "unknown argument '--bogus'"),
    ("tpu_run.sh", ["--name=t", "--zone=z", "--config=c", "--workdir=w", "--env=1X"],
     "--env needs KEY=VALUE"),
    ("slurm_submit.sh", ["--config=c", "--workdir=w", "--nodes=two"],
     "--nodes needs a positive integer"),
    ("gpu_single_node.sh", ["--config=c", "--workdir=w", "--gpus=all"], "--gpus needs GPU"),
    ("gpu_multinode.sh", ["--coordinator=10.0.0.1", "--num-nodes=2", "--node-rank=0",
                          "--config=c", "--workdir=w"], "--coordinator needs HOST:PORT"),
    ("gpu_multinode.sh", ["--coordinator=h:1", "--num-nodes=2", "--node-rank=2", "--config=c",
                          "--workdir=w"], "--node-rank 2 is not below --num-nodes 2"),
    ("gpu_multinode.sh", ["--coordinator=h:1", "--num-nodes=0", "--node-rank=0", "--config=c",
                          "--workdir=w"], "--num-nodes needs a positive integer"),
    ("gpu_multinode.sh", ["--coordinator=h:1", "--num-nodes=2", "--node-rank=0", "--config=c",
                          "--workdir=w", "--timeout=soon"], "--timeout needs a positive number"),
])
def test_bad_arguments_stop_with_a_message(tmp_path, script, args, message):
  result, calls = _launch(tmp_path, script, *args)
  assert result.returncode == 2 and message in result.stderr and calls == []


def _lib(tmp_path, code, *args, env=None):
  """Runs `code` in bash -euo pipefail after sourcing launch/lib.sh, with "$@" = args."""
  lib = os.path.join(LAUNCH, "lib.sh")
  script = f"set -euo pipefail\nsource {shlex.quote(lib)}\n{code}"
  return _bash(tmp_path, ["-c", script, "lib-test", *args], env=env)


# A script with every kind of parse_args table entry; prints what each variable got.
_PARSE = """
usage() { echo "usage text"; }
NAME=default; SWITCH=0; APT=1; ITEMS=(); OVERRIDES=()
OPTIONS=(--name NAME --switch SWITCH=1 --no-apt APT=0 --item ITEMS+ -- OVERRIDES)
parse_args "$@"
printf 'NAME=%s SWITCH=%s APT=%s DRY_RUN=%s\n' "$NAME" "$SWITCH" "$APT" "$DRY_RUN"
printf 'item:%s\n' "${ITEMS[@]+"${ITEMS[@]}"}"
printf 'pass:%s\n' "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
"""


def test_parse_args_sets_values_switches_lists_and_passes_main_py_flags_on(tmp_path):
  result, _ = _lib(tmp_path, _PARSE, "--name=a b", "--switch", "--item", "k=v", "--no-apt",
                   "--config.lr=0.1", "--item=x=y", "--dry-run", "--", "--name", "z", "--bogus")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      "NAME=a b SWITCH=1 APT=0 DRY_RUN=1", "item:k=v", "item:x=y",
      "pass:--config.lr=0.1", "pass:--name", "pass:z", "pass:--bogus"]
  result, _ = _lib(tmp_path, _PARSE)  # no arguments: every default stays
  assert result.stdout.splitlines() == ["NAME=default SWITCH=0 APT=1 DRY_RUN=0", "item:", "pass:"]
  result, _ = _lib(tmp_path, _PARSE, "--name", "later", "--name", "last")  # the last one wins
  assert result.stdout.splitlines()[0] == "NAME=last SWITCH=0 APT=1 DRY_RUN=0"


@pytest.mark.parametrize("args, rc, stdout, stderr", [
    (["--switch", "--help", "--bogus"], 0, "usage text\n", ""),
    (["-h"], 0, "usage text\n", ""),
    (["--bogus"], 2, "",
     "error: unknown argument '--bogus'; see --help (main.py flags go after --)\n"),
    (["--switch=1"], 2, "",
     "error: unknown argument '1'; see --help (main.py flags go after --)\n"),
    (["--name"], 2, "", "error: --name needs a value (e.g. --name=VALUE); see --help\n"),
    (["--name", "--switch"], 2, "",
     "error: --name needs a value (e.g. --name=VALUE); see --help\n"),
    (["--item="], 2, "", "error: --item needs a value (e.g. --item=VALUE); see --help\n"),
])
def test_parse_args_help_and_bad_arguments(tmp_path, args, rc, stdout, stderr):
  result, _ = _lib(tmp_path, _PARSE, *args)
  assert (result.returncode, result.stdout, result.stderr) == (rc, stdout, stderr)


def test_parse_args_without_main_py_flags_refuses_them(tmp_path):
  code = 'usage() { :; }\nX=""\nOPTIONS=(--x X)\nparse_args "$@"\necho "X=$X"'
  assert _lib(tmp_path, code, "--x=1")[0].stdout == "X=1\n"
  for word in ("--config.lr=0.1", "--"):
    result, _ = _lib(tmp_path, code, "--x=1", word)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: unknown argument '{word}'; see --help\n"


@pytest.mark.parametrize("code, stderr", [
    ('need_match --nodes 12 "$POSITIVE_INT" "a positive integer"', ""),
    ('need_match --nodes 012 "$POSITIVE_INT" "a positive integer"',
     "error: --nodes needs a positive integer; got '012'\n"),
    ('need_match --nodes 0 "$POSITIVE_INT" "a positive integer"',
     "error: --nodes needs a positive integer; got '0'\n"),
    ("need_match --env 'A=1 2' '^[A-Za-z_][A-Za-z0-9_]*=' KEY=VALUE", ""),
    ("need_match --env '1A=2' '^[A-Za-z_][A-Za-z0-9_]*=' KEY=VALUE",
     "error: --env needs KEY=VALUE; got '1A=2'\n"),
    ('need_gpu_list ""', ""),
    ("need_gpu_list 0,1,12", ""),
    ("need_gpu_list 0,,1", "error: --gpus needs GPU indices such as 0,1,2,3; got '0,,1'\n"),
    ("need_gpu_list all", "error: --gpus needs GPU indices such as 0,1,2,3; got 'all'\n"),
])
def test_need_match_and_need_gpu_list(tmp_path, code, stderr):
  result, _ = _lib(tmp_path, code + "\necho passed")
  assert result.stderr == stderr
  assert (result.returncode, result.stdout) == ((0, "passed\n") if not stderr else (2, ""))


def test_tpu_vm_options_read_the_environment_and_flags_win(tmp_path):
  code = ('usage() { :; }\nOPTIONS=(--spot SPOT=1)\nSPOT=0\ntpu_vm_options\nparse_args "$@"\n'
          'echo "$TPU_NAME|$ZONE|$PROJECT|$SPOT|${OPTIONS[*]}"')
  result, _ = _lib(tmp_path, code, "--zone=z2", "--spot",
                   env={"TPU_NAME": "e", "ZONE": "ez", "PROJECT": "ep"})
  assert result.stdout == "e|z2|ep|1|--spot SPOT=1 --name TPU_NAME --zone ZONE --project PROJECT\n"
  result, _ = _lib(tmp_path, code, "--name", "n", "--project=p", env={"TPU_NAME": "e"})
  assert result.stdout.startswith("n||p|0|")


@pytest.mark.parametrize("setting, extra, stdout, stderr", [
    ("TPU_NAME=t ZONE=z PROJECT=", "", "--zone=z\n", ""),
    ("TPU_NAME=t ZONE=z PROJECT=p", "", "--zone=z\n--project=p\n", ""),
    ("TPU_NAME=t ZONE=z PROJECT=p", '--config c --workdir ""', "",
     "error: missing required --workdir; see --help\n"),
    ("TPU_NAME= ZONE= PROJECT=p", '--config ""', "",
     "error: missing required --name (or TPU_NAME), --zone (or ZONE), --config; see --help\n"),
    ("TPU_NAME=t ZONE= PROJECT=", "", "", "error: missing required --zone (or ZONE); see --help\n"),
])
def test_require_tpu_vm_checks_the_name_and_sets_the_gcloud_location_flags(
    tmp_path, setting, extra, stdout, stderr):
  code = f'{setting}\nrequire_tpu_vm {extra}\nprintf "%s\\n" "${{GCLOUD_FLAGS[@]}}"'
  result, _ = _lib(tmp_path, code)
  assert (result.returncode, result.stdout, result.stderr) == (2 if stderr else 0, stdout, stderr)


def test_install_cuda_requirements_and_hint_cmd(tmp_path):
  install = ["python", "-m", "pip", "install", "-q", "-r", "requirements.txt",
             "jax[cuda13]==0.10.2"]
  result, calls = _lib(tmp_path, "install_cuda_requirements python")
  assert result.returncode == 0 and _printed(result.stdout) == [install] and calls == [install]
  result, calls = _lib(tmp_path, "install_cuda_requirements /venv/bin/python", env={"DRY_RUN": "1"})
  assert result.stdout == ("+ /venv/bin/python -m pip install -q -r requirements.txt "
                           "'jax[cuda13]==0.10.2'\n") and calls == []
  result, calls = _lib(tmp_path, "hint_cmd 'check with' gcloud x --zone=z '--command=tail -f a'")
  assert (result.returncode, result.stdout, calls) == (0, "", [])
  assert result.stderr == "check with\n  gcloud x --zone=z --command='tail -f a'\n"


def test_repo_root_is_found_from_any_folder(tmp_path):
  code = 'printf "%s|%s" "$REPO_ROOT" "$PWD"'
  result, _ = _lib(tmp_path, code)
  assert result.stdout == f"{REPO}|{tmp_path}"
  relative = os.path.relpath(os.path.join(LAUNCH, "lib.sh"), tmp_path)
  result, _ = _bash(tmp_path, ["-c", f"source {shlex.quote(relative)}; {code}"])
  assert result.stdout == f"{REPO}|{tmp_path}"  # and sourcing it left the folder alone


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_passes_on_every_script():
  files = [os.path.join(LAUNCH, name) for name in (*SCRIPTS, "lib.sh")]
  files += [os.path.join(FAKEBIN, name) for name in os.listdir(FAKEBIN)]
  result = subprocess.run(["shellcheck", "--external-sources", *files], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stdout
