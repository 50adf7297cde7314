"""Technical quality of a clip: sharpness, blockiness, bits per pixel, exposure.

Pure functions on arrays and probe facts; ``QualityAccumulator`` collects them per frame for
``pipeline/clip_scores.py``. Definitions and their sources (docs/scoring.md, "Quality"):

- **Sharpness**: variance of the Laplacian (Pech-Pacheco, Cristobal, Chamorro-Martinez &
  Fernandez-Valdivia, "Diatom autofocusing in brightfield microscopy: a comparative study",
  ICPR 2000), the 3x3 kernel ``[[0,1,0],[1,-4,1],[0,1,0]]`` (OpenCV ``Laplacian``, ksize=1) on
  the grey face patch at a fixed face scale: the square around the face box, side = the box's
  longer side, resampled to ``FACE_SCALE`` px (area averaging), so a face of any size in the
  512 crop is measured at the same number of pixels per face.
- **Blockiness**: Wang, Sheikh & Bovik, "No-reference perceptual quality assessment of JPEG
  compressed images", ICIP 2002 (Zhou Wang's ``jpeg_quality_score.m``): features B (mean
  absolute difference across 8x8 block boundaries), A (mean absolute difference inside blocks),
  Z (zero-crossing rate of the differences) and the quality score S. Measured on the SOURCE
  frame's 8x8 coding grid (the 512 crop's resampling moves the grid), inside the clip's crop
  box. ``blockiness`` = B / A: ~1 without block edges, above 1 with them.
- **Bits per pixel**: the source video stream's bit rate / (coded width x coded height x fps).
- **Exposure**: share of face-patch pixels with luma <= 5 (clipped shadows) or >= 250
  (clipped highlights), BT.601 luma of the RGB frame.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

FACE_SCALE = 128  # px: the face box's longer side is resampled to this before the Laplacian
SHADOW_LUMA = 5
HIGHLIGHT_LUMA = 250
BLOCK = 8

# jpeg_quality_score.m (Wang, Sheikh & Bovik 2002): S = alpha + beta B^g1 A^g2 Z^g3,
# fitted on the LIVE JPEG database (MOS on a 1..10 scale).
WSB_ALPHA = -245.8909
WSB_BETA = 261.9373
WSB_GAMMAS = (-239.8886 / 10000, 160.1664 / 10000, 64.2859 / 10000)


def grey(img: np.ndarray) -> np.ndarray:
    """BT.601 luma (OpenCV's RGB2GRAY weights) of an RGB uint8 image, float64."""
    if img.ndim == 2:
        return img.astype(np.float64)
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY).astype(np.float64)


def face_patch(img: np.ndarray, box, side: int = FACE_SCALE) -> np.ndarray | None:
    """Grey ``side`` x ``side`` patch of the square around ``box`` (x0, y0, x1, y1), side = the
    box's longer side, area-resampled; None for a missing box. Outside the image counts as black."""
    box = np.asarray(box, np.float64)
    if not np.isfinite(box).all():
        return None
    s = float(max(box[2] - box[0], box[3] - box[1]))
    if s < 2:
        return None
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    from ..crop import crop_square

    g = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
    return crop_square(g, cx - s / 2, cy - s / 2, s, side).astype(np.float64)


def laplacian_variance(patch: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian (Pech-Pacheco et al. 2000) of a grey image."""
    return float(cv2.Laplacian(np.asarray(patch, np.float64), cv2.CV_64F, ksize=1).var())


def clipped_fractions(patch: np.ndarray, low: int = SHADOW_LUMA, high: int = HIGHLIGHT_LUMA) -> tuple[float, float]:
    """(share of pixels <= low, share >= high) of a grey 0..255 image."""
    p = np.asarray(patch)
    return float((p <= low).mean()), float((p >= high).mean())


def wsb_features(img: np.ndarray, phase_x: int = BLOCK - 1, phase_y: int = BLOCK - 1,
                 directions: str = "hv") -> dict:
    """B, A, Z and S of Wang, Sheikh & Bovik (2002), as ``jpeg_quality_score.m`` computes them.

    ``phase_x`` / ``phase_y``: index of the difference ``x[n+1] - x[n]`` that crosses the first
    block boundary (7 when the grid starts at pixel 0, as in the reference); ``directions``:
    "h" (differences along rows), "v" (along columns) or both, averaged as the reference does.

    The differences of the 8-bit luma are integers, so they are taken in int16 and every mean is an
    exact integer sum over a count: the same floats as the reference's float64 arrays (whose sums of
    integers are exact too), at a quarter of the memory traffic, and the vertical direction is
    differenced in place instead of through a transposed copy (6.4 ms a source frame before,
    docs/benchmarks.md, issue 13).
    """
    luma = _grey_u8(img)
    # uint8 luma: integer differences; anything else (a float image) as the reference, in float64
    luma = luma.astype(np.int16 if luma.dtype == np.uint8 else np.float64)
    feats = []
    for d in directions:
        axis = 1 if d == "h" else 0
        phase = phase_x if d == "h" else phase_y
        n = luma.shape[axis]
        if n < 2 * BLOCK or luma.shape[1 - axis] < 2:
            raise ValueError(f"image too small for 8x8 block features: {luma.shape}")
        diff = np.diff(luma, axis=axis)
        # boundaries between two whole blocks: at pixel c = col + 1 with c >= 8 and c + 8 <= N, the
        # reference's difference columns 8:8:8*(floor(N/8)-1) (1-based) when the grid starts at 0
        cols = np.arange(phase % BLOCK, n - 1, BLOCK)
        cols = cols[(cols + 1 >= BLOCK) & (cols + 1 + BLOCK <= n)]
        b = _mean_abs(np.take(diff, cols, axis=axis))
        a = (BLOCK * _mean_abs(diff) - b) / (BLOCK - 1)
        s = np.sign(diff)
        crossings = s[:, :-1] * s[:, 1:] if axis == 1 else s[:-1] * s[1:]
        z = np.count_nonzero(crossings < 0) / crossings.size
        feats.append((b, a, z))
    b, a, z = (float(np.mean(v)) for v in zip(*feats))
    return {"B": b, "A": a, "Z": z, "S": wsb_score(b, a, z)}


def _grey_u8(img: np.ndarray) -> np.ndarray:
    """BT.601 luma (OpenCV's RGB2GRAY) of an RGB uint8 image, uint8 (``grey`` before its float cast);
    a 2-D image as it is."""
    if img.ndim == 2:
        return img
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)


def _mean_abs(diff: np.ndarray) -> float:
    """Mean |difference| of integer differences: the exact sum over the count, as float64's mean of
    the same integers gives (NaN for none, as numpy's mean of an empty array)."""
    if diff.size == 0:
        return math.nan
    if diff.dtype.kind == "f":
        return float(np.abs(diff).mean())
    return float(np.abs(diff).sum(dtype=np.int64)) / diff.size


def wsb_score(b: float, a: float, z: float) -> float | None:
    """The reference's quality prediction (higher = better; None where a feature is 0)."""
    if min(b, a, z) <= 0:
        return None
    g1, g2, g3 = WSB_GAMMAS
    return float(WSB_ALPHA + WSB_BETA * b ** g1 * a ** g2 * z ** g3)


def blockiness(b: float, a: float) -> float | None:
    """B / A: block-boundary differences over in-block differences (1 = no block edges)."""
    return None if a <= 0 else float(b / a)


def grid_phase(length: int, reversed_axis: bool) -> int:
    """Phase (see ``wsb_features``) of the 8x8 grid along a displayed axis of ``length`` pixels
    that runs along (False) or against (True) the coded picture's axis. ``np.rot90`` (the
    pipeline's display rotation) reverses one axis for 90/270 degrees and both for 180."""
    return (length - 1) % BLOCK if reversed_axis else BLOCK - 1


def display_grid(rotation: int, width: int, height: int) -> tuple[int, int]:
    """(phase_x, phase_y) of the coded 8x8 grid on a frame displayed ``width`` x ``height``
    after ``np.rot90(img, rotation // 90)`` (pipeline.media._rotate)."""
    k = (rotation // 90) % 4
    # np.rot90 k=1: out[i, j] = in[j, W-1-i]: rows run against the coded columns, columns along
    # the coded rows; k=2 reverses both axes; k=3: out[i, j] = in[H-1-j, i].
    rev_x, rev_y = {0: (False, False), 1: (False, True), 2: (True, True), 3: (True, False)}[k]
    return grid_phase(width, rev_x), grid_phase(height, rev_y)


def source_region(width: int, height: int, x0: float, y0: float, size: float,
                  picture=None) -> tuple[int, int, int, int] | None:
    """Integer (x0, y0, x1, y1) of a crop box inside a width x height frame and inside
    ``picture`` (the active picture [x0, y0, x1, y1], rounded inwards, so a bar's edge is left
    out); None when < 16 px."""
    px0, py0, px1, py1 = picture if picture is not None else (0, 0, width, height)
    a = max(0, int(math.floor(x0)), int(math.ceil(px0)))
    b = max(0, int(math.floor(y0)), int(math.ceil(py0)))
    c = min(width, int(math.ceil(x0 + size)), int(math.floor(px1)))
    d = min(height, int(math.ceil(y0 + size)), int(math.floor(py1)))
    if c - a < 2 * BLOCK or d - b < 2 * BLOCK:
        return None
    return a, b, c, d


def bits_per_pixel(bit_rate: float | None, width: int | None, height: int | None, fps: float | None) -> float | None:
    """Video bits per pixel per frame: bit rate / (width x height x fps); None when unknown."""
    if not bit_rate or not width or not height or not fps or bit_rate <= 0:
        return None
    return float(bit_rate) / (float(width) * float(height) * float(fps))


def source_bpp(probe: dict) -> float | None:
    """Bits per coded pixel per frame of the source video stream, from probe facts: the stream's
    bit rate, else (file size x 8 - audio bit rate x duration) / duration."""
    rate = probe.get("video_bit_rate")
    if not rate and probe.get("size_bytes") and probe.get("duration_s"):
        rate = probe["size_bytes"] * 8 / probe["duration_s"] - (probe.get("audio_bit_rate") or 0)
    w = probe.get("coded_width") or probe.get("width")
    h = probe.get("coded_height") or probe.get("height")
    return bits_per_pixel(rate, w, h, probe.get("fps"))


class QualityAccumulator:
    """Per-frame quality measurements of one clip.

    Face measures (sharpness, exposure) run on every ``face_stride``-th 512 crop frame (a 128 px
    patch: ~0.2 ms); blockiness on every ``source_stride``-th source frame, inside the crop box."""

    def __init__(self, face_stride: int = 1, source_stride: int = 5, iqa_model=None, iqa_stride: int = 25):
        self.face_stride, self.source_stride = face_stride, source_stride
        # optional learned IQA (pipeline/scoring/learned_iqa.py) on every iqa_stride-th crop frame
        self.iqa_model, self.iqa_stride = iqa_model, iqa_stride
        self.iqa_frames: list[np.ndarray] = []
        self.n_frames = 0
        self.n_face = self.n_source = 0
        self.sharpness: list[float] = []
        self.shadows: list[float] = []
        self.highlights: list[float] = []
        self.wsb: list[dict] = []

    def add_frame(self, frame: np.ndarray) -> None:
        """Every 512 crop frame (whole-frame measures: the learned model, when one is loaded)."""
        i, self.n_frames = self.n_frames, self.n_frames + 1
        if self.iqa_model is not None and i % self.iqa_stride == 0:
            self.iqa_frames.append(frame)

    def add_face(self, frame: np.ndarray, box) -> None:
        i, self.n_face = self.n_face, self.n_face + 1
        if i % self.face_stride:
            return
        patch = face_patch(frame, box)
        if patch is None:
            return
        self.sharpness.append(laplacian_variance(patch))
        dark, bright = clipped_fractions(patch)
        self.shadows.append(dark)
        self.highlights.append(bright)

    def add_source(self, img: np.ndarray, region, phases: tuple[int, int], directions: str = "hv") -> None:
        i, self.n_source = self.n_source, self.n_source + 1
        if i % self.source_stride or region is None:
            return
        x0, y0, x1, y1 = region
        px, py = (phases[0] - x0) % BLOCK, (phases[1] - y0) % BLOCK
        self.wsb.append(wsb_features(img[y0:y1, x0:x1], phase_x=px, phase_y=py, directions=directions))

    def scores(self, probe: dict | None = None) -> tuple[dict, dict]:
        """(scores columns, detail): medians over the sampled frames (sharpness, blockiness) and
        means (clipped shares); bpp from the probe facts."""
        out: dict = {"sharpness": _median(self.sharpness), "shadow_clip_frac": _mean(self.shadows),
                     "highlight_clip_frac": _mean(self.highlights)}
        ratios = [blockiness(f["B"], f["A"]) for f in self.wsb]
        out["blockiness"] = _median([r for r in ratios if r is not None])
        out["wsb_quality"] = _median([f["S"] for f in self.wsb if f["S"] is not None])
        out["bpp"] = source_bpp(probe) if probe else None
        if self.iqa_model is not None and self.iqa_frames:
            from .learned_iqa import score_frames

            out["learned_iqa"] = float(np.mean(score_frames(self.iqa_model, np.stack(self.iqa_frames))))
            self.iqa_frames = []
        detail = {"face_scale_px": FACE_SCALE, "face_frames": len(self.sharpness), "source_frames": len(self.wsb),
                  "face_stride": self.face_stride, "source_stride": self.source_stride,
                  "sharpness_p10": _pct(self.sharpness, 10), "sharpness_p90": _pct(self.sharpness, 90),
                  "wsb_B": _median([f["B"] for f in self.wsb]), "wsb_A": _median([f["A"] for f in self.wsb]),
                  "wsb_Z": _median([f["Z"] for f in self.wsb])}
        return out, detail


def _median(v):
    return float(np.median(v)) if len(v) else None


def _mean(v):
    return float(np.mean(v)) if len(v) else None


def _pct(v, q):
    return float(np.percentile(v, q)) if len(v) else None


def grid_directions(rotation: int, sample_aspect_ratio: str = "1:1") -> str:
    """Directions whose 8x8 grid survives to the displayed frame: an anamorphic source
    (SAR != 1:1) is resampled along its coded width (pipeline.geometry), which moves that axis's
    grid, so only the other direction is measured ("v" unrotated, "h" at 90/270 degrees)."""
    num, _, den = str(sample_aspect_ratio or "1:1").partition(":")
    if num == (den or "1"):
        return "hv"
    return "h" if (rotation // 90) % 2 else "v"
