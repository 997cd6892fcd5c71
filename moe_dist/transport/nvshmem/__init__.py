"""The device-initiated one-sided transport (transport.py), its index math (layout.py, importable
without a GPU), its Triton kernels (kernels.py) and the process-wide NVSHMEM runtime (runtime.py).
PROTOCOL.md describes the message order."""


def __getattr__(name):
    if name == "NvshmemTransport":  # needs triton and nvshmem4py: imported only when used
        from .transport import NvshmemTransport

        return NvshmemTransport
    raise AttributeError(name)
