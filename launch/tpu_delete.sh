#!/usr/bin/env bash
# Deletes a TPU VM, or a queued resource together with the VM it provisioned.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_delete.sh --name NAME --zone ZONE [--queued [--queued-id ID]] [options]

Deletes the TPU VM NAME without asking (billing stops once it is gone). With --queued, deletes the
queued resource (default name: NAME) and, with --force, the VM it provisioned, in one step: a
queued resource's VM cannot be deleted on its own.

Options (environment variable in brackets):
  --name NAME              TPU VM name [TPU_NAME] (required)
  --zone ZONE              [ZONE] (required)
  --project PROJECT        [PROJECT] (default: gcloud's configured one)
  --queued                 the VM came from `tpu_create.sh --queued`
  --queued-id ID           the queued resource's name (default: NAME)
  --dry-run                print the commands (one per line, "+ " first) and run nothing
  -h, --help               this text

Example:
  launch/tpu_delete.sh --name align-v5e --zone us-west4-a --queued
USAGE
}

QUEUED=0
QUEUED_ID=""

OPTIONS=(--queued QUEUED=1 --queued-id QUEUED_ID)
tpu_vm_options  # --name, --zone, --project
parse_args "$@"
require_tpu_vm
if [[ "$QUEUED" == 0 && -n "$QUEUED_ID" ]]; then
  die "--queued-id only applies with --queued"
fi

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "${QUEUED_ID:-$TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
    --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
fi
