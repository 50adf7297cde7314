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

from .media import AudioTrack, ClipEncoder, DecodeLog, MediaError, iter_frames, slice_audio
from .segment import CandidateClip


@dataclass
class CroppedClip:
    clip: CandidateClip
    mp4: bytes
    n_frames: int
    audio_samples: int
    audio: np.ndarray  # the clip's float32 16 kHz mono audio, exactly as muxed into mp4


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
        pad = max(0, -xi0, -yi0, xi1 - w, yi1 - h)
        src = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0) if pad else img
        region = src[yi0 + pad:yi1 + pad, xi0 + pad:xi1 + pad]
        scale = out / size
        resized = cv2.resize(region, (int(round(region.shape[1] * scale)), int(round(region.shape[0] * scale))),
                             interpolation=cv2.INTER_AREA)
        ox, oy = int(round((x0 - xi0) * scale)), int(round((y0 - yi0) * scale))
        patch = resized[oy:oy + out, ox:ox + out]
        if patch.shape[:2] != (out, out):
            patch = cv2.copyMakeBorder(patch, 0, out - patch.shape[0], 0, out - patch.shape[1], cv2.BORDER_REPLICATE)
        return np.ascontiguousarray(patch)
    return cv2.warpAffine(img, m, (out, out), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


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
        prev: tuple[float, np.ndarray] | None = None

        def emit_until(t_next: float, next_img: np.ndarray | None = None):
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
                    src_img = next_img if nearer_next else prev[1]
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

        try:
            for t, img in iter_frames(uri, start_s=max(0.0, start - 1.0), end_s=end + 1.0, rotation=rotation,
                                      damage=damage, limits=limits):
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
