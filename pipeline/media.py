"""Media I/O on PyAV (FFmpeg): probe, timed frame decoding, audio decoding, clip encoding.

Times are seconds on the source timeline (``pts * time_base``), the same for audio and video,
so an audio sample and a video frame with the same time were captured together. Output
clips put time 0 at their first frame.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

from .geometry import decode_size, square_pixel_size, stream_sar


class MediaError(RuntimeError):
    """A media file that cannot be used; ``reason`` is a short stable label for rejects rows."""

    def __init__(self, reason: str, detail: str = "", value: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.value = value


@contextlib.contextmanager
def open_container(uri: str):
    """Open a local path or any fsspec URI (s3://, gs://, http://) as a PyAV input container."""
    if "://" in uri and not uri.startswith("file://"):
        import fsspec

        with fsspec.open(uri, "rb") as f:
            with av.open(f, mode="r") as container:
                yield container
    else:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        with av.open(path, mode="r") as container:
            yield container


@dataclass
class ProbeResult:
    uri: str
    duration_s: float
    fps: float  # mean frame rate (frames / span), the honest number for VFR input
    nominal_fps: float  # what the container claims
    vfr: bool
    width: int  # display size in square pixels (coded size x sample aspect ratio), after rotation
    height: int
    rotation: int  # degrees the frames must be turned (counter-clockwise) for display
    video_codec: str
    n_frames: int
    video_start_s: float
    audio_codec: str | None
    audio_rate: int | None
    audio_channels: int | None
    audio_streams: int
    video_duration_s: float | None = None  # the video stream's own duration when the container states it
    size_bytes: int | None = None
    sample_aspect_ratio: str = "1:1"  # of the coded pixels; frames are resampled to square pixels
    coded_width: int | None = None  # the stream's own picture size, before SAR and rotation
    coded_height: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _rotation_of(stream, first_frame) -> int:
    rot = getattr(first_frame, "rotation", 0) if first_frame is not None else 0
    if not rot:
        with contextlib.suppress(Exception):
            rot = -int(float(stream.metadata.get("rotate", 0)))  # legacy tag is clockwise
    return int(round(rot)) % 360


def probe(uri: str, max_packets: int = 2000) -> ProbeResult:
    """Container facts. Frame intervals are read from packet timestamps (demux only, no decode).

    Variable frame rate: the frame intervals differ by more than 10% of their median for
    more than 5% of the frames (constant-rate streams have jitter of one time-base tick).
    """
    try:
        with open_container(uri) as c:
            if not c.streams.video:
                raise MediaError("no video stream", f"{uri} has no video stream")
            v = c.streams.video[0]
            audio = list(c.streams.audio)
            a = audio[0] if audio else None
            tb = float(v.time_base)
            pts = []
            for i, packet in enumerate(c.demux(v)):
                if packet.pts is not None:
                    pts.append(packet.pts)
                if i >= max_packets:
                    break
            if not pts:
                raise MediaError("no video frames", f"{uri}: the video stream holds no packets")
            c.seek(0)
            first = None
            with contextlib.suppress(Exception):
                first = next(c.decode(v))
            if first is None:
                raise MediaError("undecodable video", f"{uri}: no frame could be decoded")
            pts = np.sort(np.asarray(pts, dtype=np.float64)) * tb
            intervals = np.diff(pts)
            intervals = intervals[intervals > 0]
            nominal = float(v.average_rate or v.guessed_rate or 0) or (1 / np.median(intervals) if len(intervals) else 25.0)
            if len(intervals) >= 2:
                med = float(np.median(intervals))
                vfr = bool(np.mean(np.abs(intervals - med) > 0.1 * med) > 0.05)
            else:
                vfr = False
            if c.duration is not None:
                duration = c.duration / av.time_base
            elif v.duration is not None:
                duration = v.duration * tb
            else:
                duration = float(pts[-1] - pts[0]) + (float(np.median(intervals)) if len(intervals) else 0)
            n_frames = int(v.frames) if v.frames else len(pts)
            span = float(pts[-1] - pts[0]) if len(pts) > 1 else 0.0
            fps = (len(pts) - 1) / span if span > 0 else nominal
            rotation = _rotation_of(v, first)
            sar = stream_sar(v)
            w, h = square_pixel_size(first.width, first.height, sar)
            if rotation in (90, 270):
                w, h = h, w
            return ProbeResult(
                uri=uri, duration_s=float(duration), fps=float(fps), nominal_fps=float(nominal), vfr=vfr,
                width=int(w), height=int(h), rotation=rotation, video_codec=v.codec_context.name,
                n_frames=n_frames, video_start_s=float(pts[0]),
                audio_codec=a.codec_context.name if a else None,
                audio_rate=int(a.rate) if a else None,
                audio_channels=int(a.channels) if a else None,
                audio_streams=len(audio),
                video_duration_s=float(v.duration * tb) if v.duration else None,
                size_bytes=_size_of(uri), sample_aspect_ratio=f"{sar.numerator}:{sar.denominator}",
                coded_width=int(first.width), coded_height=int(first.height))
    except MediaError:
        raise
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as e:
        raise MediaError("unreadable container", f"{uri}: {e}") from e
    except OSError as e:  # missing or unreadable through fsspec (s3 404, permission): final, not retried
        raise MediaError("cannot open", f"{uri}: {type(e).__name__}: {e}") from e


def _size_of(uri: str) -> int | None:
    with contextlib.suppress(Exception):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return int(fs.size(path))
    return None


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    # Display-matrix rotation is counter-clockwise in degrees; np.rot90 turns counter-clockwise.
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def iter_frames(uri: str, *, start_s: float = 0.0, end_s: float | None = None, rotation: int = 0,
                fmt: str = "rgb24", max_side: int | None = None,
                square_pixels: bool = True) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (time_s, HxWx3 uint8 array) for every decoded frame with time in [start_s, end_s).

    Frames come in square pixels (``square_pixels``: resampled by the stream's sample aspect
    ratio, pipeline.geometry), so they have the size ``probe`` reports as width x height.

    Decoding errors mid-stream raise MediaError("decode error") naming the file and time, so a
    truncated file becomes a rejects row instead of a silently shorter clip.
    """
    with open_container(uri) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO"
        tb = float(v.time_base)
        sar = stream_sar(v) if square_pixels else 1
        if start_s > 1.0:
            with contextlib.suppress(Exception):
                c.seek(int(max(0.0, start_s - 1.0) / tb), stream=v, backward=True)
        last_t = None
        try:
            for frame in c.decode(v):
                if frame.pts is None:
                    continue
                t = frame.pts * tb
                if t < start_s - 1e-6:
                    continue
                if end_s is not None and t >= end_s:
                    break
                size = decode_size(frame.width, frame.height, sar, max_side)
                if size != (frame.width, frame.height):
                    # anamorphic: bicubic resampling of the width (FFmpeg's scale default)
                    frame = frame.reformat(width=size[0], height=size[1],
                                           interpolation="BICUBIC" if sar != 1 else None)
                img = frame.to_ndarray(format=fmt)
                last_t = t
                yield t, _rotate(img, rotation)
        except (av.error.InvalidDataError, av.error.FFmpegError) as e:
            where = f"after t={last_t:.3f}s" if last_t is not None else "before the first frame"
            raise MediaError("decode error", f"{uri}: {e} ({where})") from e


def decode_audio(uri: str, rate: int = 16000, *, start_s: float | None = None,
                 end_s: float | None = None) -> tuple[np.ndarray, float]:
    """Whole first audio stream as float32 mono at ``rate``, plus the source time of sample 0.

    Resampling and down-mixing use FFmpeg's swresample through PyAV's AudioResampler.
    """
    with open_container(uri) as c:
        if not c.streams.audio:
            raise MediaError("no audio stream", f"{uri} has no audio stream")
        a = c.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks: list[np.ndarray] = []
        t0 = None
        total = 0  # samples placed so far (the resampler holds back only a few)
        try:
            for frame in c.decode(a):
                if frame.pts is not None:
                    t = float(frame.pts * a.time_base)
                    if t0 is None:
                        t0 = t
                    # Place audio by its timestamps: a gap in the stream (dropped packets, a paused
                    # capture) is filled with silence and an overlap trimmed, so audio after it
                    # stays aligned with the video instead of sliding early.
                    drift = int(round((t - t0) * rate)) - total
                    if drift > rate // 50:  # more than 20 ms missing
                        chunks.append(np.zeros(drift, np.float32))
                        total += drift
                    elif drift < -(rate // 50) and chunks:
                        cut = min(-drift, len(chunks[-1]))
                        chunks[-1] = chunks[-1][: len(chunks[-1]) - cut]
                        total -= cut
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += len(chunks[-1])
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except (av.error.InvalidDataError, av.error.FFmpegError) as e:
            raise MediaError("audio decode error", f"{uri}: {e}") from e
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    t0 = t0 or 0.0
    if start_s is not None or end_s is not None:
        samples = slice_audio(samples, t0, rate, start_s or t0, end_s)
        t0 = start_s if start_s is not None else t0
    return samples, t0


def slice_audio(samples: np.ndarray, t0: float, rate: int, start_s: float, end_s: float | None) -> np.ndarray:
    """Samples covering [start_s, end_s) of the source timeline; zero-padded where the stream
    does not reach (audio that starts late or ends early stays aligned to the video)."""
    if end_s is None:
        end_s = t0 + len(samples) / rate
    n = int(round((end_s - start_s) * rate))
    first = int(round((start_s - t0) * rate))
    out = np.zeros(n, dtype=np.float32)
    src_lo, src_hi = max(first, 0), min(first + n, len(samples))
    if src_hi > src_lo:
        out[src_lo - first:src_hi - first] = samples[src_lo:src_hi]
    return out


class ClipEncoder:
    """Streams RGB frames (H.264 yuv420p) and mono float audio (AAC) into an MP4 file.

    Video pts are frame indices at 1/fps and audio pts sample indices at 1/rate, both from 0,
    so the first frame and the first audio sample share time 0. The whole audio track is
    given up front and interleaved with the frames; frames are encoded as they arrive, so a
    30 s clip never sits in memory as raw frames.
    """

    def __init__(self, path: str, audio: np.ndarray, *, width: int, height: int, fps: int = 25,
                 audio_rate: int = 16000, crf: int = 18, preset: str = "veryfast", audio_bitrate: int = 96_000):
        self.path = path
        self.fps, self.audio_rate = fps, audio_rate
        # +faststart moves the index to the front on close (readers can stream the member).
        self._out = av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"})
        self._vs = self._out.add_stream("libx264", rate=fps)
        self._vs.width, self._vs.height, self._vs.pix_fmt = width, height, "yuv420p"
        self._vs.time_base = Fraction(1, fps)
        self._vs.options = {"crf": str(crf), "preset": preset}
        self._as = self._out.add_stream("aac", rate=audio_rate)
        self._as.layout = "mono"
        self._as.bit_rate = audio_bitrate
        self._as.time_base = Fraction(1, audio_rate)
        self._audio = np.asarray(audio, dtype=np.float32)
        self._audio_pos = 0
        self.audio = self._audio
        self.n_frames = 0

    def _feed_audio(self, upto: int) -> None:
        block = 1024
        while self._audio_pos < min(upto, len(self._audio)):
            chunk = self._audio[self._audio_pos:self._audio_pos + block]
            af = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="flt", layout="mono")
            af.sample_rate = self.audio_rate
            af.pts = self._audio_pos
            for packet in self._as.encode(af):
                self._out.mux(packet)
            self._audio_pos += len(chunk)

    def add_frame(self, img: np.ndarray) -> None:
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        vf.pts = self.n_frames
        for packet in self._vs.encode(vf):
            self._out.mux(packet)
        self.n_frames += 1
        self._feed_audio(self.n_frames * self.audio_rate // self.fps)

    def close(self) -> None:
        for packet in self._vs.encode(None):
            self._out.mux(packet)
        self._feed_audio(len(self._audio))
        for packet in self._as.encode(None):
            self._out.mux(packet)
        self._out.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._out.close()


def encode_clip(frames, audio: np.ndarray, *, fps: int = 25, audio_rate: int = 16000, crf: int = 18,
                preset: str = "veryfast", audio_bitrate: int = 96_000) -> bytes:
    """MP4 bytes of in-memory frames + audio (see ClipEncoder)."""
    with tempfile.TemporaryDirectory(prefix="clip-") as tmpdir:
        path = os.path.join(tmpdir, "clip.mp4")
        h, w = frames[0].shape[:2]
        enc = ClipEncoder(path, audio, width=w, height=h, fps=fps, audio_rate=audio_rate, crf=crf,
                          preset=preset, audio_bitrate=audio_bitrate)
        for img in frames:
            enc.add_frame(img)
        enc.close()
        with open(path, "rb") as f:
            return f.read()


def remux_with_audio(data: bytes, audio: np.ndarray, *, audio_rate: int = 16000, audio_bitrate: int = 96_000) -> bytes:
    """The same MP4 (video packets copied, not re-encoded) with a new mono AAC track."""
    with tempfile.TemporaryDirectory(prefix="remux-") as tmpdir:
        path = os.path.join(tmpdir, "clip.mp4")
        with av.open(io.BytesIO(data)) as src, av.open(path, "w", format="mp4",
                                                        options={"movflags": "+faststart"}) as out:
            vin = src.streams.video[0]
            vout = out.add_stream_from_template(vin)
            aout = out.add_stream("aac", rate=audio_rate)
            aout.layout = "mono"
            aout.bit_rate = audio_bitrate
            aout.time_base = Fraction(1, audio_rate)
            for packet in src.demux(vin):
                if packet.dts is None:
                    continue
                packet.stream = vout
                out.mux(packet)
            mux_audio(out, aout, np.asarray(audio, dtype=np.float32)[None], audio_rate)
        with open(path, "rb") as f:
            return f.read()


def mux_audio(out, stream, channels: np.ndarray, rate: int, block: int = 1024) -> None:
    """Encode planar float audio [C, N] into ``stream`` (pts = sample index) and flush it."""
    layout = "mono" if channels.shape[0] == 1 else "stereo"
    for start in range(0, channels.shape[1], block):
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels[:, start:start + block]), format="fltp",
                                        layout=layout)
        af.sample_rate = rate
        af.pts = start
        for packet in stream.encode(af):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def read_clip(data: bytes) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode an MP4 (bytes) into frames [T,H,W,3] uint8, audio float32 mono and stream facts."""
    with av.open(io.BytesIO(data)) as c:
        v = c.streams.video[0]
        info = {"fps": float(v.average_rate), "width": v.codec_context.width, "height": v.codec_context.height,
                "audio_rate": c.streams.audio[0].rate if c.streams.audio else None,
                "audio_channels": c.streams.audio[0].channels if c.streams.audio else None}
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(v)])
    audio = np.zeros(0, np.float32)
    with av.open(io.BytesIO(data)) as c:
        if c.streams.audio:
            chunks = [f.to_ndarray().reshape(f.layout.nb_channels if hasattr(f.layout, "nb_channels") else 1, -1).mean(0)
                      for f in c.decode(audio=0)]
            audio = np.concatenate(chunks).astype(np.float32) if chunks else audio
    return frames, audio, info


def frame_times(n_frames: int, start_s: float, fps: int = 25) -> np.ndarray:
    return start_s + np.arange(n_frames) / fps


def n_output_frames(duration_s: float, fps: int = 25) -> int:
    return int(math.floor(duration_s * fps + 1e-6))
