"""Memory made ready ahead, in the children that parse a written model while the parent works.

A page of memory is made on its first touch (a fault), and parsing a model touches about twice its
size of fresh memory: onnx.checker reads the file into memory and copies each weight out of it, and
onnxruntime's load does the like. For ResNet-50's 103 MB that is some 50,000 faults, 0.13 s of the
checker's 0.16 s on the 2-core machine of the benchmarks, with the pages made one fault at a time.
The children that check the written model (:mod:`onnxfold.output_check`) and run it
(:mod:`onnxfold.verification`) start before it is written, so they have that time to spare:

- :func:`keep_freed` asks glibc to serve blocks up to 1 GiB from its heap and to give none back while
  the process lives, so memory freed (the original's session, the checker's copy) is reused without a
  fault: a short-lived child's peak is what it is either way;
- :func:`prefault` then makes the heap's pages for the parse to come in one call
  (``MADV_POPULATE_WRITE``, Linux 5.14), while the child waits: onnx.checker on the written ResNet-50
  takes 0.035 s then.

The command line's own process keeps freed memory too (:func:`onnxfold.cli.console`, inherited by
the children it forks): a fold makes float64 temporaries of each weight, and each was fresh pages.

Linux with glibc only (through ctypes); elsewhere both do nothing.
"""

from __future__ import annotations

import functools
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14
_KEEP = 1 << 30  # blocks up to 1 GiB from the heap; none given back below 1 GiB free at its top
_PAGE = 4096


@functools.cache  # one CDLL and its prototypes per process
def _libc():
    """glibc, or None (another platform or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
    except (ValueError, OSError, AttributeError):
        return None
    import ctypes  # (numpy has imported it already)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.memset.restype = ctypes.c_void_p
    return libc


def keep_freed() -> bool:
    """Keep freed memory for reuse (see the module); whether glibc took it."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP))


def prefault(nbytes: int) -> bool:
    """:func:`keep_freed`, then grow the heap by ``nbytes`` (at most 1 GiB) with its pages made, and
    free it for what comes next to reuse; whether it was done."""
    nbytes = min(int(nbytes), _KEEP - (16 << 20))
    if nbytes < (1 << 20) or not keep_freed():
        return False
    libc = _libc()
    block = libc.malloc(nbytes)
    if not block:
        return False
    try:
        start = -(-block // _PAGE) * _PAGE
        length = (block + nbytes - start) // _PAGE * _PAGE
        if libc.madvise(start, length, _MADV_POPULATE_WRITE) != 0:  # an older kernel: touch each page
            libc.memset(block, 0, nbytes)
    finally:
        libc.free(block)
    return True


def budget(model_bytes: int) -> int:
    """What to make ahead for parsing a model file of ``model_bytes``: 2.2 times its size (read into
    memory, weights copied out: 53,600 faults for onnxruntime's load of the 103 MB model), within a
    quarter of the memory available now."""
    want = int(model_bytes * 2.2)
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    want = min(want, int(line.split()[1]) * 1024 // 4)
                    break
    except (OSError, ValueError, IndexError):
        return 0
    return want
