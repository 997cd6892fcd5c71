# shellcheck shell=bash disable=SC2034
# (SC2034: MOE_DIST_ARGS and MOE_DIST_TORCHRUN are set here for the scripts that source this file.)
# Helpers sourced by the launch scripts (not run on its own).
#
# Environment the runtime needs, set by moe_dist_setup_env:
#   NCCL_NVLS_ENABLE=0                 always: NVLink multicast (NVLS) must stay off; NCCL, torch
#   TORCH_SYMM_MEM_DISABLE_MULTICAST=1 symmetric memory and NVSHMEM each have their own switch, and
#   NVSHMEM_DISABLE_NVLS=1             all three are forced, whatever the caller set.
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  default: a failed or stuck collective aborts the job
#                                      instead of hanging it (the runtime's "never an endless hang").
#   NVSHMEM_SYMMETRIC_SIZE=2G          default: NVSHMEM's symmetric heap per PE; the token buffers
#                                      of the nvshmem transport live there. Raise it for big batches.
#   OMP_NUM_THREADS                    default: CPU cores / processes on this node (at least 1), so
#                                      the CPU (gloo) path neither oversubscribes nor idles cores.
#   PYTHONPATH                         the repository root is prepended, so a fresh clone runs
#                                      without `pip install`.
#   NCCL_DEBUG, MOE_DIST_NVSHMEM_BOOTSTRAP (mpi|uid), other NCCL_* / NVSHMEM_*: passed through
#                                      untouched when set.
#
# Launcher options (before the trainer's own arguments; `--` ends them):
#   --dry-run   print the final command, with its environment assignments, instead of running it
#               (also DRY_RUN=1)
#   -h, --help  print the calling script's header comment
#
# Overridable by environment: PYTHON (python3), MODULE (moe_dist.lm.train), TORCHRUN (default
# "$PYTHON -m torch.distributed.run", which is torchrun run by the same interpreter, so a
# virtualenv's torch is the one used).

# The repository root is the parent of launch/.
MOE_DIST_ROOT="${MOE_DIST_ROOT:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
case "${DRY_RUN:-0}" in
  1 | true | yes) MOE_DIST_DRY_RUN=1 ;;
  *) MOE_DIST_DRY_RUN=0 ;;
esac
MOE_DIST_ARGS=()

if [[ -z ${PYTHON:-} ]]; then
  if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
MODULE="${MODULE:-moe_dist.lm.train}"

moe_dist_die() {
  echo "$(basename -- "$0"): error: $*" >&2
  exit 2
}

moe_dist_usage() {
  # The script's header: the comment lines after the shebang, up to the first other line.
  sed -n '2,/^[^#]/{/^#!/d;/^#SBATCH/d;/^# shellcheck/d;/^#/s/^# \{0,1\}//p}' "$0"
}

# Strips the launcher's own leading options; what is left is in MOE_DIST_ARGS.
moe_dist_parse_args() {
  while (($#)); do
    case $1 in
      --dry-run) MOE_DIST_DRY_RUN=1; shift ;;
      -h | --help) moe_dist_usage; exit 0 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  MOE_DIST_ARGS=("$@")
}

moe_dist_require_posint() { # name value
  [[ $2 =~ ^[1-9][0-9]*$ ]] || moe_dist_die "$1 must be a positive integer, got '$2'"
}

# GPUs this node's processes can use: `nvidia-smi -L` lines (MIG instances are indented and not
# counted), narrowed by CUDA_VISIBLE_DEVICES when that is set; 0 without a driver.
moe_dist_gpu_count() {
  local n=0 visible
  if command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    [[ $n =~ ^[0-9]+$ ]] || n=0
  fi
  if ((n > 0)) && [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    visible=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c '[^[:space:]]' || true)
    ((visible < n)) && n=$visible
  fi
  echo "$n"
}

moe_dist_cpu_count() {
  nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1
}

moe_dist_setup_env() { # processes on this node
  local local_procs=${1:-1} cores
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NVSHMEM_SYMMETRIC_SIZE="${NVSHMEM_SYMMETRIC_SIZE:-2G}"
  if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    cores=$(moe_dist_cpu_count)
    OMP_NUM_THREADS=$((cores / local_procs))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
  fi
  export OMP_NUM_THREADS
  export PYTHONPATH="$MOE_DIST_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  # Passthrough: exported only when the caller set them, so mpirun's -x can forward them.
  if [[ -n ${NCCL_DEBUG:-} ]]; then export NCCL_DEBUG; fi
  if [[ -n ${MOE_DIST_NVSHMEM_BOOTSTRAP:-} ]]; then
    case $MOE_DIST_NVSHMEM_BOOTSTRAP in
      mpi | uid) export MOE_DIST_NVSHMEM_BOOTSTRAP ;;
      *) moe_dist_die "MOE_DIST_NVSHMEM_BOOTSTRAP must be 'mpi' or 'uid'," \
        "got '$MOE_DIST_NVSHMEM_BOOTSTRAP'" ;;
    esac
  fi
}

# Names of the variables the launched processes need from us: the ones set above, then every
# exported NCCL_* / NVSHMEM_* / TORCH_NCCL_* / TORCH_SYMM_MEM_* / MOE_DIST_* variable, then any
# extra names given as arguments (those only when set).
moe_dist_env_names() {
  local fixed=(NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS
    TORCH_NCCL_ASYNC_ERROR_HANDLING NVSHMEM_SYMMETRIC_SIZE OMP_NUM_THREADS PYTHONPATH)
  local name passthrough
  passthrough=$(compgen -e | LC_ALL=C sort |
    grep -E '^(NCCL_|NVSHMEM_|TORCH_NCCL_|TORCH_SYMM_MEM_|MOE_DIST_)' || true)
  declare -A seen=()
  # $passthrough unquoted: it is a list of variable names, split on purpose.
  for name in "${fixed[@]}" $passthrough "$@"; do
    [[ -n ${seen[$name]:-} || -z ${!name+set} ]] && continue
    seen[$name]=1
    echo "$name"
  done
}

# Shell-quotes one word, leaving plain words (paths, host:port, a=b, a,b) readable.
moe_dist_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs the command (exec), or with --dry-run prints it: one line, `VAR=value ... cmd args`,
# shell-quoted so that it can be pasted back into a shell.
moe_dist_run() {
  if ((MOE_DIST_DRY_RUN)); then
    local words=() name
    for name in $(moe_dist_env_names MASTER_ADDR MASTER_PORT); do
      words+=("$name=$(moe_dist_quote "${!name}")")
    done
    for name in "$@"; do words+=("$(moe_dist_quote "$name")"); done
    echo "${words[*]}"
    return 0
  fi
  exec "$@"
}

# The torchrun command as an array (TORCHRUN may hold several words, e.g. "uv run torchrun").
moe_dist_torchrun_cmd() {
  if [[ -n ${TORCHRUN:-} ]]; then
    read -r -a MOE_DIST_TORCHRUN <<<"$TORCHRUN"
  else
    MOE_DIST_TORCHRUN=("$PYTHON" -m torch.distributed.run)
  fi
}
