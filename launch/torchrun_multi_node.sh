#!/usr/bin/env bash
# Several nodes: run this once on every node; torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT
# gathers them. The node with NODE_RANK=0 hosts the rendezvous store (so MASTER_ADDR must be
# that node's address).
#
#   launch/torchrun_multi_node.sh [--dry-run] [--] [trainer args...]
#
# Required environment: MASTER_ADDR, NNODES, NODE_RANK, NPROC_PER_NODE.
# Optional: MASTER_PORT (29500), RDZV_ID (job id shared by all nodes; default SLURM_JOB_ID or
# "moe_dist"), MODULE, PYTHON, TORCHRUN; NCCL/NVSHMEM variables as in launch/common.sh. Example:
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 launch/torchrun_multi_node.sh --ep 16
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

moe_dist_parse_args "$@"
set -- "${MOE_DIST_ARGS[@]}"

missing=()
for name in MASTER_ADDR NNODES NODE_RANK NPROC_PER_NODE; do
  [[ -n ${!name:-} ]] || missing+=("$name")
done
((${#missing[@]} == 0)) ||
  moe_dist_die "missing environment variable(s): ${missing[*]}" \
    "(all of MASTER_ADDR, NNODES, NODE_RANK, NPROC_PER_NODE must be set on every node)"
MASTER_PORT="${MASTER_PORT:-29500}"
moe_dist_require_posint NNODES "$NNODES"
moe_dist_require_posint NPROC_PER_NODE "$NPROC_PER_NODE"
moe_dist_require_posint MASTER_PORT "$MASTER_PORT"
if [[ ! $NODE_RANK =~ ^[0-9]+$ ]] || ((NODE_RANK >= NNODES)); then
  moe_dist_die "NODE_RANK must be in 0..$((NNODES - 1)) (NNODES=$NNODES), got '$NODE_RANK'"
fi
export MASTER_ADDR MASTER_PORT

moe_dist_setup_env "$NPROC_PER_NODE"
moe_dist_torchrun_cmd
# c10d assigns ranks itself (torchrun ignores --node-rank there); NODE_RANK only picks the host of
# the store, which is more reliable than torch matching MASTER_ADDR against this machine's names.
if ((NODE_RANK == 0)); then is_host=true; else is_host=false; fi
moe_dist_run "${MOE_DIST_TORCHRUN[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-moe_dist}}" --rdzv-conf "is_host=$is_host" \
  -m "$MODULE" "$@"
