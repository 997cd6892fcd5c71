#!/usr/bin/env bash
# Open MPI: mpirun starts every process; moe_dist.parallel reads OMPI_COMM_WORLD_RANK/_SIZE/
# _LOCAL_RANK itself, and this script exports what torch.distributed's env:// rendezvous needs
# besides (MASTER_ADDR, MASTER_PORT) and forwards the NCCL/NVSHMEM settings with -x.
#
#   launch/mpirun.sh [--dry-run] [--] [trainer args...]
#
# Environment:
#   NP            total processes (default: GPUs found on this node, else 2)
#   HOSTS         Open MPI host list, e.g. "node0:8,node1:8"   } optional; without either, all
#   HOSTFILE      Open MPI hostfile                           } processes run on this node
#   MASTER_ADDR   default: the first host of HOSTS/HOSTFILE, else localhost
#   MASTER_PORT   default 29500
#   MOE_DIST_NVSHMEM_BOOTSTRAP=mpi|uid   how NVSHMEM bootstraps: "mpi" uses nvshmem4py's
#                 initializer_method="mpi" over this MPI job (needs mpi4py on the same MPI), "uid"
#                 exchanges a unique id over torch.distributed; passed through when set.
#   MPIRUN        the mpirun binary (default: mpirun); MPIRUN_ARGS extra mpirun options
#                 (e.g. "--mca btl_tcp_if_include eth0"); MODULE, PYTHON as elsewhere.
# Example:
#   HOSTS=node0:8,node1:8 NP=16 launch/mpirun.sh --dry-run --ep 16
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

moe_dist_parse_args "$@"
set -- "${MOE_DIST_ARGS[@]}"

gpus=$(moe_dist_gpu_count)
if ((gpus > 0)); then default_np=$gpus; else default_np=2; fi
np="${NP:-$default_np}"
moe_dist_require_posint NP "$np"

hosts_args=()
first_host=""
if [[ -n ${HOSTS:-} && -n ${HOSTFILE:-} ]]; then
  moe_dist_die "set HOSTS or HOSTFILE, not both"
elif [[ -n ${HOSTS:-} ]]; then
  hosts_args=(--host "$HOSTS")
  first_host=${HOSTS%%,*}
elif [[ -n ${HOSTFILE:-} ]]; then
  [[ -r $HOSTFILE ]] || moe_dist_die "HOSTFILE '$HOSTFILE' is not readable"
  hosts_args=(--hostfile "$HOSTFILE")
  first_host=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
fi
first_host=${first_host%%:*} # "node0:8" -> "node0"
# Rank 0 runs on the first host, so that is where torch.distributed's store listens.
export MASTER_ADDR="${MASTER_ADDR:-${first_host:-localhost}}"
export MASTER_PORT="${MASTER_PORT:-29500}"
moe_dist_require_posint MASTER_PORT "$MASTER_PORT"

# Processes per node, for the OMP_NUM_THREADS default: all of them on one node, else one per GPU.
if ((${#hosts_args[@]} == 0)); then
  local_procs=$np
elif ((gpus > 0)); then
  local_procs=$gpus
else
  local_procs=1
fi
moe_dist_setup_env "$local_procs"

read -r -a mpirun_cmd <<<"${MPIRUN:-mpirun}"
# --bind-to none: Open MPI would otherwise pin each rank to one core, starving the data loader,
# NCCL's proxy threads and OpenMP.
mpirun_cmd+=(-np "$np" --bind-to none)
# Open MPI refuses to start as root unless told; containers usually run as root.
if [[ $(id -u) == 0 ]]; then mpirun_cmd+=(--allow-run-as-root); fi
mpirun_cmd+=("${hosts_args[@]}")
# -x copies each variable into every rank's environment, on every host. PATH/LD_LIBRARY_PATH make
# remote ranks find the same python and libraries (e.g. a virtualenv's).
for name in $(moe_dist_env_names MASTER_ADDR MASTER_PORT NCCL_DEBUG PATH LD_LIBRARY_PATH); do
  mpirun_cmd+=(-x "$name")
done
if [[ -n ${MPIRUN_ARGS:-} ]]; then
  read -r -a extra <<<"$MPIRUN_ARGS"
  mpirun_cmd+=("${extra[@]}")
fi

if ((!MOE_DIST_DRY_RUN)); then
  command -v "${mpirun_cmd[0]}" >/dev/null 2>&1 ||
    moe_dist_die "'${mpirun_cmd[0]}' not found: install Open MPI" \
      "(or use launch/torchrun_single_node.sh)"
  # -x and --bind-to are Open MPI's spelling; MPICH's mpirun would reject or misread them.
  "${mpirun_cmd[0]}" --version 2>&1 | grep -qiE 'open mpi|openrte|prrte' ||
    echo "$(basename -- "$0"): warning: '${mpirun_cmd[0]}' does not look like Open MPI" >&2
fi
moe_dist_run "${mpirun_cmd[@]}" "$PYTHON" -m "$MODULE" "$@"
