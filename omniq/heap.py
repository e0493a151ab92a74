"""Give freed memory back to the operating system between layers.

Both layer-streamed commands allocate and free a decoder layer's tensors (tens of MB each) once per layer.
glibc serves blocks of that size from its heap once its dynamic mmap threshold has grown past them, and keeps
freed heap pages: measured on a real-width `MEM*E` checkpoint, validate's anonymous RSS grew by the size of
each MoE layer it had released (1.7 -> 5.5 -> 9.5 GiB over two MoE layers) and with `malloc_trim` after each
layer stayed at 1.7 GiB (and ran 2x faster). The process's RSS is what its cgroup limit counts.
"""

from __future__ import annotations


def give_back() -> None:
    """Collect garbage, then return free heap pages to the OS (`malloc_trim(0)`; a no-op without glibc)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
