#!/usr/bin/env bash
# Trains on several GPU machines without SLURM: run this on every node, one JAX process per node.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_multinode.sh --coordinator HOST:PORT --num-nodes N --node-rank I
                               --config CONFIG --workdir DIR [options]
                               [--config.KEY=VALUE ...] [-- MORE main.py FLAGS]

Run the same command on every node (by ssh, pdsh, a Kubernetes pod spec, ...), changing only
--node-rank. Each node checks its GPUs with nvidia-smi, optionally installs the requirements and
jax[cuda13]==0.10.2, then runs
  python main.py --config=CONFIG --workdir=DIR --coordinator_address=HOST:PORT \
    --num_processes=N --process_id=I ...
from the repository root: one JAX process per node drives all of that node's GPUs, and the mesh
spans every GPU of every node. Node 0 runs the coordinator: HOST is an address of node 0 that
every node can reach, PORT a free TCP port there. If a node does not connect within --timeout
seconds, every process stops with one line saying which. DIR must be one folder every node sees
at the same path (NFS or another shared filesystem); running the same commands again resumes.

Options (environment variable in brackets):
  --coordinator HOST:PORT  node 0's address and a free port, the same on every node [COORDINATOR]
  --num-nodes N            number of nodes (processes) [NUM_NODES]
  --node-rank I            this node's index, 0 .. N-1; 0 runs the coordinator [NODE_RANK]
  --config CONFIG          config file[:variant], relative to the repository root (required)
  --workdir DIR            run folder on a shared filesystem (required)
  --config.KEY=VALUE       a config override, passed on to main.py (repeatable)
  --python PYTHON          interpreter with the requirements installed [PYTHON] (default: python3)
  --install                first `PYTHON -m pip install -r requirements.txt 'jax[cuda13]==0.10.2'`
  --gpus LIST              use only these GPUs of the node (sets CUDA_VISIBLE_DEVICES), e.g. 0,1
  --timeout SECONDS        how long to wait for every node to connect (default: 300)
  --log FILE               also append the output to FILE
  --dry-run                print the commands (one per line, "+ " first) and run nothing
  -h, --help               this text

Example, two nodes with 8 GPUs each (node 0 is 10.0.0.1):
  node0$ launch/gpu_multinode.sh --coordinator 10.0.0.1:8476 --num-nodes 2 --node-rank 0 \
           --config configs/demo.py --workdir /shared/runs/demo --config.batch_size=16384
  node1$ launch/gpu_multinode.sh --coordinator 10.0.0.1:8476 --num-nodes 2 --node-rank 1 \
           --config configs/demo.py --workdir /shared/runs/demo --config.batch_size=16384
USAGE
}

COORDINATOR=${COORDINATOR:-}
NUM_NODES=${NUM_NODES:-}
NODE_RANK=${NODE_RANK:-}
CONFIG=""
WORKDIR=""
PYTHON=${PYTHON:-python3}
INSTALL=0
GPUS=""
TIMEOUT=""
LOG=""
OVERRIDES=()

OPTIONS=(--coordinator COORDINATOR --num-nodes NUM_NODES --node-rank NODE_RANK --config CONFIG
         --workdir WORKDIR --python PYTHON --install INSTALL=1 --gpus GPUS --timeout TIMEOUT
         --log LOG -- OVERRIDES)
parse_args "$@"
need_gpu_list "$GPUS"
require "--coordinator (or COORDINATOR)" "$COORDINATOR" "--num-nodes (or NUM_NODES)" "$NUM_NODES" \
  "--node-rank (or NODE_RANK)" "$NODE_RANK" "--config" "$CONFIG" "--workdir" "$WORKDIR"
need_match --coordinator "$COORDINATOR" '^([^:]+|\[[0-9A-Fa-f:]+\]):[0-9]+$' \
  "HOST:PORT (node 0's address and a free port, e.g. 10.0.0.1:8476)"
need_match --num-nodes "$NUM_NODES" "$POSITIVE_INT" "a positive integer"
need_match --node-rank "$NODE_RANK" '^[0-9]+$' "an integer 0 .. N-1"
if ((NODE_RANK >= NUM_NODES)); then
  die "--node-rank $NODE_RANK is not below --num-nodes $NUM_NODES (ranks are 0 .. $((NUM_NODES - 1)))"
fi
if [[ -n "$TIMEOUT" ]]; then
  need_match --timeout "$TIMEOUT" "$POSITIVE_INT" "a positive number of seconds"
fi
cd "$REPO_ROOT"

check_gpus
if [[ "$INSTALL" == 1 ]]; then
  install_cuda_requirements "$PYTHON"
fi
train=("$PYTHON" main.py --config="$CONFIG" --workdir="$WORKDIR"
       --coordinator_address="$COORDINATOR" --num_processes="$NUM_NODES"
       --process_id="$NODE_RANK")
if [[ -n "$TIMEOUT" ]]; then
  train+=(--initialization_timeout="$TIMEOUT")
fi
train+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
run_on_gpus "$GPUS" "$LOG" "${train[@]}"
