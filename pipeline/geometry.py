"""Picture geometry: square pixels, the active picture inside burned-in bars, crop padding.

- **Sample aspect ratio (SAR).** A stream whose pixels are not square (anamorphic DV, DVD,
  broadcast) is resampled to square pixels before anything looks at it, the way FFmpeg's
  ``scale=iw*sar:ih,setsar=1`` does: the width is multiplied by the SAR, the height kept. Every
  coordinate the pipeline stores (boxes, crops, the active picture) is in that square-pixel
  display space, after rotation.
- **Active picture.** Letterbox / pillarbox bars burned into the picture are found as FFmpeg's
  ``cropdetect`` filter finds them (libavfilter/vf_cropdetect.c, ``mode=black``, ``reset=0``):
  scanning from each edge inwards, a row (column) is a bar while the integer mean of its luma is
  not above ``limit`` (default 24 on the 8-bit limited-range scale); per frame the first and last
  non-bar row and column are found, and the active picture of a shot is the union of those
  boxes over the shot's frames. We add one thing cropdetect lacks: a bar may also be a
  near-constant non-black colour (grey or coloured bars), i.e. lines that are flat along their
  length and the same colour as the outermost line (clipped white is never taken for a bar: a
  blown-out sky at the frame edge is picture).
- **Padding share.** The share of a square crop's area that lies outside the active picture:
  the part the 512x512 clip shows as padding (black outside the coded frame, or the bar
  itself inside it).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

# vf_cropdetect.c: limit defaults to 24/255 of the luma range, i.e. 24 for 8-bit video.
CROPDETECT_LIMIT = 24
# A near-constant bar line: luma std along the line and its distance from the outermost line's
# mean both at most this many 8-bit levels (compressed burned-in bars measure < 1).
FLAT_BAR_TOLERANCE = 1.5
# Limited-range white: a flat line this bright is clipped picture (sky, window), not a bar.
CLIPPED_WHITE = 235


def stream_sar(stream) -> Fraction:
    """The stream's sample aspect ratio (pixel width / pixel height); 1 when unset (0/1 or None).
    PyAV answers with FFmpeg's ``av_guess_sample_aspect_ratio``: the container's (MP4 ``pasp``)
    when it states one, else the codec's (H.264 VUI), as ffprobe and players do."""
    sar = getattr(stream, "sample_aspect_ratio", None)
    if sar is None or sar <= 0:
        return Fraction(1)
    return Fraction(sar)


def square_pixel_size(width: int, height: int, sar: Fraction) -> tuple[int, int]:
    """Display size in square pixels of a ``width`` x ``height`` coded picture (FFmpeg
    ``scale=iw*sar:ih``): the width is resampled, rounded to even for 4:2:0 chroma."""
    if sar == 1:
        return width, height
    return max(2, int(round(width * sar / 2)) * 2), height


def decode_size(width: int, height: int, sar: Fraction, max_side: int | None) -> tuple[int, int]:
    """Size a coded frame is decoded to: square pixels, then at most ``max_side`` on its longest side."""
    w, h = square_pixel_size(width, height, sar)
    if max_side is not None and max(w, h) > max_side:
        s = max_side / max(w, h)
        w, h = max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)
    return w, h


@dataclass(frozen=True)
class ActivePicture:
    """The part of the frame that is picture, half-open pixel bounds [x0, x1) x [y0, y1)."""
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def as_list(self) -> list[float]:
        return [float(self.x0), float(self.y0), float(self.x1), float(self.y1)]

    @classmethod
    def full(cls, width: float, height: float) -> "ActivePicture":
        return cls(0.0, 0.0, float(width), float(height))


def limited_range_luma(img: np.ndarray) -> np.ndarray:
    """BT.601 limited-range luma (16 = black) of an RGB uint8 frame, the plane cropdetect reads."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return 16.0 + gray * (219.0 / 255.0)


def _first_picture_line(means: np.ndarray, stds: np.ndarray, limit: float, edge: float | None = None) -> int | None:
    """Index of the first line (from index 0 on) that is not a bar; None when every line is.
    ``edge``: the outermost line's mean when ``means`` starts further in (default ``means[0]``)."""
    black = np.floor(means) <= limit  # cropdetect: checkline() > limit marks picture
    edge = means[0] if edge is None else edge
    flat = (stds <= FLAT_BAR_TOLERANCE) & (np.abs(means - edge) <= FLAT_BAR_TOLERANCE) & (edge < CLIPPED_WHITE)
    picture = ~(black | flat)
    return int(np.argmax(picture)) if picture.any() else None


def frame_picture_bounds(img: np.ndarray, limit: float = CROPDETECT_LIMIT) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2): first and last picture column and row of one RGB frame, inclusive (the
    names and convention of cropdetect's metadata); None for a frame that is all bar (black), or
    whose rows or columns are all bars while the others are not (a bright band in a dark frame).

    Only the lines from each edge up to its first picture line are read: a line's verdict
    depends on its own luma and the outermost line's, so the lines past the first picture line
    do not matter, and most frames have none or a few bar lines (the whole frame's luma
    statistics cost ~1 ms a 960x540 frame, docs/benchmarks.md "Detect stage"). Each line's
    statistics are computed as over the whole frame (``limited_range_luma`` of the line, the
    same reductions), so the result is the same."""
    h, w = img.shape[:2]
    top = _first_edge_picture_line(img, 0, False, limit)
    if top is None:
        return None
    left = _first_edge_picture_line(img, 1, False, limit)
    if left is None:  # picture rows but every column dark (a bright band in a dark frame): no box
        return None
    bottom = h - 1 - _first_edge_picture_line(img, 0, True, limit)
    right = w - 1 - _first_edge_picture_line(img, 1, True, limit)
    return left, top, right, bottom


def _first_edge_picture_line(img: np.ndarray, axis: int, from_end: bool, limit: float) -> int | None:
    """``_first_picture_line`` of the rows (axis 0) or columns (axis 1) of ``img``, counted from
    the first or (``from_end``) the last one, reading a few lines at a time from that edge."""
    n = img.shape[axis]
    edge = None
    done, step = 0, 8
    while done < n:
        idx = slice(done, min(n, done + step))
        if from_end:
            idx = slice(n - idx.stop, n - idx.start)
        block = img[idx] if axis == 0 else img[:, idx]
        y = limited_range_luma(np.ascontiguousarray(block))
        means, stds = (y.mean(axis=1), y.std(axis=1)) if axis == 0 else (y.mean(axis=0), y.std(axis=0))
        if from_end:
            means, stds = means[::-1], stds[::-1]
        if edge is None:
            edge = means[0]
        first = _first_picture_line(means, stds, limit, edge)
        if first is not None:
            return done + first
        done += len(means)
        step *= 4
    return None


class ActivePictureTracker:
    """Union of the per-frame picture bounds, one per shot (cropdetect with a reset at each cut)."""

    def __init__(self, limit: float = CROPDETECT_LIMIT):
        self.limit = limit
        self._shots: list[tuple[int, int, int, int] | None] = []
        self._frame_size: tuple[int, int] | None = None

    def new_shot(self) -> None:
        self._shots.append(None)

    def add(self, img: np.ndarray) -> None:
        if not self._shots:
            self.new_shot()
        self._frame_size = (img.shape[1], img.shape[0])
        if self._shots[-1] == (0, 0, img.shape[1] - 1, img.shape[0] - 1):
            # The shot's union is already the whole frame, which no frame can widen: the rest of the
            # shot is not read (most shots have no bars: ~1 CPU s a round of the real clips,
            # docs/benchmarks.md issue 13).
            return
        b = frame_picture_bounds(img, self.limit)
        if b is None:
            return
        cur = self._shots[-1]
        self._shots[-1] = b if cur is None else (min(cur[0], b[0]), min(cur[1], b[1]),
                                                 max(cur[2], b[2]), max(cur[3], b[3]))

    def bounds(self) -> list[tuple[int, int, int, int] | None]:
        """Per shot (x1, y1, x2, y2) inclusive, in the pixels of the frames given to ``add``."""
        return list(self._shots)

    def pictures(self, width: int, height: int) -> list[ActivePicture]:
        """Per shot active picture in a ``width`` x ``height`` frame (the frames given may be a
        downscaled copy of it); a shot with no picture line at all is taken as the full frame."""
        if self._frame_size is None:
            return [ActivePicture.full(width, height) for _ in self._shots]
        sx, sy = width / self._frame_size[0], height / self._frame_size[1]
        out = []
        for b in self._shots:
            if b is None:
                out.append(ActivePicture.full(width, height))
            else:
                out.append(ActivePicture(b[0] * sx, b[1] * sy, min((b[2] + 1) * sx, width),
                                         min((b[3] + 1) * sy, height)))
        return out


def place_in_picture(start: float, size: float, lo: float, hi: float) -> float:
    """Move a crop edge ``start`` (side ``size``) along one axis, as little as possible, so that
    the crop lies inside [lo, hi] when it fits, and otherwise covers all of [lo, hi] (the least
    padding a crop larger than the picture can have)."""
    return float(min(max(start, min(lo, hi - size)), max(lo, hi - size)))


def outside_share(x0: float, y0: float, size: float, picture: ActivePicture) -> float:
    """Share of the square crop [x0, x0+size) x [y0, y0+size) lying outside ``picture``."""
    if size <= 0:
        return 0.0
    ix = max(0.0, min(x0 + size, picture.x1) - max(x0, picture.x0))
    iy = max(0.0, min(y0 + size, picture.y1) - max(y0, picture.y0))
    return float(max(0.0, 1.0 - ix * iy / (size * size)))
