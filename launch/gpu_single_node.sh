#!/usr/bin/env bash
# Trains on one machine with one or more NVIDIA GPUs: one process drives every local GPU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_single_node.sh --config CONFIG --workdir DIR [options]
                                 [--config.KEY=VALUE ...] [-- MORE main.py FLAGS]

Checks the GPUs with nvidia-smi, optionally installs the requirements and jax[cuda13]==0.10.2,
then runs `python main.py --config=CONFIG --workdir=DIR ...` from the repository root. One JAX
process sees all local GPUs, so no --distributed is needed; the mesh spans every visible GPU.
Running the same command again resumes from DIR's latest checkpoint.

Options (environment variable in brackets):
  --config CONFIG          config file[:variant], relative to the repository root (required)
  --workdir DIR            run folder (required)
  --config.KEY=VALUE       a config override, passed on to main.py (repeatable)
  --python PYTHON          interpreter with the requirements installed [PYTHON] (default: python3)
  --install                first `PYTHON -m pip install -r requirements.txt 'jax[cuda13]==0.10.2'`
  --gpus LIST              use only these GPUs (sets CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3
  --log FILE               also append the output to FILE
  --dry-run                print the commands (one per line, "+ " first) and run nothing
  -h, --help               this text

Example:
  launch/gpu_single_node.sh --install --config configs/demo.py --workdir /tmp/align_demo \
    --config.batch_size=4096
USAGE
}

CONFIG=""
WORKDIR=""
PYTHON=${PYTHON:-python3}
INSTALL=0
GPUS=""
LOG=""
OVERRIDES=()

OPTIONS=(--config CONFIG --workdir WORKDIR --python PYTHON --install INSTALL=1 --gpus GPUS
         --log LOG -- OVERRIDES)
parse_args "$@"
need_gpu_list "$GPUS"
require "--config" "$CONFIG" "--workdir" "$WORKDIR"
cd "$REPO_ROOT"

check_gpus
if [[ "$INSTALL" == 1 ]]; then
  install_cuda_requirements "$PYTHON"
fi
train=("$PYTHON" main.py --config="$CONFIG" --workdir="$WORKDIR"
       "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
run_on_gpus "$GPUS" "$LOG" "${train[@]}"
