#!/usr/bin/env bash
# Creates a Cloud TPU VM: one host or a pod slice; on-demand, spot, or through a queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_create.sh --name NAME --zone ZONE [options]

Creates a Cloud TPU VM (a single host such as v5litepod-8, or a pod slice such as v4-32 or
v5litepod-256, whose workers all run the same program).

Options (environment variable in brackets):
  --name NAME              TPU VM name [TPU_NAME] (required)
  --zone ZONE              e.g. us-central2-b (v4), us-west4-a (v5e) [ZONE] (required)
  --project PROJECT        Google Cloud project [PROJECT] (default: gcloud's configured one)
  --accelerator-type TYPE  v4-32, v5litepod-256 (v5e-256 is accepted), v5p-128, v6e-64, ...
                           [ACCELERATOR_TYPE] (default: v5litepod-8)
  --runtime-version V      TPU VM software version [RUNTIME_VERSION] (default from the type:
                           v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                           v6e v2-alpha-tpuv6e)
  --spot                   spot capacity: much cheaper, can be preempted at any time
  --queued                 request through a queued resource (waits for capacity instead of
                           failing); see `gcloud compute tpus queued-resources list`
  --queued-id ID           the queued resource's name (default: NAME)
  --reserved               (queued) use the project's reservation
  --valid-until DURATION   (queued) give up if not provisioned within DURATION, e.g. 6h
  --dry-run                print the commands (one per line, "+ " first) and run nothing
  -h, --help               this text

Examples:
  launch/tpu_create.sh --name align-v4 --zone us-central2-b --accelerator-type v4-32
  launch/tpu_create.sh --name align-v5e --zone us-west4-a --accelerator-type v5e-256 --spot --queued
EOF
}

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=0
QUEUED=0
QUEUED_ID=""
RESERVED=0
VALID_UNTIL=""

OPTIONS=(--accelerator-type ACCELERATOR_TYPE --runtime-version RUNTIME_VERSION --spot SPOT=1
         --queued QUEUED=1 --queued-id QUEUED_ID --reserved RESERVED=1 --valid-until VALID_UNTIL)
tpu_vm_options  # --name, --zone, --project
parse_args "$@"
require_tpu_vm
ACCELERATOR_TYPE=$(gcloud_accelerator_type "$ACCELERATOR_TYPE")
RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
if [[ "$QUEUED" == 0 && ( -n "$QUEUED_ID" || "$RESERVED" == 1 || -n "$VALID_UNTIL" ) ]]; then
  die "--queued-id, --reserved and --valid-until only apply with --queued"
fi
if [[ "$SPOT" == 1 && "$RESERVED" == 1 ]]; then
  die "--spot and --reserved exclude each other: pick one"
fi

capacity=()
if [[ "$SPOT" == 1 ]]; then
  capacity+=(--spot)
fi

if [[ "$QUEUED" == 1 ]]; then
  if [[ "$RESERVED" == 1 ]]; then
    capacity+=(--reserved)
  fi
  if [[ -n "$VALID_UNTIL" ]]; then
    capacity+=(--valid-until-duration="$VALID_UNTIL")
  fi
  run gcloud compute tpus queued-resources create "${QUEUED_ID:-$TPU_NAME}" \
    --node-id="$TPU_NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${capacity[@]+"${capacity[@]}"}"
  hint_cmd "queued: the VM exists once its state is ACTIVE; check with" \
    gcloud compute tpus queued-resources describe "${QUEUED_ID:-$TPU_NAME}" "${GCLOUD_FLAGS[@]}"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    "${capacity[@]+"${capacity[@]}"}"
fi
