#!/usr/bin/env bash
# Submits launch/slurm_multinode.sbatch: N nodes x G GPUs, one JAX process per node.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/slurm_submit.sh --config CONFIG --workdir DIR [options]
                              [--config.KEY=VALUE ...] [-- MORE main.py FLAGS]

Submits launch/slurm_multinode.sbatch with sbatch from the repository root: NODES nodes, one task
per node, GPUS GPUs per node; each task runs `python main.py ... --distributed` (see that file).
Job output goes to LOGDIR/JOBNAME-JOBID.out. DIR must be on a filesystem every node sees.

Options:
  --config CONFIG          config file[:variant], relative to the repository root (required)
  --workdir DIR            run folder on a shared filesystem (required)
  --config.KEY=VALUE       a config override, passed on to main.py (repeatable)
  --nodes N                nodes (default: 2)
  --gpus-per-node G        GPUs per node (default: 8)
  --partition P            SLURM partition (default: the cluster's)
  --account A              SLURM account (default: yours)
  --time T                 time limit, e.g. 24:00:00 (default: 24:00:00)
  --job-name NAME          (default: align_jax)
  --log-dir LOGDIR         folder for the job output (default: logs, in the repository root)
  --python PYTHON          interpreter on the nodes, e.g. a shared venv [PYTHON] (default: python3)
  --install                first `PYTHON -m pip install -r requirements.txt 'jax[cuda13]==0.10.2'`
                           here (into the shared env the nodes use)
  --dry-run                print the commands (one per line, "+ " first) and run nothing
  -h, --help               this text

Example (2 nodes x 8 GPUs):
  launch/slurm_submit.sh --nodes 2 --gpus-per-node 8 --partition gpu \
    --python /shared/venvs/align_jax/bin/python --config configs/demo.py \
    --workdir /shared/runs/demo --config.batch_size=16384
USAGE
}

CONFIG=""
WORKDIR=""
NODES=2
GPUS_PER_NODE=8
PARTITION=""
ACCOUNT=""
TIME_LIMIT="24:00:00"
JOB_NAME="align_jax"
LOG_DIR="logs"
PYTHON=${PYTHON:-python3}
INSTALL=0
OVERRIDES=()

OPTIONS=(--config CONFIG --workdir WORKDIR --nodes NODES --gpus-per-node GPUS_PER_NODE
         --partition PARTITION --account ACCOUNT --time TIME_LIMIT --job-name JOB_NAME
         --log-dir LOG_DIR --python PYTHON --install INSTALL=1 -- OVERRIDES)
parse_args "$@"
require "--config" "$CONFIG" "--workdir" "$WORKDIR"
need_match --nodes "$NODES" "$POSITIVE_INT" "a positive integer"
need_match --gpus-per-node "$GPUS_PER_NODE" "$POSITIVE_INT" "a positive integer"
cd "$REPO_ROOT"

if [[ "$INSTALL" == 1 ]]; then
  install_cuda_requirements "$PYTHON"
fi
slurm=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node=1
       --gpus-per-node="$GPUS_PER_NODE" --time="$TIME_LIMIT" --output="$LOG_DIR/%x-%j.out")
if [[ -n "$PARTITION" ]]; then
  slurm+=(--partition="$PARTITION")
fi
if [[ -n "$ACCOUNT" ]]; then
  slurm+=(--account="$ACCOUNT")
fi
run mkdir -p "$LOG_DIR"
job_args=(--config="$CONFIG" --workdir="$WORKDIR" --python="$PYTHON")
if ((${#OVERRIDES[@]})); then
  job_args+=(-- "${OVERRIDES[@]}")
fi
run sbatch "${slurm[@]}" launch/slurm_multinode.sbatch "${job_args[@]}"
