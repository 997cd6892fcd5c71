"""Fault injection on 2 gloo CPU processes: what each rank raises, and how long after the fault.

    python -m benchmarks.fault_injection [--timeout 3]

Cases: a rank raises inside the layer (NaN router logits; an exception in its experts), a rank
stalls, a rank disagrees (top_k), a rank is killed, a checkpoint is corrupt. Prints one row per
case and rank: wall time from the faulty call to the error, the error type and its message.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

H = 16


def _cfg(**kw):
    from moe_dist import MoEConfig

    base = dict(hidden_size=H, ffn_hidden_size=32, num_experts=4, top_k=2, transport="collective")
    base.update(kw)
    return MoEConfig(**base)


def _build(c, timeout_s: float):
    """An EP=2 layer whose transport waits at most timeout_s for a peer."""
    from moe_dist import MoELayer, ParallelGroups
    from moe_dist.transport import TransportOptions

    options = TransportOptions(peer_timeout_s=timeout_s)
    return MoELayer(c, ParallelGroups(ep_size=2), name="moe.3", transport_options=options)


def _layer(timeout_s: float, **kw):
    torch.manual_seed(0)
    layer = _build(_cfg(**kw), timeout_s)
    layer(torch.randn(8, H))  # one clean step first
    return layer


# Each case runs on both ranks and returns the callable whose error is timed.
def case_rank_raises(rank, timeout_s, tmp):
    layer = _layer(timeout_s)
    x = torch.randn(8, H)
    if rank == 1:
        x[3, 5] = float("nan")
    return lambda: layer(x)


def case_expert_raises(rank, timeout_s, tmp):
    layer = _layer(timeout_s)
    if rank == 0:

        def broken(*args):
            raise RuntimeError("CUDA error: an illegal memory access (injected)")

        layer.experts.forward = broken
    return lambda: layer(torch.randn(8, H))


def case_rank_stalls(rank, timeout_s, tmp):
    layer = _layer(timeout_s)
    if rank == 1:
        return lambda: (time.sleep(3 * timeout_s), os._exit(0))
    return lambda: layer(torch.randn(8, H))


def case_rank_disagrees(rank, timeout_s, tmp):
    torch.manual_seed(0)
    c = _cfg(top_k=2 + rank)
    return lambda: _build(c, timeout_s)(torch.randn(8, H))


def case_rank_killed(rank, timeout_s, tmp):
    layer = _layer(timeout_s)
    if rank == 1:
        return lambda: os._exit(1)
    return lambda: (time.sleep(0.5), layer(torch.randn(8, H)))


def case_corrupt_checkpoint(rank, timeout_s, tmp):
    from moe_dist.training import checkpoint

    layer = _layer(timeout_s)
    path = os.path.join(tmp, "ck")
    checkpoint.save(layer, path)
    if rank == 0:
        reader = checkpoint.SafeFileSystemReader(path)
        for index, info in reader.read_metadata().storage_data.items():
            if index.fqn == "model.experts.w_out.3":
                f = os.path.join(path, info.relative_path)
                data = bytearray(open(f, "rb").read())
                at = info.offset + info.length - 120
                data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
                open(f, "wb").write(bytes(data))
    dist.barrier()
    return lambda: checkpoint.load(layer, path)


CASES = {
    "rank 1 raises (NaN logits)": case_rank_raises,
    "rank 0 raises (in experts)": case_expert_raises,
    "rank 1 stalls": case_rank_stalls,
    "rank 1 disagrees (top_k)": case_rank_disagrees,
    "rank 1 killed": case_rank_killed,
    "corrupt checkpoint": case_corrupt_checkpoint,
}


def _child(rank, port, case, timeout_s, tmp, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300)
    )
    fn = CASES[case](rank, timeout_s, tmp)
    t0 = time.perf_counter()
    try:
        fn()
        row = (case, rank, time.perf_counter() - t0, "-", "no error")
    except Exception as e:  # noqa: BLE001 - reported
        row = (case, rank, time.perf_counter() - t0, type(e).__name__, str(e))
    except BaseException:
        row = (case, rank, time.perf_counter() - t0, "?", traceback.format_exc())
    results.put(row)
    os._exit(0)  # after a fault the group may be unusable: no teardown


def run_case(case: str, timeout_s: float) -> list[tuple]:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_child, args=(r, port, case, timeout_s, tmp, results), daemon=True)
            for r in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60 + 4 * timeout_s)
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
    rows = []
    while not results.empty():
        rows.append(results.get())
    done = {r[1] for r in rows}
    for r in range(2):
        if r not in done:
            rows.append((case, r, float("nan"), "-", "(the faulty rank: stalled or killed)"))
    return sorted(rows, key=lambda r: r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3.0, help="peer_timeout_s of the layers")
    parser.add_argument("--width", type=int, default=150, help="message characters shown")
    args = parser.parse_args()
    print(f"2 gloo CPU processes, peer_timeout_s={args.timeout:g}, torch {torch.__version__}")
    print(f"| case | rank | s to error | error | message |\n|---|---|---|---|---|")
    for case in CASES:
        for _, rank, seconds, kind, message in run_case(case, args.timeout):
            message = " ".join(message.split())
            if len(message) > args.width:
                message = message[: args.width - 3] + "..."
            print(f"| {case} | {rank} | {seconds:.2f} | {kind} | {message} |", flush=True)


if __name__ == "__main__":
    main()
