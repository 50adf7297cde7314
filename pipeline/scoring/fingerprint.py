"""Near-duplicate signatures of a clip: perceptual hashes of a few frames and an audio fingerprint.

Perceptual hash: ``imagehash.phash`` (the DCT hash of hackerfactor's "Looks Like It": 32x32
greyscale, 2-D DCT, the 8x8 lowest frequencies against their median), 64 bits per frame, on
``PHASH_FRAMES`` evenly spaced output frames (their central ``PHASH_REGION``, the face), and on
the same regions mirrored left-right (a mirrored re-upload gives the mirrored hashes). Stored as
signed int64 (the 64 bits in imagehash's row-major order).

Audio fingerprint: Haitsma & Kalker 2002, "A Highly Robust Audio Fingerprinting System"
(ISMIR 2002), section 4.2: frames of 0.37 s, Hanning window, overlap 31/32 (one sub-fingerprint
per 11.6 ms), the power spectrum in 33 non-overlapping log-spaced bands from 300 to 2000 Hz, and
bit m of sub-fingerprint n

    F(n, m) = 1  if  E(n, m) - E(n, m+1) - (E(n-1, m) - E(n-1, m+1)) > 0  else 0,   m = 0..31.

The paper works at ~5.5 kHz (2048-sample frames, 64-sample hop); we work on the clip's 16 kHz
audio with the same durations (5920-sample frames, hop 185 = 5920/32, i.e. 11.56 ms), which gives
the same 2.7 Hz spectral resolution inside 300-2000 Hz. Matching (section 4.3): two fingerprint
blocks of 256 sub-fingerprints (~3 s) are the same audio when their bit error rate is <= 0.35.
Stored as base64 of the little-endian uint32 sub-fingerprints (bit m = band m), 344 bytes per
second of audio.

No maintained Python package computes Chromaprint without its C library / fpcalc binary
(pyacoustid calls them), so the published Philips method is implemented here; tests check it
against a literal per-frame reading of the formula and its robustness to re-encoding.
"""
from __future__ import annotations

import base64

import numpy as np

PHASH_FRAMES = 5
PHASH_REGION = 0.6
RATE = 16000
HK_FRAME = 5920  # 0.37 s at 16 kHz
HK_HOP = HK_FRAME // 32  # overlap 31/32
HK_BANDS = 33
HK_FMIN, HK_FMAX = 300.0, 2000.0
HK_BLOCK = 256  # sub-fingerprints per block (section 4.3)
HK_BER_MAX = 0.35


# ---- perceptual hashes -------------------------------------------------------------------

def phash_frame_indices(n_frames: int, k: int = PHASH_FRAMES) -> list[int]:
    """``k`` evenly spaced frame indices (centres of k equal parts), distinct, inside the clip."""
    if n_frames <= 0:
        return []
    return sorted({min(n_frames - 1, int((i + 0.5) * n_frames / k)) for i in range(k)})


def _bits_to_int64(bits: np.ndarray) -> int:
    value = 0
    for b in bits.ravel():
        value = (value << 1) | int(b)
    return value - (1 << 64) if value >= 1 << 63 else value


def phash64(frame: np.ndarray) -> int:
    """imagehash.phash of an RGB uint8 frame as a signed 64-bit integer."""
    import imagehash
    from PIL import Image

    return _bits_to_int64(imagehash.phash(Image.fromarray(np.ascontiguousarray(frame))).hash)


def face_region(frame: np.ndarray, share: float = PHASH_REGION) -> np.ndarray:
    """The central ``share`` of a face-centred crop (the crop side is segment.crop_scale = 2 face
    boxes, so this is the face box and a little around it): framing and padding differences at the
    crop's edges then weigh little in the hash."""
    h, w = frame.shape[:2]
    y0, x0 = int(round(h * (1 - share) / 2)), int(round(w * (1 - share) / 2))
    return frame[y0:h - y0, x0:w - x0]


def phash_pair(frame: np.ndarray) -> tuple[int, int]:
    """(hash of the crop's face region, hash of the same region mirrored left-right)."""
    region = face_region(frame)
    return phash64(region), phash64(region[:, ::-1])


def hamming64(a, b) -> np.ndarray:
    """Bitwise Hamming distance between int64 hashes (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64)).view(np.uint64)
    return np.bitwise_count(x).astype(np.int32)


def phash_distance(a: list[int], b: list[int], b_mirrored: list[int] | None = None) -> tuple[float, bool]:
    """Clip distance: for each frame hash of ``a``, the nearest frame hash of ``b`` (clips cut a
    little differently still compare like with like), averaged; the smaller of b as stored and b
    mirrored. Returns (mean bits, mirrored?)."""
    if not a or not b:
        return float("inf"), False
    aa = np.asarray(a, np.int64)[:, None]
    best = float(hamming64(aa, np.asarray(b, np.int64)[None]).min(1).mean())
    if b_mirrored:
        m = float(hamming64(aa, np.asarray(b_mirrored, np.int64)[None]).min(1).mean())
        if m < best:
            return m, True
    return best, False


# ---- Haitsma-Kalker audio fingerprint ----------------------------------------------------

def _band_edges(n_fft: int, rate: int = RATE) -> np.ndarray:
    """FFT bin index of the 34 edges of 33 log-spaced bands between 300 and 2000 Hz."""
    hz = np.geomspace(HK_FMIN, HK_FMAX, HK_BANDS + 1)
    return np.round(hz * n_fft / rate).astype(np.int64)


def band_energies(audio: np.ndarray, rate: int = RATE, chunk: int = 256) -> np.ndarray:
    """E(n, m): [frames, 33] energy of each band in each Hanning-windowed 0.37 s frame."""
    if rate != RATE:
        raise ValueError(f"the fingerprint is defined on {RATE} Hz audio, got {rate} Hz")
    x = np.asarray(audio, np.float32).ravel()
    n = 0 if len(x) < HK_FRAME else 1 + (len(x) - HK_FRAME) // HK_HOP
    window = np.hanning(HK_FRAME).astype(np.float32)
    edges = _band_edges(HK_FRAME)
    out = np.empty((n, HK_BANDS), np.float64)
    frames = np.lib.stride_tricks.sliding_window_view(x, HK_FRAME)[::HK_HOP] if n else np.empty((0, HK_FRAME))
    import scipy.fft

    for s in range(0, n, chunk):  # chunks bound the memory of the batched FFT
        spec = scipy.fft.rfft(frames[s:s + chunk] * window, axis=1)[:, edges[0]:edges[-1]]
        power = (spec.real.astype(np.float64) ** 2 + spec.imag.astype(np.float64) ** 2)
        out[s:s + chunk] = np.add.reduceat(power, edges[:-1] - edges[0], axis=1)  # bins [edge_m, edge_m+1)
    return out


def subfingerprints(audio: np.ndarray, rate: int = RATE) -> np.ndarray:
    """The clip's sub-fingerprints, uint32 [frames - 1] (bit m = F(n, m))."""
    e = band_energies(audio, rate)
    if len(e) < 2:
        return np.zeros(0, np.uint32)
    d = e[:, :-1] - e[:, 1:]  # E(n, m) - E(n, m+1), m = 0..31
    bits = (d[1:] - d[:-1]) > 0
    return (bits.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(1).astype(np.uint32)


def encode_fingerprint(fp: np.ndarray) -> str:
    return base64.b64encode(np.asarray(fp, "<u4").tobytes()).decode("ascii")


def decode_fingerprint(text: str | None) -> np.ndarray:
    if not text:
        return np.zeros(0, np.uint32)
    raw = base64.b64decode(text)
    if len(raw) % 4:
        raise ValueError(f"audio fingerprint of {len(raw)} bytes is not a whole number of uint32 sub-fingerprints")
    return np.frombuffer(raw, "<u4").astype(np.uint32)


def bit_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int32)


def best_alignment(a: np.ndarray, b: np.ndarray, offsets, min_overlap: int = HK_BLOCK) -> tuple[float, int, int]:
    """Lowest bit error rate of ``a`` against ``b`` over the given offsets (b[i] ~ a[i + offset]),
    over the whole overlap of the two at that offset (at least ``min_overlap`` sub-fingerprints).
    Returns (BER, offset, overlap); (1.0, 0, 0) when no offset overlaps enough."""
    best = (1.0, 0, 0)
    for off in sorted(set(int(o) for o in offsets)):
        lo_a, lo_b = max(0, off), max(0, -off)
        n = min(len(a) - lo_a, len(b) - lo_b)
        if n < min_overlap:
            continue
        ber = float(bit_errors(a[lo_a:lo_a + n], b[lo_b:lo_b + n]).sum()) / (32 * n)
        if ber < best[0]:
            best = (ber, off, n)
    return best
