"""glibc's malloc parameters for the stage actors, which decode, convert and encode frame after frame
for as long as an input lasts (issue 13's memory goal; docs/benchmarks.md, "Memory of one long input")."""
from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_malloc(mmap_threshold_kb: int | None = None) -> bool:
    """glibc's malloc parameters for a stage actor (called first in its ``__init__``), which decodes,
    converts and encodes frame after frame, in several threads, for as long as its input lasts.

    Always: the threads share at most 2 arenas (glibc gives each allocating thread its own, up to
    8 per core, each keeping its freed memory): in process over a 30-s input, the crop+score
    stage's page faults unchanged (46k against 43-44k); in Ray, ``MALLOC_ARENA_MAX=2`` cut the crop
    actor's growth from 40 s to 300 s of input from +266 to +193 MB (docs/benchmarks.md, "Memory of
    one long input").

    ``mmap_threshold_kb`` (``ray.malloc_mmap_threshold_kb``, off by default): glibc mmaps blocks
    above 128 KB but raises that threshold to the size of each mmapped block it frees (up to
    32 MB), so after the first big free (a Ray Data block, a clip's mp4) every buffer below it
    comes from the heaps, whose free chunks stay mapped and fragment. Fixed at 256 KB, with the
    heaps trimmed above 32 MB, the crop+score stage's heap keeps 17-20 MB free instead of 58-91
    (peak 603 MB against 642-676, in process over a 40-s input), but every frame-sized buffer is
    then mapped and faulted in anew: 37x the page faults (1.66M against 44k) and ~+25% of the
    stage's CPU.

    Returns False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = [(_M_ARENA_MAX, 2)]
    if mmap_threshold_kb is not None:
        # setting either one also stops glibc's dynamic raising of both
        settings += [(_M_MMAP_THRESHOLD, mmap_threshold_kb * 1024), (_M_TRIM_THRESHOLD, 32 * 2**20)]
    return all(mallopt(param, value) == 1 for param, value in settings)
