"""NVSHMEM's device library in Triton kernels: the put-with-signal calls for peers that loads and
stores cannot reach (no NVLink/P2P path), and the module initialisation those kernels need.

Triton links NVSHMEM's LLVM bitcode (libnvshmem_device*.bc, shipped in the nvidia-nvshmem wheel)
into a kernel that calls one of the functions below when the launch passes
`extern_libs=extern_libs()`. A module that links it holds its own copy of NVSHMEM's device state,
which `nvshmemx_cumodule_init` must fill before the kernel first runs: `install_module_init_hook()`
does that from Triton's kernel-load hook for the kernels named in PUT_KERNELS (each of them calls
NVSHMEM in every variant, so each links the state).

Addresses are int64 (symmetric addresses on this PE: NVSHMEM maps them to the peer), PEs int32.
"""

from __future__ import annotations

import glob
import os

import triton
import triton.language as tl
from triton.language import core

SIGNAL_SET = core.constexpr(9)  # nvshmemx_signal_op_t NVSHMEM_SIGNAL_SET
PUT_KERNELS = frozenset(
    {
        "put_signal_kernel",
        "put_rows_kernel",
        "put_return_kernel",
        "put_pairs_kernel",
        "put_pair_returns_kernel",
    }
)

_I64, _U64, _I32 = core.dtype("int64"), core.dtype("uint64"), core.dtype("int32")


def _nvshmem_call(symbol, args, types, _semantic):
    """A call of NVSHMEM device function `symbol` (declared returning int32; its result is
    unused)."""
    return core.extern_elementwise(
        "", "", args, {types: (symbol, _I32)}, is_pure=False, _semantic=_semantic
    )


@core.extern
def _putmem_nbi_block(dst, src, nbytes, pe, _semantic=None):
    """nvshmemx_putmem_nbi_block: every thread of the program calls it; returns at once. The source
    must stay as it is, and the data counts as delivered, only after nvshmem_quiet."""
    return _nvshmem_call(
        "nvshmemx_putmem_nbi_block", [dst, src, nbytes, pe], (_I64, _I64, _I64, _I32), _semantic
    )


@core.extern
def _putmem_signal_block(dst, src, nbytes, sig_addr, signal, sig_op, pe, _semantic=None):
    """nvshmemx_putmem_signal_block: the data, then the signal, delivered in that order."""
    return _nvshmem_call(
        "nvshmemx_putmem_signal_block",
        [dst, src, nbytes, sig_addr, signal, sig_op, pe],
        (_I64, _I64, _I64, _I64, _U64, _I32, _I32),
        _semantic,
    )


@core.extern
def _signal_op(sig_addr, signal, sig_op, pe, _semantic=None):
    return _nvshmem_call(
        "nvshmemx_signal_op", [sig_addr, signal, sig_op, pe], (_I64, _U64, _I32, _I32), _semantic
    )


@core.extern
def _quiet(_semantic=None):
    """nvshmem_quiet: every put this PE issued so far is complete (delivered) when it returns."""
    return _nvshmem_call("nvshmem_quiet", [], (), _semantic)


# Typed entry points for kernels: the casts make every call match the declarations above.
@triton.jit
def put_block_nbi(dst_addr, src_addr, nbytes, pe):
    _putmem_nbi_block(
        tl.cast(dst_addr, tl.int64),
        tl.cast(src_addr, tl.int64),
        tl.cast(nbytes, tl.int64),
        tl.cast(pe, tl.int32),
    )


@triton.jit
def put_signal_block(dst_addr, src_addr, nbytes, sig_addr, signal, pe):
    """The data, then sig_addr = signal on PE pe (NVSHMEM_SIGNAL_SET)."""
    _putmem_signal_block(
        tl.cast(dst_addr, tl.int64),
        tl.cast(src_addr, tl.int64),
        tl.cast(nbytes, tl.int64),
        tl.cast(sig_addr, tl.int64),
        tl.cast(signal, tl.uint64),
        SIGNAL_SET,
        tl.cast(pe, tl.int32),
    )


@triton.jit
def signal_set(sig_addr, signal, pe):
    _signal_op(
        tl.cast(sig_addr, tl.int64), tl.cast(signal, tl.uint64), SIGNAL_SET, tl.cast(pe, tl.int32)
    )


@triton.jit
def quiet():
    _quiet()


def device_library_path(capability: tuple[int, int] | None = None) -> str | None:
    """The NVSHMEM device bitcode: $MOE_DIST_NVSHMEM_DEVICE_BC, else from the nvidia-nvshmem wheel
    or $NVSHMEM_HOME (an architecture-specific libnvshmem_device_sm_XX.bc where the wheel has
    them)."""
    explicit = os.environ.get("MOE_DIST_NVSHMEM_DEVICE_BC")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    dirs = []
    try:
        import nvidia.nvshmem as pkg  # namespace package of the nvidia-nvshmem-cu12/cu13 wheels

        dirs += [os.path.join(p, "lib") for p in pkg.__path__]
    except ImportError:
        pass
    if os.environ.get("NVSHMEM_HOME"):
        dirs.append(os.path.join(os.environ["NVSHMEM_HOME"], "lib"))
    for d in dirs:
        if capability is not None:
            specific = os.path.join(d, f"libnvshmem_device_sm_{capability[0]}{capability[1]}.bc")
            if os.path.exists(specific):
                return specific
        generic = os.path.join(d, "libnvshmem_device.bc")
        if os.path.exists(generic):
            return generic
        found = sorted(glob.glob(os.path.join(d, "libnvshmem_device*.bc")))
        if found:
            return found[-1]
    return None


def extern_libs(capability: tuple[int, int] | None = None) -> dict[str, str]:
    """What a launch of a PUT_KERNELS kernel passes as `extern_libs`; a clear error where it is
    missing."""
    path = device_library_path(capability)
    if path is None:
        raise RuntimeError(
            "the nvshmem transport's put-with-signal path needs NVSHMEM's device bitcode "
            "(libnvshmem_device*.bc): install the nvidia-nvshmem-cu12/cu13 wheel, or set "
            "NVSHMEM_HOME or MOE_DIST_NVSHMEM_DEVICE_BC"
        )
    return {"libnvshmem_device": path}


_hook_installed = [False]


def install_module_init_hook() -> None:
    """Fills NVSHMEM's device state in every module Triton loads for a PUT_KERNELS kernel (once per
    module, before its first launch). Other kernels, and any hook installed before this one, are
    left as they are."""
    if _hook_installed[0]:
        return
    from triton import knobs
    from nvshmem import bindings

    def init_nvshmem_module(module, function, name, metadata_group, hash):
        if name in PUT_KERNELS:
            status = bindings.cumodule_init(int(module))
            if status:
                raise RuntimeError(
                    f"nvshmemx_cumodule_init failed ({status}) for Triton kernel {name}"
                )

    chain = knobs.runtime.kernel_load_end_hook
    if hasattr(chain, "add"):  # Triton's hook chain: other tools' hooks (e.g. Proton's) stay in it
        chain.add(init_nvshmem_module)
    else:
        earlier = chain

        def chained(*args):
            if earlier is not None:
                earlier(*args)
            init_nvshmem_module(*args)

        knobs.runtime.kernel_load_end_hook = chained
    _hook_installed[0] = True
