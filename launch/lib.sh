# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).
#
# Every command a script runs goes through `run`, which prints it as one line
#   + gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b ...
# (arguments quoted only where a shell needs it, so the line can be pasted back) and runs it,
# unless DRY_RUN=1 (--dry-run), where it only prints. Errors go to stderr as "error: ..." with
# exit status 2.

DRY_RUN=${DRY_RUN:-0}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

warn() {
  printf 'warning: %s\n' "$*" >&2
}

# Quotes one word for a POSIX shell, leaving plain words (flags, paths, key=value) readable.
quote() {
  local word=$1
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  elif [[ "$word" =~ ^(--[A-Za-z0-9.-]+=)(.+)$ ]]; then  # --flag='some value'
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Joins words into one shell command line (for `--command=` on the remote side).
join_command() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

print_cmd() {
  printf '+ %s\n' "$(join_command "$@")"
}

# Prints a command and runs it (prints only, with --dry-run).
run() {
  print_cmd "$@"
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  "$@"
}

# Like run, but copies the command's output (stdout and stderr) to the log file $1 as it streams.
run_logged() {
  local log=$1
  shift
  printf '+ %s 2>&1 | tee -a %s\n' "$(join_command "$@")" "$(quote "$log")"
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  mkdir -p "$(dirname "$log")"
  "$@" 2>&1 | tee -a "$log"
}

# Lists this machine's NVIDIA GPUs (the query is printed; with --dry-run nothing is checked) and
# stops with one line if there is no driver or no GPU. For the GPU launch scripts.
check_gpus() {
  if [[ "$DRY_RUN" == 0 ]] && ! command -v nvidia-smi > /dev/null; then
    die "nvidia-smi not found: this machine has no NVIDIA driver (or it is not on PATH)"
  fi
  local query=(nvidia-smi "--query-gpu=index,name,memory.total" "--format=csv,noheader")
  print_cmd "${query[@]}"
  if [[ "$DRY_RUN" == 0 ]]; then
    local gpu_list
    gpu_list=$("${query[@]}") || die "nvidia-smi failed: is the NVIDIA driver loaded?"
    printf '%s\n' "$gpu_list"
    if ! grep -q '^[0-9]' <<< "$gpu_list"; then
      die "nvidia-smi lists no GPUs"
    fi
  fi
}

# Runs a command on the GPUs listed in $1 (comma-separated; "" = all), with its output also
# appended to the log file $2 when one is given. For the GPU launch scripts.
run_on_gpus() {
  local gpus=$1 log=$2
  shift 2
  local cmd=("$@")
  if [[ -n "$gpus" ]]; then
    cmd=(env CUDA_VISIBLE_DEVICES="$gpus" "${cmd[@]}")
  fi
  if [[ -n "$log" ]]; then
    run_logged "$log" "${cmd[@]}"
  else
    run "${cmd[@]}"
  fi
}

# Dies unless option $1 got a value ($2), e.g. `--zone) need_value "$@"; ZONE=$2; shift 2 ;;`.
need_value() {
  if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
    die "$1 needs a value (e.g. $1=VALUE); see --help"
  fi
}

# Splits "--opt=value" into "--opt" "value" (before a "--"; "--config.*" overrides stay whole),
# into the array ARGS, so the scripts' option loops only handle the "--opt value" form.
split_args() {
  ARGS=()
  while (($#)); do
    case "$1" in
      --) ARGS+=("$@"); return 0 ;;
      --config.*) ARGS+=("$1") ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# Dies naming every required setting that is empty: require "--zone (or ZONE)" "$ZONE" ...
require() {
  local missing=()
  while (($#)); do
    if [[ -z "$2" ]]; then
      missing+=("$1")
    fi
    shift 2
  done
  if ((${#missing[@]})); then
    local text
    text=$(printf '%s, ' "${missing[@]}")
    die "missing required ${text%, }; see --help"
  fi
}

# The gcloud spelling of a Cloud TPU type: v5e-N is called v5litepod-N by the TPU API.
gcloud_accelerator_type() {
  local type=$1
  if [[ "$type" == v5e-* ]]; then
    type="v5litepod-${type#v5e-}"
  fi
  printf '%s' "$type"
}

# The TPU VM software version that goes with an accelerator type (Cloud TPU docs, 2025).
default_runtime_version() {
  case "$1" in
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) printf 'tpu-ubuntu2204-base' ;;  # v2, v3, v4
  esac
}
