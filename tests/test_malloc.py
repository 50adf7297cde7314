"""pipeline/malloc.py: glibc's malloc parameters in the stage actors."""
import os
import subprocess
import sys

import pytest


def test_tune_malloc_hands_frame_sized_buffers_back():
    """With ray.malloc_mmap_threshold_kb (malloc.tune_malloc in the stage actors), a freed frame-sized
    buffer goes back to the system at once, the second time too: glibc's default raises its mmap
    threshold after the first free and keeps later ones in the heap (docs/benchmarks.md)."""
    code = """
import ctypes, sys
import numpy as np
from pipeline.malloc import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    sys.exit(3)  # not glibc >= 2.33
libc.mallinfo2.restype = MallInfo2
if not tune_malloc(256):
    sys.exit(3)
frame = 512 * 512 * 3  # one output frame, RGB
for _ in range(2):
    before = libc.mallinfo2().hblkhd
    buf = np.ones(frame, np.uint8)
    held = libc.mallinfo2().hblkhd - before
    del buf
    print(held, libc.mallinfo2().hblkhd - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if out.returncode == 3:
        pytest.skip("not glibc with mallinfo2")
    assert out.returncode == 0, out.stderr
    rounds = [tuple(map(int, line.split())) for line in out.stdout.strip().splitlines()]
    assert len(rounds) == 2
    for held, after_free in rounds:
        assert held >= 512 * 512 * 3 and after_free == 0, rounds
