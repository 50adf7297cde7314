"""Crop & normalise: source video -> 512x512, exactly 25 fps, 16 kHz mono clips, aligned.

One sequential decode of the source feeds every candidate clip of the video (clips may
overlap in time when several faces are tracked). Frame-rate conversion picks, for output
frame j at source time ``start + j/25``, the source frame whose pts is nearest to that time
(FFmpeg's ``fps`` filter, ``round=near``), which handles constant and variable frame rates alike;
holding the last frame with pts <= t instead lags by half a source interval on average
(definitions audit, item 8). Audio is cut from the same source timeline, so audio sample 0 is
captured with output frame 0.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import cv2
import numpy as np

from .media import AudioTrack, ClipEncoder, DecodeLog, MediaError, _reformatters, iter_frames, slice_audio
from .segment import CandidateClip


@dataclass
class CroppedClip:
    clip: CandidateClip
    mp4: bytes
    n_frames: int
    audio_samples: int
    audio: np.ndarray  # the clip's float32 16 kHz mono audio, exactly as muxed into mp4


def padded_crop(image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """``image[y0:y1, x0:x1]`` where the box may reach outside the image: black there. Only the
    crop is allocated (padding the whole frame first cost ~0.4 ms a frame; docs/benchmarks.md)."""
    h, w = image.shape[:2]
    crop = np.zeros((max(0, y1 - y0), max(0, x1 - x0)) + image.shape[2:], image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return crop


def crop_square(img: np.ndarray, x0: float, y0: float, size: float, out: int) -> np.ndarray:
    """Square region (float coordinates, may reach outside the frame: zero padding) resized to out x out."""
    # An affine warp samples the exact float box in one pass, pads outside the frame with black
    # and, with INTER_AREA for downscaling, avoids aliasing.
    s = out / size
    m = np.array([[s, 0, -x0 * s], [0, s, -y0 * s]], dtype=np.float64)
    if s < 1:
        # INTER_AREA is not supported by warpAffine; crop then resize with it instead.
        h, w = img.shape[:2]
        xi0, yi0 = int(np.floor(x0)), int(np.floor(y0))
        xi1, yi1 = int(np.ceil(x0 + size)), int(np.ceil(y0 + size))
        inside = xi0 >= 0 and yi0 >= 0 and xi1 <= w and yi1 <= h
        # a box reaching outside the frame: only the box is padded (the whole frame was, before: a
        # 1080x1920 copy per output frame; the same pixels, tested)
        region = img[yi0:yi1, xi0:xi1] if inside else padded_crop(img, xi0, yi0, xi1, yi1)
        scale = out / size
        resized = cv2.resize(region, (int(round(region.shape[1] * scale)), int(round(region.shape[0] * scale))),
                             interpolation=cv2.INTER_AREA)
        ox, oy = int(round((x0 - xi0) * scale)), int(round((y0 - yi0) * scale))
        patch = resized[oy:oy + out, ox:ox + out]
        if patch.shape[:2] != (out, out):
            patch = cv2.copyMakeBorder(patch, 0, out - patch.shape[0], 0, out - patch.shape[1], cv2.BORDER_REPLICATE)
        return np.ascontiguousarray(patch)
    return cv2.warpAffine(img, m, (out, out), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# Pixels around a crop box that its resampling may read: cubic interpolation reads 2 beyond the
# sample point; 4 leaves room for warpAffine's fixed-point coordinates.
REGION_MARGIN = 4
# The largest box (with its margin), as a share of the frame, converted region by region: the region's
# copies and frames cost ~0.9 ms a frame before any pixel is converted, so a 531 px box of a 1280x720
# frame (30%) cost 1.9-2.2 ms against 0.6-0.7 ms for the whole frame; a 424 px box of a 1080x1920 one
# (8.7%) ~2.0 against ~1.6 (2-core machine at load 10-20; docs/benchmarks.md, issue 13: 0.43 against
# 0.99 ms at lower load). It was 1/3.
REGION_MAX_FRACTION = 1 / 8
# Decoder formats converted region by region (4:2:0, 8 bit, even picture size: the chroma of a region
# on even pixels is the region's own, and swscale converts each pixel from its own luma and chroma).
_REGION_FORMATS = ("yuv420p", "yuvj420p")


def _coded_rect(rect: tuple[int, int, int, int], k: int, w: int, h: int) -> tuple[int, int, int, int]:
    """Display rectangle (x0, y0, x1, y1) of a frame shown as ``np.rot90(coded, k)`` -> the coded
    rectangle holding the same pixels (coded picture w x h), and back with ``_display_rect``."""
    x0, y0, x1, y1 = rect
    if k == 1:  # out[i, j] = in[j, w-1-i]
        return w - y1, x0, w - y0, x1
    if k == 2:  # out[i, j] = in[h-1-i, w-1-j]
        return w - x1, h - y1, w - x0, h - y0
    if k == 3:  # out[i, j] = in[h-1-j, i]
        return y0, h - x1, y1, h - x0
    return rect


def _display_rect(rect: tuple[int, int, int, int], k: int, w: int, h: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = rect
    if k == 1:
        return y0, w - x1, y1, w - x0
    if k == 2:
        return w - x1, h - y1, w - x0, h - y0
    if k == 3:
        return h - y1, x0, h - y0, x1
    return rect


class SourceFrame:
    """One decoded source frame, converted to RGB only where a crop box needs it.

    The whole-frame RGB conversion of a 1080x1920 source cost more than cutting a 512 crop from it;
    ``rgb_for(box)`` returns a display-sized RGB array in which the box (plus ``REGION_MARGIN``) holds
    exactly the pixels the whole-frame conversion gives (same swscale conversion, region on even
    coordinates) and everything else is black: the crop and the scores read only inside the box.
    Formats other than 8-bit 4:2:0 are converted whole, once. ``to_rgb``: a ``VideoReformatter`` kept
    for the whole decode (``media._reformatters``), which converts on one thread without building a
    swscale context (and FFmpeg's slice-thread pool) for every frame as ``frame.to_ndarray(format=...)``
    does: the same pixels (tested), ~0.1 ms less a frame (0.25 -> 0.15 ms at 450x450, 0.66 -> 0.52 ms
    at 1280x720; docs/benchmarks.md, issue 13)."""

    def __init__(self, frame, rotation: int = 0, to_rgb=None):
        self.frame, self.k = frame, (rotation // 90) % 4
        self.to_rgb = to_rgb
        self._whole: np.ndarray | None = None
        self._boxes: dict[tuple[float, float, float], np.ndarray] = {}  # a frame repeated at 25 fps is cut again

    def whole(self) -> np.ndarray:
        if self._whole is None:
            from .media import _rotate

            self._whole = _rotate(_rgb24(self.frame, self.to_rgb), self.k * 90)
            self.frame = None
        return self._whole

    def rgb_for(self, x0: float, y0: float, size: float) -> np.ndarray:
        f = self.frame
        # an odd picture size takes swscale's other path (chroma interpolated across 2x2 blocks)
        if self._whole is not None or f.format.name not in _REGION_FORMATS or f.width % 2 or f.height % 2:
            return self.whole()
        if ((min(size, f.width) + 2 * REGION_MARGIN) * (min(size, f.height) + 2 * REGION_MARGIN)
                > f.width * f.height * REGION_MAX_FRACTION):
            return self.whole()  # a box filling much of the frame: one whole conversion costs less than the copies
        key = (x0, y0, size)
        if key not in self._boxes:
            self._boxes[key] = self._region_rgb(x0, y0, size)
        return self._boxes[key]

    def _region_rgb(self, x0: float, y0: float, size: float) -> np.ndarray:
        f = self.frame
        w, h = f.width, f.height
        dw, dh = (h, w) if self.k % 2 else (w, h)
        rect = (max(0, int(np.floor(x0)) - REGION_MARGIN), max(0, int(np.floor(y0)) - REGION_MARGIN),
                min(dw, int(np.ceil(x0 + size)) + REGION_MARGIN), min(dh, int(np.ceil(y0 + size)) + REGION_MARGIN))
        out = np.zeros((dh, dw, 3), np.uint8)  # calloc'd: pages outside the region are never touched
        if rect[2] <= rect[0] or rect[3] <= rect[1]:
            return out
        cx0, cy0, cx1, cy1 = _coded_rect(rect, self.k, w, h)
        # chroma planes are half size: the region starts and ends on even coded pixels
        cx0, cy0, cx1, cy1 = cx0 & ~1, cy0 & ~1, min(w, cx1 + (cx1 & 1)), min(h, cy1 + (cy1 & 1))
        region = _yuv420_region(f, cx0, cy0, cx1, cy1, self.to_rgb)
        rx0, ry0, rx1, ry1 = _display_rect((cx0, cy0, cx1, cy1), self.k, w, h)
        out[ry0:ry1, rx0:rx1] = np.rot90(region, self.k) if self.k else region
        return out


def _rgb24(frame, to_rgb=None) -> np.ndarray:
    """``frame.to_ndarray(format="rgb24")``, through the kept reformatter ``to_rgb`` when there is one."""
    if to_rgb is None:
        return frame.to_ndarray(format="rgb24")
    return to_rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()


def _yuv420_region(frame, x0: int, y0: int, x1: int, y1: int, to_rgb=None) -> np.ndarray:
    """RGB of the coded rectangle [y0:y1, x0:x1] of a 4:2:0 frame (x0, y0 even), converted by swscale
    with the frame's colour space and range, exactly as ``frame.to_ndarray(format="rgb24")`` would
    convert those pixels of the whole frame."""
    import av

    w, h = x1 - x0, y1 - y0
    planes = [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size) for p in frame.planes]
    cw, ch = (w + 1) // 2, (h + 1) // 2
    y_plane = planes[0][y0:y1, x0:x1]
    u = planes[1][y0 // 2:y0 // 2 + ch, x0 // 2:x0 // 2 + cw]
    v = planes[2][y0 // 2:y0 // 2 + ch, x0 // 2:x0 // 2 + cw]
    i420 = np.concatenate([y_plane.ravel(), u.ravel(), v.ravel()]).reshape(h * 3 // 2, w)
    part = av.VideoFrame.from_ndarray(i420, format=frame.format.name)
    part.colorspace, part.color_range = frame.colorspace, frame.color_range
    return _rgb24(part, to_rgb)


def crop_and_normalize(uri: str, clips: list[CandidateClip], *, rotation: int, audio: AudioTrack | np.ndarray,
                       audio_t0: float = 0.0, size: int = 512, fps: int = 25, audio_rate: int = 16000,
                       crf: int = 18, preset: str = "veryfast", audio_bitrate: int = 96_000,
                       on_error=None, on_frame=None, on_source_frame=None, limits=None):
    """Yield CroppedClip for every clip; a clip that fails yields (clip, MediaError) via ``on_error``.

    ``audio``: the source's ``AudioTrack`` at ``audio_rate`` (the curation path): a clip's audio is
    cut only from decoded samples, and a clip reaching outside them fails ("audio not covered")
    before any frame is decoded. A plain array (sample 0 at ``audio_t0``) is zero-padded where it
    does not reach, for tools that score whatever they are given.
    With an AudioTrack, decoding goes on past damaged packets (``iter_frames`` with a DecodeLog)
    and a clip overlapping a damaged range found here fails ("damaged stream").
    ``on_frame(clip, frame)`` sees every output frame (the scoring stage measures on them);
    ``on_source_frame(clip, img)`` the full-resolution source frame each one was cut from (quality
    measures on the source's coding grid, pipeline/scoring/quality.py). ``limits``: media.DecodeLimits.
    """
    if isinstance(audio, AudioTrack):
        covered = []
        for c in clips:
            first, n = audio.index_of(c.start_s), c.n_frames * audio_rate // fps
            if audio.covers(first, n):
                covered.append(c)
            elif on_error is not None:
                on_error(c, audio.not_covered(first, n, uri))
        clips = covered
    if not clips:
        return
    # Tolerant decoding on the curation path only (its clips were placed around the damage the
    # detect pass found); tools handing a plain array keep the strict decode that raises.
    # Every damaged range before a yielded (clean) frame is closed and logged by then, so the check
    # when a clip completes sees all damage inside it.
    damage = DecodeLog() if isinstance(audio, AudioTrack) else None

    def clip_audio_of(c: CandidateClip) -> np.ndarray:
        if isinstance(audio, AudioTrack):
            return audio.cut(audio.index_of(c.start_s), c.n_frames * audio_rate // fps, uri=uri)
        return slice_audio(audio, audio_t0, audio_rate, c.start_s, c.start_s + c.n_frames / fps)

    tmpdir = tempfile.mkdtemp(prefix="crop-")
    try:
        order = sorted(clips, key=lambda c: c.start_s)
        start = order[0].start_s
        end = max(c.end_s for c in clips)
        encoders: dict[int, ClipEncoder] = {}
        written: dict[int, int] = {c.clip_index: 0 for c in clips}
        targets = {c.clip_index: c.start_s + np.arange(c.n_frames) / fps for c in clips}
        done: set[int] = set()
        prev: tuple[float, SourceFrame] | None = None

        def emit_until(t_next: float, next_img: SourceFrame | None = None):
            # Every output time before the next source frame's pts lies between `prev` and that
            # frame: it takes the nearer of the two (ties go to `prev`, the earlier frame).
            for c in clips:
                ci = c.clip_index
                if ci in done or prev is None:
                    continue
                tt = targets[ci]
                while written[ci] < c.n_frames and tt[written[ci]] + 1e-4 < t_next:
                    if ci not in encoders:
                        clip_audio = clip_audio_of(c)
                        encoders[ci] = ClipEncoder(os.path.join(tmpdir, f"{ci}.mp4"), clip_audio, width=size,
                                                   height=size, fps=fps, audio_rate=audio_rate, crf=crf,
                                                   preset=preset, audio_bitrate=audio_bitrate)
                    t_out = tt[written[ci]]
                    nearer_next = next_img is not None and t_next - t_out < t_out - prev[0]
                    src = next_img if nearer_next else prev[1]
                    src_img = src.rgb_for(c.crop_x0, c.crop_y0, c.crop_size)
                    out_frame = crop_square(src_img, c.crop_x0, c.crop_y0, c.crop_size, size)
                    if on_source_frame is not None:
                        on_source_frame(c, src_img)
                    encoders[ci].add_frame(out_frame)
                    if on_frame is not None:
                        on_frame(c, out_frame)
                    written[ci] += 1

        def finish_ready():
            for c in clips:
                ci = c.clip_index
                if ci not in done and written[ci] == c.n_frames and ci in encoders:
                    hit = [(a, b) for a, b in (damage.damaged if damage else []) if a < c.end_s and b > c.start_s]
                    if hit:
                        encoders.pop(ci).abort()
                        done.add(ci)
                        if on_error is not None:
                            on_error(c, MediaError("damaged stream",
                                                   f"{uri}: clip {ci} ({c.start_s:.2f}-{c.end_s:.2f} s) overlaps "
                                                   f"damaged video {hit[0][0]:.2f}-{hit[0][1]:.2f} s"))
                        continue
                    # dropped once done: a closed encoder still holds x264's state (~8 MB), and a long
                    # input has dozens of clips
                    encoder = encoders.pop(ci)
                    encoder.close()
                    with open(encoder.path, "rb") as f:
                        data = f.read()
                    os.unlink(encoder.path)
                    done.add(ci)
                    yield CroppedClip(clip=c, mp4=data, n_frames=c.n_frames, audio_samples=c.n_frames * audio_rate // fps,
                                      audio=encoder.audio)

        _, to_rgb = _reformatters()  # one RGB converter for the whole decode
        try:
            for t, frame in iter_frames(uri, start_s=max(0.0, start - 1.0), end_s=end + 1.0, rotation=rotation,
                                        damage=damage, limits=limits, raw=True):
                # converted to RGB only inside the crop boxes that use it
                img = SourceFrame(frame, rotation, to_rgb)
                emit_until(t, img)
                yield from finish_ready()
                prev = (t, img)
            if prev is not None:
                # The last frame stays on screen for at most one more source frame interval; a clip
                # reaching further than that is incomplete (truncated stream) and is reported below.
                emit_until(prev[0] + 0.2)
            yield from finish_ready()
        except MediaError as e:
            for c in clips:
                if c.clip_index not in done:
                    if c.clip_index in encoders:
                        encoders[c.clip_index].abort()
                    done.add(c.clip_index)
                    if on_error is not None:
                        on_error(c, e)
            return
        for c in clips:
            if c.clip_index not in done:
                if c.clip_index in encoders:
                    encoders[c.clip_index].abort()
                if on_error is not None:
                    on_error(c, MediaError("decode error", f"{uri}: stream ended after {written[c.clip_index]} of "
                                                           f"{c.n_frames} frames of clip {c.clip_index}"))
    finally:
        for name in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, name))
        os.rmdir(tmpdir)
