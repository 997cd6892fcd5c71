#!/usr/bin/env bash
# One node, torchrun --standalone: one process per GPU found, or 2 CPU processes (gloo) without
# GPUs.
#
#   launch/torchrun_single_node.sh [--dry-run] [--] [trainer args...]
#
# Environment: NPROC (processes; default GPUs found, else 2), MODULE (default moe_dist.lm.train;
# another module, a benchmark say), PYTHON, TORCHRUN; the NCCL/NVSHMEM variables are described in
# launch/common.sh. Examples:
#   launch/torchrun_single_node.sh --ep 2 --steps 20
#   NPROC=4 launch/torchrun_single_node.sh --dry-run --ep 4
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

moe_dist_parse_args "$@"
set -- "${MOE_DIST_ARGS[@]}"

gpus=$(moe_dist_gpu_count)
if ((gpus > 0)); then default_nproc=$gpus; else default_nproc=2; fi
nproc_per_node="${NPROC:-$default_nproc}"
moe_dist_require_posint NPROC "$nproc_per_node"

moe_dist_setup_env "$nproc_per_node"
moe_dist_torchrun_cmd
# The trainer's flags are checked once here, as its ranks would check them: a bad one ends the job
# with one line naming it (exit 2) instead of every rank failing and torchrun reporting each.
if [[ $MODULE == moe_dist.lm.train ]] && ((!MOE_DIST_DRY_RUN)) && [[ " $* " != *" -h "* ]] &&
  [[ " $* " != *" --help "* ]]; then
  WORLD_SIZE="$nproc_per_node" LOCAL_RANK=0 "$PYTHON" -m "$MODULE" --check-args "$@" || exit $?
fi
# --standalone: a private c10d rendezvous on a free local port, so two jobs on one node never clash.
moe_dist_run "${MOE_DIST_TORCHRUN[@]}" --standalone --nnodes 1 --nproc-per-node "$nproc_per_node" \
  -m "$MODULE" "$@"
