#!/usr/bin/env bash
# One lease, one call: the GPU tests and the benchmarks, results under $OUT (or benchmarks/results).
# Run on the lent GPU machine after ../shared/device/fetch-wheels.sh put wheels in .whl/:
#   bash benchmarks/gpu_session.sh [tests|layer|transport|train|overlap ...]   (default: all)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
steps=${*:-tests layer transport}
nvidia-smi -L
for step in $steps; do
  echo "=== $step"
  case $step in
    tests) timeout 300 python3 -m pytest -q -x tests/gpu 2>&1 | grep -v "^E  *File\|^W1124" | tail -60 ;;
    layer) timeout 240 python3 benchmarks/layer.py --out "$out" --iters 10 ;;
    transport) timeout 150 python3 benchmarks/transport.py --out "$out" --iters 10
               timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/transport.py --backend gloo \
                 --tokens 128,1024 --hidden 2048 --iters 3 --out "$out" ;;
    train) timeout 200 python3 benchmarks/train_throughput.py --out "$out" ;;
    overlap) timeout 200 python3 benchmarks/overlap.py --out "$out" ;;
  esac
done
