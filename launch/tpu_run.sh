#!/usr/bin/env bash
# Runs training on every worker of a TPU VM at once, streaming the output into a local log file.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_run.sh --name NAME --zone ZONE --config CONFIG --workdir DIR [options]
                         [--config.KEY=VALUE ...] [-- MORE main.py FLAGS]

Runs `python main.py --config=CONFIG --workdir=DIR --distributed ...` on every worker of the TPU
VM at the same time (gcloud ... ssh --worker=all), in the env and code tpu_setup.sh installed.
Each worker is one JAX process: --distributed makes main.py call jax.distributed.initialize(),
which finds the other workers from the TPU metadata. The output of all workers streams here and
is appended to a local log file. Running the same command again resumes from DIR's checkpoint.

DIR must be one directory that every worker sees at the same path (a Filestore/NFS or gcsfuse
mount), since checkpoints are written by all workers; keep it outside ~/align_jax, which
tpu_setup.sh replaces. A relative DIR is relative to ~/align_jax.

Options (environment variable in brackets):
  --name NAME              TPU VM name [TPU_NAME] (required)
  --zone ZONE              [ZONE] (required)
  --project PROJECT        [PROJECT] (default: gcloud's configured one)
  --config CONFIG          config file[:variant], relative to the repo, e.g. configs/demo.py
                           (required)
  --workdir DIR            run folder on the workers (required)
  --config.KEY=VALUE       a config override, passed on to main.py (repeatable)
  --env KEY=VALUE          environment variable for main.py on the workers (repeatable), e.g.
                           --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true
  --log FILE               local log file (default: logs/tpu_run-NAME-DATE.log)
  --detach                 start in the background on the workers (survives this ssh session)
                           with output in ~/align_jax_run.log on each worker, and return
  --dry-run                print the commands (one per line, "+ " first) and run nothing
  -h, --help               this text

Example:
  launch/tpu_run.sh --name align-v4 --zone us-central2-b --config configs/demo.py \
    --workdir /mnt/shared/runs/demo --config.batch_size=4096
EOF
}

CONFIG=""
WORKDIR=""
LOG=""
DETACH=0
ENVS=()
OVERRIDES=()

OPTIONS=(--config CONFIG --workdir WORKDIR --env ENVS+ --log LOG --detach DETACH=1 -- OVERRIDES)
tpu_vm_options  # --name, --zone, --project
parse_args "$@"
for env in "${ENVS[@]+"${ENVS[@]}"}"; do
  need_match --env "$env" '^[A-Za-z_][A-Za-z0-9_]*=' KEY=VALUE
done
require_tpu_vm "--config" "$CONFIG" "--workdir" "$WORKDIR"
LOG=${LOG:-logs/tpu_run-$TPU_NAME-$(date +%Y%m%d-%H%M%S).log}

train=(../align_jax_venv/bin/python main.py --config="$CONFIG" --workdir="$WORKDIR" --distributed
       "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
if ((${#ENVS[@]})); then
  train=(env "${ENVS[@]}" "${train[@]}")
fi
if [[ "$DETACH" == 1 ]]; then
  remote="cd align_jax && nohup $(join_command "${train[@]}") > ../align_jax_run.log 2>&1"
  remote+=" < /dev/null &"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all \
    --command="$remote"
  hint_cmd "started in the background; follow worker 0 with" \
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=0 \
    --command="tail -n 100 -f align_jax_run.log"
else
  remote="cd align_jax && $(join_command "${train[@]}")"
  run_logged "$LOG" gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all \
    --command="$remote"
fi
