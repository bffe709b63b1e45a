# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).
#
# Every command a script runs goes through `run`, which prints it as one line
#   + gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b ...
# (arguments quoted only where a shell needs it, so the line can be pasted back) and runs it,
# unless DRY_RUN=1 (--dry-run), where it only prints. Errors go to stderr as "error: ..." with
# exit status 2. A script lists its options once, in the table OPTIONS, and `parse_args` reads the
# command line by it (every script's --dry-run, --help, --opt=value and main.py pass-through
# handled here, the same way).

DRY_RUN=${DRY_RUN:-0}
# shellcheck disable=SC2034  # constants read by the scripts that source this file
{
  # The repository root (lib.sh is launch/lib.sh): the GPU and SLURM scripts run from there.
  REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  # The jax builds installed next to requirements.txt (GPU nodes, TPU workers).
  JAX_CUDA="jax[cuda13]==0.10.2"
  JAX_TPU="jax[tpu]==0.10.2"
  # For need_match: a value that must be a positive integer.
  POSITIVE_INT='^[1-9][0-9]*$'
}

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

# Dies unless option $1 got a value ($2): `need_value "$@"` with the option first.
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

# Reads the command line ("$@") by the table OPTIONS, which pairs each flag with what it sets:
#   --zone ZONE       takes a value (--zone VALUE or --zone=VALUE) and sets ZONE to it
#   --spot SPOT=1     a switch: sets SPOT to 1 (--no-apt APT=0 sets APT to 0)
#   --env ENVS+       takes a value and appends it to the array ENVS (repeatable)
#   -- OVERRIDES      the script passes flags on to main.py: every --config.KEY=VALUE, and all
#                     the words after "--", are appended to the array OVERRIDES
# Every script also takes --dry-run (sets DRY_RUN=1) and -h/--help (prints the script's `usage`
# and exits 0). Anything else stops with "unknown argument".
parse_args() {
  local pass_on="" target i
  for ((i = 0; i < ${#OPTIONS[@]}; i += 2)); do
    if [[ "${OPTIONS[i]}" == -- ]]; then
      pass_on=${OPTIONS[i + 1]}
    fi
  done
  split_args "$@"
  set -- "${ARGS[@]+"${ARGS[@]}"}"
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1; shift; continue ;;
      -h | --help) usage; exit 0 ;;
    esac
    if [[ -n "$pass_on" && "$1" == --config.* ]]; then
      eval "$pass_on+=(\"\$1\")"  # the array named in the table; $1 itself is not evaluated
      shift
      continue
    elif [[ -n "$pass_on" && "$1" == -- ]]; then
      shift
      eval "$pass_on+=(\"\$@\")"
      return 0
    fi
    target=""
    for ((i = 0; i < ${#OPTIONS[@]}; i += 2)); do
      if [[ "${OPTIONS[i]}" == "$1" ]]; then
        target=${OPTIONS[i + 1]}
        break
      fi
    done
    case "$target" in
      "") die "unknown argument '$1'; see --help${pass_on:+ (main.py flags go after --)}" ;;
      *=*) printf -v "${target%%=*}" '%s' "${target#*=}"; shift ;;
      *+) need_value "$@"; eval "${target%+}+=(\"\$2\")"; shift 2 ;;
      *) need_value "$@"; printf -v "$target" '%s' "$2"; shift 2 ;;
    esac
  done
}

# Dies unless the value $2 of option $1 matches the regular expression $3; $4 says what it needs:
# need_match --gpus "$GPUS" '^[0-9]+(,[0-9]+)*$' "GPU indices such as 0,1,2,3".
need_match() {
  if [[ ! "$2" =~ $3 ]]; then
    die "$1 needs $4; got '$2'"
  fi
}

# For the GPU scripts: dies unless the --gpus value $1 is empty (all GPUs) or a list of indices.
need_gpu_list() {
  if [[ -n "$1" ]]; then
    need_match --gpus "$1" '^[0-9]+(,[0-9]+)*$' "GPU indices such as 0,1,2,3"
  fi
}

# Installs requirements.txt and jax for CUDA ($JAX_CUDA) with the interpreter $1, from the
# repository root (the GPU and SLURM scripts' --install).
install_cuda_requirements() {
  run "$1" -m pip install -q -r requirements.txt "$JAX_CUDA"
}

# Prints what to run next to stderr: the line $1, then the command $2... indented, ready to paste.
hint_cmd() {
  printf '%s\n  %s\n' "$1" "$(join_command "${@:2}")" >&2
}

# For the tpu_*.sh scripts: adds the options that name the TPU VM to OPTIONS: --name, --zone and
# --project, whose defaults are the environment variables TPU_NAME, ZONE and PROJECT.
tpu_vm_options() {
  TPU_NAME=${TPU_NAME:-}
  ZONE=${ZONE:-}
  PROJECT=${PROJECT:-}
  OPTIONS+=(--name TPU_NAME --zone ZONE --project PROJECT)
}

# For the tpu_*.sh scripts: dies unless the TPU VM is named (--name or TPU_NAME, --zone or ZONE;
# further required settings as for `require`), then sets GCLOUD_FLAGS to the location flags every
# gcloud call about it takes: --zone=ZONE, and --project=PROJECT when one is given.
# shellcheck disable=SC2120  # most scripts need no further settings
require_tpu_vm() {
  require "--name (or TPU_NAME)" "$TPU_NAME" "--zone (or ZONE)" "$ZONE" "$@"
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    GCLOUD_FLAGS+=(--project="$PROJECT")
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
