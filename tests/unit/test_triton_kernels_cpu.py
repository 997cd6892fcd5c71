"""The GPU-only Triton kernels, checked on a machine without a GPU: - every kernel compiles for
Hopper (sm_90) through Triton's whole pipeline, ptxas included, so a type
  or lowering error in a CUDA-only path fails here, not first on a lent GPU;
- the nvshmem transport's kernels and the fused SwiGLU run in Triton's interpreter on CPU tensors
  against their plain-torch oracles (tests/gpu/test_nvshmem_kernels.py and test_swiglu_kernel.py
  with TRITON_INTERPRET=1), and the nvshmem transport itself with PEs emulated as threads
  (tests/gpu/nvshmem_emulation.py: P2P, put and mixed peers, the call header).
Both need triton (docker/install.sh --dev installs it); without it they skip, saying so.
Compiling and interpreting takes a minute and more on two cores: the module is in the slow tier."""

import itertools

import pytest

from tests.conftest import ROOT, assert_ran, concurrent_runs, run_python

pytestmark = pytest.mark.slow
triton = pytest.importorskip(
    "triton", reason="triton is not installed (docker/install.sh --dev installs it)"
)


def interpreter_works() -> str | None:
    import numpy

    major, minor = (int(v) for v in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 3):  # Triton 3.6's interpreter calls int() on 1-element arrays
        return (
            f"Triton's interpreter needs numpy < 2.3 (found {numpy.__version__}; install.sh --dev"
            " pins it)"
        )
    return None


# longest first: the runs share the machine's cores (the interpreter_runs fixture)
INTERPRETED_FILES = [
    "test_nvshmem_headers_emulated.py",
    "test_nvshmem_transport_emulated.py",
    "test_fused_kernels.py",
    "test_nvshmem_kernels.py",
    "test_nvshmem_dedup_kernels.py",
    "test_swiglu_kernel.py",
    "test_routing_kernels.py",
]


@pytest.fixture(scope="module")
def interpreter_runs():
    """file -> future of its interpreter run: all start at the first test, as many at once as
    there are cores (concurrent_runs; each is one busy Python thread)."""
    reason = interpreter_works()
    if reason:
        pytest.skip(reason)

    def run(test_file):
        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore"]
        path = ROOT / "tests/gpu" / test_file
        return lambda: run_python(*args, path, timeout=600, env={"TRITON_INTERPRET": "1"})

    with concurrent_runs({f: run(f) for f in INTERPRETED_FILES}) as runs:
        yield runs


@pytest.mark.parametrize("test_file", INTERPRETED_FILES)
def test_kernels_match_their_oracles_in_the_interpreter(test_file, interpreter_runs):
    out = assert_ran(interpreter_runs[test_file].result())
    assert " passed" in out and "skipped" not in out, out[-4000:]


P64, P32, PBF, PF32 = "*i64", "*i32", "*bf16", "*fp32"


def kernel_cases():
    from moe_dist.experts import swiglu_triton as SW
    from moe_dist.transport.nvshmem import kernels as K

    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    yield "count_and_rank", K.count_and_rank_kernel, {
        "idx_ptr": P64,
        "S": "i32",
        "rank_ptr": P64,
        "peer_counts_addr_ptr": P64,
        **ints("me", "N", "E", "ROW"),
        "BLOCK": "constexpr",
    }, {"BLOCK": 1024}
    for bump in (False, True):
        yield f"signal_and_wait(BUMP={bump})", K.signal_and_wait_kernel, {
            "peer_flag_addr_ptr": P64,
            "flag_ptr": P64,
            **ints("me", "n"),
            "epoch_ptr": P64,
            "timeout_ns": "i64",
            "err_ptr": P32,
            "step": "i32",
            "BUMP": "constexpr",
        }, {"BUMP": bump}
    yield "send_header", K.send_header_kernel, {
        "hdr_ptr": P64,
        "peer_hdr_addr_ptr": P64,
        **ints("me", "ROW"),
        "F": "constexpr",
        "FB": "constexpr",
    }, {"F": 12, "FB": 16}
    yield "check_header", K.check_header_kernel, {
        "hdr_ptr": P64,
        **ints("me", "N", "ROW"),
        "err_ptr": P32,
        "step": "i32",
        **{c: "constexpr" for c in ("F", "STATUS", "ORIGIN", "NB", "FB")},
    }, {"F": 12, "STATUS": 10, "ORIGIN": 11, "NB": 8, "FB": 16}
    yield "check_status", K.check_status_kernel, {
        "hdr_ptr": P64,
        **ints("N", "ROW"),
        "err_ptr": P32,
        "step": "i32",
        "epoch_ptr": P64,
        "layer": "i64",
        **{c: "constexpr" for c in ("F", "STATUS", "ORIGIN", "CALL", "LAYER", "NB", "FB")},
        "AHEAD": "constexpr",
    }, {"F": 12, "STATUS": 10, "ORIGIN": 11, "CALL": 2, "LAYER": 0, "NB": 8, "FB": 16, "AHEAD": 0}
    yield "layout", K.layout_kernel, {
        "counts_ptr": P64,
        **ints("me", "N", "E", "ROW", "G", "capacity"),
        "offs_ptr": P64,
        "overflow_ptr": P32,
        "counts_G_ptr": P64,
        "seg_ptr": P64,
        "err_ptr": P32,
        "step": "i32",
        "NB": "constexpr",
        "EB": "constexpr",
    }, {"NB": 8, "EB": 256}
    for compute, scale, put in itertools.product((False, True), repeat=3):
        yield f"push_slots(COMPUTE_DEST={compute}, SCALE={scale}, HAS_PUT={put})", K.push_slots_kernel, {
            "src_ptr": PBF,
            "scale_ptr": PF32,
            "idx_ptr": P64,
            "rank_ptr": P64,
            "offs_ptr": P64,
            "overflow_ptr": P32,
            "dest_rank_ptr": P64,
            "dest_pos_ptr": P64,
            "peer_rows_addr_ptr": P64,
            "own_out_ptr": PBF,
            "peer_meta_addr_ptr": P64,
            "via_put_ptr": P32,
            **ints("me", "G", "K", "H", "S"),
            "COMPUTE_DEST": "constexpr",
            "SCALE": "constexpr",
            "HAS_PUT": "constexpr",
            "BLOCK": "constexpr",
        }, {
            "COMPUTE_DEST": compute,
            "SCALE": scale,
            "HAS_PUT": put,
            "BLOCK": K.ROW_BLOCK,
        }
    for meta in (False, True):
        yield f"copy_segments(HAS_META={meta})", K.copy_segments_kernel, {
            "staging_ptr": PBF,
            "out_ptr": PBF,
            "staging_meta_ptr": P64,
            "out_meta_ptr": P64,
            "seg_ptr": P64,
            **ints("me", "N", "G", "H"),
            "HAS_META": "constexpr",
            "SPLIT": "constexpr",
            "BLOCK": "constexpr",
        }, {"HAS_META": meta, "SPLIT": 16, "BLOCK": K.ROW_BLOCK}
    for put in (False, True):
        yield f"return_segments(HAS_PUT={put})", K.return_segments_kernel, {
            "rows_ptr": PBF,
            "slot_of_row_ptr": P64,
            "seg_ptr": P64,
            "peer_ret_addr_ptr": P64,
            "via_put_ptr": P32,
            **ints("me", "N", "G", "H"),
            "SPLIT": "constexpr",
            "HAS_PUT": "constexpr",
            "BLOCK": "constexpr",
        }, {"SPLIT": 16, "HAS_PUT": put, "BLOCK": K.ROW_BLOCK}
    for w in (False, True):
        for keep in (False, True):
            yield f"gather_reduce(HAS_W={w}, KEEP_SLOTS={keep})", K.gather_reduce_kernel, {
                "own_rows_ptr": PBF,
                "staging_ptr": PBF,
                "dest_rank_ptr": P64,
                "dest_pos_ptr": P64,
                "w_ptr": PF32,
                "out_ptr": PBF,
                "slots_out_ptr": PBF,
                **ints("me", "K", "H", "T"),
                "HAS_W": "constexpr",
                "KEEP_SLOTS": "constexpr",
                "BLOCK": "constexpr",
            }, {"HAS_W": w, "KEEP_SLOTS": keep, "BLOCK": K.ROW_BLOCK}
    yield from dedup_kernel_cases(ints)
    yield "swiglu_fwd", SW._swiglu_fwd, {
        "h_ptr": PBF,
        "out_ptr": PBF,
        "rows_used_ptr": P64,
        "F": "i32",
        "BLOCK": "constexpr",
    }, {"BLOCK": 1024}
    yield "swiglu_bwd", SW._swiglu_bwd, {
        "h_ptr": PBF,
        "g_ptr": PBF,
        "dh_ptr": PBF,
        "rows_used_ptr": P64,
        "F": "i32",
        "BLOCK": "constexpr",
    }, {"BLOCK": 1024}


def dedup_kernel_cases(ints):
    from moe_dist.transport.nvshmem import dedup_kernels as D

    yield "slot_destinations", D.slot_destinations_kernel, {
        "idx_ptr": P64,
        "rank_ptr": P64,
        "offs_ptr": P64,
        "overflow_ptr": P32,
        "dest_rank_ptr": P64,
        "dest_pos_ptr": P64,
        **ints("G", "S"),
    }, {}
    for rows_t, scales, meta, own, ahead, put in (
        (PBF, False, True, False, False, False),
        ("*fp8e4nv", True, True, False, False, True),
        (PBF, False, False, True, True, True),
    ):
        yield f"push_pairs({rows_t}, SCALE_OWN={own}, HAS_PUT={put})", D.push_pairs_kernel, {
            "src_ptr": rows_t,
            "own_src_ptr": PBF,
            "scales_ptr": PF32,
            "w_ptr": PF32,
            "dest_rank_ptr": P64,
            "dest_pos_ptr": P64,
            "peer_rows_addr_ptr": P64,
            "peer_scales_addr_ptr": P64,
            "peer_meta_addr_ptr": P64,
            "peer_w_addr_ptr": P64,
            "own_out_ptr": PBF,
            "epoch_ptr": P64,
            "sent_ptr": P64,
            "via_put_ptr": P32,
            **{a: "i64" for a in ("send_rows_addr", "send_scales_addr", "send_meta_addr")},
            "send_w_addr": "i64",
            **ints("me", "T", "K", "H", "T_max"),
            "EPOCH_AHEAD": "constexpr",
            "HAS_SCALES": "constexpr",
            "HAS_META": "constexpr",
            "SCALE_OWN": "constexpr",
            "HAS_PUT": "constexpr",
            "KB": "constexpr",
            "BLOCK": "constexpr",
        }, {
            "EPOCH_AHEAD": ahead,
            "HAS_SCALES": scales,
            "HAS_META": meta,
            "SCALE_OWN": own,
            "HAS_PUT": put,
            "KB": 8,
            "BLOCK": 1024,
        }
    for rows_t, scales, keep, scale in ((PBF, False, True, False), ("*fp8e4nv", True, True, False),
                                        (PBF, False, False, True)):  # fmt: skip
        yield f"expand_pairs({rows_t}, SCALE={scale})", D.expand_pairs_kernel, {
            "staging_ptr": rows_t,
            "staging_scales_ptr": PF32,
            "staging_meta_ptr": P64,
            "staging_w_ptr": PF32,
            "out_ptr": PBF,
            "local_meta_ptr": P64,
            "local_w_ptr": PF32,
            "y_ptr": PBF,
            "grad_lw_ptr": PF32,
            "epoch_ptr": P64,
            **ints("me", "K", "H", "T_max", "Q"),
            "HAS_SCALES": "constexpr",
            "KEEP_META": "constexpr",
            "SCALE": "constexpr",
            "DOTS": "constexpr",
            "KB": "constexpr",
            "RB": "constexpr",
            "BLOCK": "constexpr",
        }, {
            "HAS_SCALES": scales,
            "KEEP_META": keep,
            "SCALE": scale,
            "DOTS": scale,
            "KB": 8,
            "RB": 64,
            "BLOCK": 1024,
        }
    for w in (False, True):
        yield f"reduce_pairs(HAS_W={w}, HAS_PUT={w})", D.reduce_pairs_kernel, {
            "rows_ptr": PBF,
            "local_meta_ptr": P64,
            "local_w_ptr": PF32,
            "peer_ret_addr_ptr": P64,
            "grad_lw_ptr": PF32,
            "peer_ret_w_addr_ptr": P64,
            "via_put_ptr": P32,
            "send_rows_addr": "i64",
            "send_w_addr": "i64",
            **ints("me", "K", "H", "T_max", "Q"),
            "HAS_W": "constexpr",
            "SEND_W": "constexpr",
            "HAS_PUT": "constexpr",
            "KB": "constexpr",
            "RB": "constexpr",
            "BLOCK": "constexpr",
        }, {"HAS_W": w, "SEND_W": not w, "HAS_PUT": w, "KB": 8, "RB": 64, "BLOCK": 1024}
        yield f"gather_pairs(HAS_W={w})", D.gather_pairs_kernel, {
            "own_rows_ptr": PBF,
            "ret_ptr": PBF,
            "dest_rank_ptr": P64,
            "dest_pos_ptr": P64,
            "w_ptr": PF32,
            "out_ptr": PBF,
            "ret_w_ptr": PF32,
            "grad_w_ptr": PF32,
            **ints("me", "T", "K", "H", "T_max"),
            "HAS_W": "constexpr",
            "GATHER_W": "constexpr",
            "KB": "constexpr",
            "BLOCK": "constexpr",
        }, {"HAS_W": w, "GATHER_W": not w, "KB": 8, "BLOCK": 1024}


def put_kernel_cases():
    from moe_dist.transport.nvshmem import put_kernels as PK

    for bump, payload in ((True, True), (False, False)):
        yield f"put_signal(BUMP={bump}, HAS_PAYLOAD={payload})", PK.put_signal_kernel, {
            "via_put_ptr": P32,
            "peer_pe_ptr": P32,
            "me": "i32",
            "epoch_ptr": P64,
            "flag_addr": "i64",
            "payload_addr": "i64",
            "payload_bytes": "i32",
            "BUMP": "constexpr",
            "HAS_PAYLOAD": "constexpr",
        }, {"BUMP": bump, "HAS_PAYLOAD": payload}
    for scale, meta in ((False, True), (True, False)):
        yield f"put_rows(SCALE={scale}, HAS_META={meta})", PK.put_rows_kernel, {
            "src_ptr": PBF,
            "scale_ptr": PF32,
            "dest_rank_ptr": P64,
            "dest_pos_ptr": P64,
            "via_put_ptr": P32,
            "peer_pe_ptr": P32,
            "send_addr": "i64",
            "send_meta_addr": "i64",
            "staging_addr": "i64",
            "staging_meta_addr": "i64",
            "K": "i32",
            "H": "i32",
            "S": "i32",
            "SCALE": "constexpr",
            "HAS_META": "constexpr",
            "BLOCK": "constexpr",
        }, {"SCALE": scale, "HAS_META": meta, "BLOCK": 1024}
    yield "put_return", PK.put_return_kernel, {
        "rows_ptr": PBF,
        "slot_of_row_ptr": P64,
        "seg_ptr": P64,
        "via_put_ptr": P32,
        "peer_pe_ptr": P32,
        "send_addr": "i64",
        "ret_addr": "i64",
        "me": "i32",
        "N": "i32",
        "G": "i32",
        "H": "i32",
        "SPLIT": "constexpr",
        "BLOCK": "constexpr",
    }, {"SPLIT": 16, "BLOCK": 1024}
    for scales, meta in ((False, True), (True, True), (False, False)):
        yield f"put_pairs(HAS_SCALES={scales}, HAS_META={meta})", PK.put_pairs_kernel, {
            "dest_rank_ptr": P64,
            "via_put_ptr": P32,
            "peer_pe_ptr": P32,
            **{a: "i64" for a in ("send_rows_addr", "send_scales_addr", "send_meta_addr")},
            **{a: "i64" for a in ("send_w_addr", "rows_addr", "scales_addr", "meta_addr")},
            "w_addr": "i64",
            **{a: "i32" for a in ("me", "T", "K", "H", "T_max", "row_bytes")},
            "HAS_SCALES": "constexpr",
            "HAS_META": "constexpr",
            "KB": "constexpr",
        }, {"HAS_SCALES": scales, "HAS_META": meta, "KB": 8}
    for send_w in (False, True):
        yield f"put_pair_returns(SEND_W={send_w})", PK.put_pair_returns_kernel, {
            "local_meta_ptr": P64,
            "via_put_ptr": P32,
            "peer_pe_ptr": P32,
            **{a: "i64" for a in ("send_rows_addr", "send_w_addr", "ret_addr", "ret_w_addr")},
            **{a: "i32" for a in ("me", "K", "H", "T_max", "Q", "row_bytes")},
            "SEND_W": "constexpr",
            "KB": "constexpr",
            "RB": "constexpr",
        }, {"SEND_W": send_w, "KB": 8, "RB": 64}


def test_put_kernels_link_nvshmem_and_compile_for_hopper():
    """The put-with-signal kernels, linked against NVSHMEM's device bitcode: the extern declarations
    must match the library's functions, and the module must carry the device state that
    nvshmemx_cumodule_init fills (the kernel-load hook relies on it)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from moe_dist.transport.nvshmem.device_lib import device_library_path, extern_libs

    if device_library_path((9, 0)) is None:
        pytest.skip(
            "NVSHMEM's device bitcode is not installed (the nvidia-nvshmem-cu13 wheel, or "
            "MOE_DIST_NVSHMEM_DEVICE_BC); the GPU worker runs these kernels"
        )
    libs = tuple(extern_libs((9, 0)).items())
    failures = []
    for name, fn, signature, constants in put_kernel_cases():
        try:
            k = triton.compile(
                ASTSource(fn, signature, constants),
                target=GPUTarget("cuda", 90, 32),
                options={"extern_libs": libs},
            )
            if "nvshmemi_device_state_d" not in k.asm["ptx"]:
                failures.append(
                    f"{name}: the PTX has no NVSHMEM device state: the library was not linked"
                )
        except Exception as e:  # noqa: BLE001
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:800]}")
    assert not failures, "\n".join(failures)


def test_every_kernel_compiles_for_hopper():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for name, fn, signature, constants in kernel_cases():
        try:
            triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32))
        except Exception as e:  # noqa: BLE001 - collect every failing kernel, then report them all
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:800]}")
    assert not failures, "\n".join(failures)
