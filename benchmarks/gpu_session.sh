#!/usr/bin/env bash
# One lease, one call: the GPU tests and the benchmarks, results under $OUT (or benchmarks/results).
# Run on the lent GPU machine after ../shared/device/fetch-wheels.sh put wheels in .whl/:
#   bash benchmarks/gpu_session.sh [tests|nvshmem|nvshmem4|layer|transport|train|overlap|sweep|multi]
#   (default: tests transport sweep; nvshmem and nvshmem4 take a call each)
# The device returns at most 8 files: JSON results and one log, session.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/session.log"
steps=${*:-tests transport sweep}
nvidia-smi -L | tee -a "$log"
for step in $steps; do
  echo "=== $step $(date +%T)" | tee -a "$log"
  case $step in
    tests) timeout 240 python3 -m pytest -q -rs tests/gpu --ignore tests/gpu/test_nvshmem.py 2>&1 \
             | grep -v "^E  *File\|^W11" | tail -40 | tee -a "$log" ;;
    nvshmem)  # the nvshmem worker at 1 and 2 PEs time-sliced on one GPU (headers and put_dedup on
              # every path): a call of its own (280 s before put_dedup; cold compiles add ~2 min/PE)
           timeout 580 python3 -m pytest -q -rs "tests/gpu/test_nvshmem.py::test_nvshmem_matches_reference[1]" \
             "tests/gpu/test_nvshmem.py::test_nvshmem_matches_reference[2]" 2>&1 \
             | grep -v "^E  *File\|^W11" | tail -40 | tee -a "$log" ;;
    nvshmem4)  # the worker at 4 PEs, then 2 PEs under mpirun (warm cache): a call of its own
           timeout 580 python3 -m pytest -q -rs "tests/gpu/test_nvshmem.py::test_nvshmem_matches_reference[4]" \
             tests/gpu/test_nvshmem.py::test_nvshmem_bootstraps_over_mpi 2>&1 \
             | grep -v "^E  *File\|^W11" | tail -40 | tee -a "$log" ;;
    layer) timeout 240 python3 -m benchmarks.layer --out "$out" --iters 10 2>&1 | tee -a "$log" | tail -20 ;;
    transport) timeout 90 python3 -m benchmarks.transport --out "$out" --iters 20 2>&1 | tee -a "$log" | grep -v Warn | tail -8
               timeout 60 torchrun --standalone --nproc-per-node 2 -m benchmarks.transport --backend gloo \
                 --tokens 128,1024 --hidden 2048 --iters 3 --out "$out" 2>&1 | tee -a "$log" | grep -v Warn | tail -4 ;;
    train) timeout 200 python3 -m benchmarks.train_throughput --out "$out" 2>&1 | tee -a "$log" | tail -10 ;;
    overlap) timeout 200 python3 -m benchmarks.overlap --out "$out" 2>&1 | tee -a "$log" | tail -20 ;;
    sweep) timeout 110 python3 -m benchmarks.sweep --tokens 1024,4096 --experts 8,64 --top-k 2,8 \
             --transports local,nvshmem --peers deepspeed --iters 10 --warmup 3 --out "$out" 2>&1 | tee -a "$log" | tail -22
           timeout 80 torchrun --standalone --nproc-per-node 2 -m benchmarks.sweep --backend gloo --tokens 256,1024 \
             --experts 64 --top-k 2,8 --transports collective,nvshmem --peers none --iters 5 --warmup 2 \
             --check-tokens 256 --out "$out" 2>&1 | tee -a "$log" | tail -10 ;;
    multi)  # several GPUs, one PE per GPU (NVLink), e.g. on nvidia-h100-x2: issue 7's runs that fit it,
            # most important first (one device call is at most 10 minutes)
           n=$(nvidia-smi -L | wc -l)
           timeout 120 torchrun --standalone --nproc-per-node "$n" -m tests.gpu.nvshmem_worker 2>&1 | tee -a "$log" \
             | grep -E "WORKER OK|Error" | cut -c1-200
           timeout 90 torchrun --standalone --nproc-per-node "$n" -m benchmarks.transport --tokens 128,4096 --hidden 7168 \
             --iters 20 --out "$out" 2>&1 | tee -a "$log" | grep -v Warn | tail -4
           timeout 130 torchrun --standalone --nproc-per-node "$n" -m benchmarks.sweep --tokens 1024,4096 \
             --global-tokens 4096,16384 --experts 64 --top-k 2,8 --mode both --transports collective,nvshmem \
             --peers deepspeed --out "$out" 2>&1 | tee -a "$log" | tail -12
           timeout 90 torchrun --standalone --nproc-per-node "$n" -m tests.gpu.overlap_worker 2>&1 | tee -a "$log" \
             | grep -E "WORKER OK|Error" | cut -c1-200
           timeout 90 torchrun --standalone --nproc-per-node "$n" -m benchmarks.overlap --transport nvshmem \
             --out "$out" 2>&1 | tee -a "$log" | tail -12
           timeout 60 torchrun --standalone --nproc-per-node "$n" -m moe_dist.lm.train --ep "$n" --size tiny --batch-size 16 --steps 60 \
             --json "$out/train_ep$n.json" 2>&1 | tee -a "$log" | tail -3
           timeout 60 python3 -m moe_dist.lm.train --size tiny --batch-size 16 --steps 60 --json "$out/train_ep1.json" 2>&1 \
             | tee -a "$log" | tail -3 ;;
  esac
done
echo "=== done $(date +%T)" | tee -a "$log"
