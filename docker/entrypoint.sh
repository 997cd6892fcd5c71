#!/usr/bin/env bash
# Container entrypoint: runs the launch scripts.
#
#   <image> [args...]              launch/torchrun_single_node.sh args... (one process per GPU)
#   <image> single-node [args...]  the same, explicitly
#   <image> multi-node [args...]   launch/torchrun_multi_node.sh (needs MASTER_ADDR, NNODES,
#                                  NODE_RANK, NPROC_PER_NODE: pass them with docker run -e)
#   <image> mpirun [args...]       launch/mpirun.sh
#   <image> bash|sh|python ...     runs that command as it is (a shell, a test run, ...)
#
# e.g. `<image> --dry-run --ep 8` prints the torchrun command for the 8 GPUs found.
set -euo pipefail

root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
launch="$root/launch"

case "${1:-}" in
  single-node) shift; exec "$launch/torchrun_single_node.sh" "$@" ;;
  multi-node) shift; exec "$launch/torchrun_multi_node.sh" "$@" ;;
  mpirun) shift; exec "$launch/mpirun.sh" "$@" ;;
  bash | sh | python | python3 | pytest) exec "$@" ;;
  *) exec "$launch/torchrun_single_node.sh" "$@" ;;
esac
