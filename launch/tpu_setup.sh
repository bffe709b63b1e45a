#!/usr/bin/env bash
# Ships the code to every worker of a TPU VM and installs it with jax[tpu] in a virtual env.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_setup.sh --name NAME --zone ZONE [options]

On every worker of the TPU VM (--worker=all): installs Python 3.11 (TPU VM images ship 3.10 and
the pinned requirements need 3.11), creates the virtual env ~/align_jax_venv, puts the code in
~/align_jax and installs requirements.txt plus jax[tpu]==0.10.2. Run it again after changing the
code: it replaces ~/align_jax and reinstalls (fast when nothing changed).

Where the code comes from:
  (default)                this checkout's git HEAD, as a tarball (`git archive HEAD`) copied to
                           every worker; commit first: uncommitted changes are not shipped
  --git-url URL            `git clone` URL on every worker instead (the workers need access)
  --branch BRANCH          with --git-url: the branch or tag to check out (default: main)

Options (environment variable in brackets):
  --name NAME              TPU VM name [TPU_NAME] (required)
  --zone ZONE              [ZONE] (required)
  --project PROJECT        [PROJECT] (default: gcloud's configured one)
  --tarball PATH           where the local tarball is written (default: $TMPDIR or /tmp,
                           align_jax-src.tar.gz)
  --python PYTHON          the workers' interpreter (default: python3.11)
  --no-apt                 do not apt-get install the interpreter (it is already there)
  --dry-run                print the commands (one per line, "+ " first) and run nothing
  -h, --help               this text

Example:
  launch/tpu_setup.sh --name align-v4 --zone us-central2-b
EOF
}

GIT_URL=""
BRANCH="main"
TARBALL="${TMPDIR:-/tmp}/align_jax-src.tar.gz"
PYTHON_BIN="python3.11"
APT=1

OPTIONS=(--git-url GIT_URL --branch BRANCH --tarball TARBALL --python PYTHON_BIN --no-apt APT=0)
tpu_vm_options  # --name, --zone, --project
parse_args "$@"
require_tpu_vm

# The remote steps, joined with && so the first failure stops that worker (paths are relative to
# the home directory, where ssh starts).
steps=("set -e")
if [[ "$APT" == 1 ]]; then
  steps+=("sudo apt-get update -qq" "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(
    quote "$PYTHON_BIN") $(quote "$PYTHON_BIN-venv")")
fi
steps+=("$(join_command "$PYTHON_BIN" -m venv align_jax_venv)" "rm -rf align_jax")
if [[ -z "$GIT_URL" ]]; then
  if [[ "$DRY_RUN" == 0 && -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]
  then
    warn "uncommitted changes in $REPO_ROOT are not shipped (the tarball is git HEAD)"
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$TARBALL" HEAD
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:align_jax-src.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  steps+=("mkdir -p align_jax" "tar -xzf align_jax-src.tar.gz -C align_jax")
else
  steps+=("$(join_command git clone --depth=1 --branch="$BRANCH" "$GIT_URL" align_jax)")
fi
steps+=("align_jax_venv/bin/pip install -q --upgrade pip"
        "$(join_command align_jax_venv/bin/pip install -q -r align_jax/requirements.txt "$JAX_TPU")"
        "cd align_jax"
        "../align_jax_venv/bin/python -c 'import align_jax, jax; print(jax.__version__)'")
remote=$(printf '%s && ' "${steps[@]}")
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all \
  --command="${remote% && }"
