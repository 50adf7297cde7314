"""Media I/O on PyAV (FFmpeg): probe, timed frame decoding, audio decoding, clip encoding.

Times are seconds on the source timeline (``pts * time_base``), the same for audio and video,
so an audio sample and a video frame with the same time were captured together. Output
clips put time 0 at their first frame.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import math
import os
import re
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
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


# ---- per-input time limit (probe.input_timeout_s): a deadline for the decoding of one input,
# set by the stage (``run_with_deadline``) and checked by every demux/decode loop below, plus the
# network read timeout of remote opens. A context variable: each watchdog thread has its own.
_DEADLINE: contextvars.ContextVar[tuple[float, float, float] | None] = contextvars.ContextVar("media_deadline",
                                                                                             default=None)
DEFAULT_READ_TIMEOUT_S = 60.0
_STUCK_THREADS: list[threading.Thread] = []  # watchdog threads given up on, still running (see run_with_deadline)


@contextlib.contextmanager
def input_deadline(seconds: float, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
    """Decoding in this context raises MediaError("timed out") once ``seconds`` have passed, and
    remote reads that receive nothing for ``read_timeout_s`` fail."""
    token = _DEADLINE.set((time.monotonic() + seconds, float(seconds), float(read_timeout_s)))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_deadline(uri: str) -> None:
    """Cooperative check, once per packet: past the deadline the decoding of ``uri`` stops."""
    d = _DEADLINE.get()
    if d is not None and time.monotonic() > d[0]:
        raise MediaError("timed out", f"{uri}: still reading after the per-input limit of {d[1]:.0f} s "
                                      "(probe.input_timeout_s)", value=d[1])


def run_with_deadline(fn, *, seconds: float, uri: str, what: str, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
    """``fn()`` in a watchdog thread under ``input_deadline(seconds)``; MediaError("timed out")
    when it has not returned ``seconds`` (plus a grace for the cooperative checks to answer
    first) later.

    Ray Data has no per-row timeout and a Python thread cannot be killed, so a call that still
    does not return (blocked in a native decoder, or in a read the read timeout does not cover)
    is left running as a daemon thread: the stage moves on to its next input, the thread stops at
    its next deadline check or failed read, and if it never does it holds its memory until the
    actor exits (``stuck_threads`` counts them; each one is named in the reject's detail).
    """
    box: dict = {}

    def work():
        with input_deadline(seconds, read_timeout_s):
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = e

    thread = threading.Thread(target=work, name=f"deadline {what}: {uri[:200]}", daemon=True)
    thread.start()
    thread.join(seconds + min(30.0, 0.1 * seconds) + 1.0)
    if thread.is_alive():
        _STUCK_THREADS.append(thread)
        raise MediaError("timed out", f"{uri}: {what} did not finish within the per-input limit of {seconds:.0f} s "
                                      f"(probe.input_timeout_s); abandoned, {stuck_threads()} such call(s) still "
                                      "running in this worker", value=seconds)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def stuck_threads() -> int:
    """Abandoned watchdog threads of this process that have not ended yet."""
    _STUCK_THREADS[:] = [t for t in _STUCK_THREADS if t.is_alive()]
    return len(_STUCK_THREADS)


def _remote_options(uri: str) -> dict:
    """fsspec storage options bounding network waits (probe.read_timeout_s): for http(s),
    aiohttp's connect and per-read timeouts (its default is a 5-minute total per request, which
    a long download legitimately exceeds); for s3, botocore's."""
    d = _DEADLINE.get()
    read_s = d[2] if d is not None else DEFAULT_READ_TIMEOUT_S
    if uri.startswith(("s3://", "s3a://")):  # s3fs: botocore's connect/read timeouts (its default is 60 s each)
        return {"config_kwargs": {"connect_timeout": read_s, "read_timeout": read_s}}
    if not uri.startswith(("http://", "https://")):
        return {}
    import aiohttp

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=read_s, sock_read=read_s)}}


def local_path(uri: str) -> str | None:
    """The local filesystem path of ``uri``, absolute (so FFmpeg never reads a name such as
    ``-x.mp4`` or ``concat:a`` as an option or protocol); None for a remote URI."""
    if "://" in uri and not uri.startswith("file://"):
        return None
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def check_input(uri: str) -> None:
    """MediaError with a plain reason when a local ``uri`` cannot be an input file: "file not
    found" (also a dangling symlink), "permission denied", "symlink loop", "not a file" (a
    directory, a FIFO that would block the open forever, a device). Remote URIs are checked by
    opening them (``open_error``)."""
    path = local_path(uri)
    if path is None:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise MediaError("file not found", f"{uri}: a symlink to {os.readlink(path)!r}, which does not exist") from None
        raise MediaError("file not found", f"{uri} does not exist") from None
    except PermissionError as e:
        raise MediaError("permission denied", f"{uri}: {e.strerror}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MediaError("symlink loop", f"{uri}: its symlinks lead back to themselves") from None
        raise MediaError("cannot open", f"{uri}: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        if os.path.islink(path):
            target = os.path.realpath(path)
            if os.path.dirname(path).startswith(target.rstrip("/") + "/") or os.path.dirname(path) == target:
                raise MediaError("symlink loop", f"{uri} links to {target}, a directory above it (directory symlinks "
                                                 "are not followed)")
            raise MediaError("not a file", f"{uri} is a symlink to the directory {target} (directory symlinks are not "
                                           "followed; give it as its own --input)")
        try:
            with os.scandir(path):
                pass
        except PermissionError:
            raise MediaError("permission denied", f"{uri}: a directory this user cannot list (mode "
                                                  f"{stat.filemode(st.st_mode)}); its files were not searched") from None
        raise MediaError("not a file", f"{uri} is a directory")
    if not stat.S_ISREG(st.st_mode):
        kind = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special file")
        raise MediaError("not a file", f"{uri} is a {kind}, not a regular file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise MediaError("permission denied", f"{uri}: no read permission (mode {stat.filemode(st.st_mode)}, "
                                              f"owner uid {st.st_uid})") from None


def transport_error(uri: str, exc: BaseException) -> MediaError | None:
    """The rejects reason of a network failure reading ``uri`` at any point (open or mid-decode),
    or None: an HTTP error status ("HTTP 500") or a read timeout ("timed out")."""
    import asyncio

    if isinstance(exc, MediaError):
        return exc
    remote_http = uri.startswith(("http://", "https://"))
    cause: BaseException | None = exc  # fsspec's http info() re-raises a 500 as FileNotFoundError from it
    while cause is not None:
        status = getattr(cause, "status", None)
        if remote_http and isinstance(status, int) and status >= 400:  # aiohttp.ClientResponseError
            return MediaError(f"HTTP {status}", f"{uri}: the server answered {status} "
                                                f"{getattr(cause, 'message', '')}".rstrip())
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or type(exc).__name__ in ("FSTimeoutError",
                                                                                      "ServerTimeoutError"):
        return MediaError("timed out", f"{uri}: no data for the read timeout ({type(exc).__name__}: {exc})")
    if remote_http and type(exc).__module__.startswith("aiohttp"):
        return MediaError("cannot open", f"{uri}: {type(exc).__name__}: {exc}")
    return None


def open_error(uri: str, exc: BaseException) -> MediaError | None:
    """The rejects reason of a failure to open ``uri`` (local or remote), or None when ``exc`` is
    not one: "HTTP 404", "HTTP 500", "file not found", "permission denied", "timed out"."""
    err = transport_error(uri, exc)
    if err is not None:
        return err
    remote_http = uri.startswith(("http://", "https://"))
    if isinstance(exc, FileNotFoundError):
        # fsspec's http filesystem raises FileNotFoundError for a 404
        return MediaError("HTTP 404" if remote_http else "file not found", f"{uri}: {exc}")
    if isinstance(exc, PermissionError):
        return MediaError("permission denied", f"{uri}: {exc}")
    if isinstance(exc, OSError):
        return MediaError("cannot open", f"{uri}: {type(exc).__name__}: {exc}")
    return None


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one untrusted file may cost (config ``probe.max_frame_pixels``, ``probe.max_frames``).

    ``max_frame_pixels`` goes to FFmpeg's decoders as ``max_pixels``: a picture larger than that is
    refused before its buffer is allocated, in the trial decode of ``av.open`` and in every later
    decode. ``probe`` also checks the container's declared size and frame count before decoding.
    """

    max_frame_pixels: int = 40_000_000
    max_frames: int = 3_000_000

    def codec_options(self) -> dict[str, str]:
        return {"max_pixels": str(int(self.max_frame_pixels))}


@contextlib.contextmanager
def open_container(uri: str, limits: DecodeLimits | None = None):
    """Open a local path or any fsspec URI (s3://, gs://, http://) as a PyAV input container whose
    video decoders refuse pictures larger than ``limits.max_frame_pixels`` (default DecodeLimits)."""
    options = (limits or DecodeLimits()).codec_options()
    path = local_path(uri)
    if path is None:
        import fsspec

        with fsspec.open(uri, "rb", **_remote_options(uri)) as f:
            with av.open(f, mode="r", options=options) as container:
                yield _cap_decoders(container, options)
    else:
        with av.open(path, mode="r", options=options) as container:
            yield _cap_decoders(container, options)


def _cap_decoders(container, options: dict[str, str]):
    # av.open's options reach only avformat_find_stream_info's trial decode; the decoders PyAV opens
    # later take theirs from each stream's codec context.
    for stream in container.streams.video:
        stream.codec_context.options = dict(stream.codec_context.options, **options)
    return container


@contextlib.contextmanager
def _ffmpeg_errors():
    """FFmpeg's error messages while the block runs (PyAV routes them to Python only while a log
    level is set; the previous level is restored after)."""
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(local=False) as logs:
            yield logs
    finally:
        av.logging.set_level(previous)


def _refused_size(logs) -> tuple[int, int] | None:
    """The picture size FFmpeg refused for exceeding max_pixels, from its log message."""
    for entry in logs:
        m = re.search(r"Picture size (\d+)x(\d+) exceeds specified max pixel count", str(entry[-1]))
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def frame_too_large(uri: str, width: int, height: int, limits: DecodeLimits, what: str) -> MediaError:
    return MediaError("frame too large", f"{uri}: {what} {width}x{height} = {width * height:,} pixels, more than "
                                         f"probe.max_frame_pixels = {limits.max_frame_pixels:,}",
                      value=float(width * height))


def too_many_frames(uri: str, n: int, limits: DecodeLimits, what: str) -> MediaError:
    return MediaError("too many frames", f"{uri}: {what} {n:,} frames, more than probe.max_frames = "
                                         f"{limits.max_frames:,}", value=float(n))


def check_declared(uri: str, container, stream, limits: DecodeLimits, logs=()) -> None:
    """Refuse a decompression bomb from what the container declares, before any frame is decoded:
    the coded picture size (or the size FFmpeg's capped trial decode refused) and the frame count
    (stated, or duration x frame rate)."""
    cc = stream.codec_context
    w, h = int(cc.width or 0), int(cc.height or 0)
    if not (w and h):
        refused = _refused_size(logs)
        if refused:
            w, h = refused
    if w * h > limits.max_frame_pixels:
        raise frame_too_large(uri, w, h, limits, "the video stream declares")
    n = int(stream.frames or 0)
    if not n:
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if container.duration is not None:
            seconds = container.duration / av.time_base
        elif stream.duration is not None:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = 0.0
        n = int(seconds * rate)
    if n > limits.max_frames:
        raise too_many_frames(uri, n, limits, "the video stream declares")


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
    video_bit_rate: int | None = None  # the video stream's stated bit rate (bits/s), None when unstated
    audio_bit_rate: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _rotation_of(stream, first_frame) -> int:
    rot = getattr(first_frame, "rotation", 0) if first_frame is not None else 0
    if not rot:
        with contextlib.suppress(Exception):
            rot = -int(float(stream.metadata.get("rotate", 0)))  # legacy tag is clockwise
    return int(round(rot)) % 360


def probe(uri: str, max_packets: int = 2000, limits: DecodeLimits | None = None) -> ProbeResult:
    """Container facts. Frame intervals are read from packet timestamps (demux only, no decode).

    A decompression bomb (``limits``: a picture or frame count past the caps) is refused from the
    container's declared facts before the first frame is decoded (``check_declared``).

    Variable frame rate: the frame intervals differ by more than 10% of their median for
    more than 5% of the frames (constant-rate streams have jitter of one time-base tick).
    """
    limits = limits or DecodeLimits()
    try:
        with _ffmpeg_errors() as logs, open_container(uri, limits) as c:
            if not c.streams.video:
                raise MediaError("no video stream", f"{uri} has no video stream")
            v = c.streams.video[0]
            check_declared(uri, c, v, limits, logs)
            audio = list(c.streams.audio)
            a = audio[0] if audio else None
            tb = float(v.time_base)
            pts = []
            for i, packet in enumerate(c.demux(v)):
                check_deadline(uri)
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
            if first.width * first.height > limits.max_frame_pixels:  # a decoder that ignored max_pixels
                raise frame_too_large(uri, first.width, first.height, limits, "its first frame is")
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
                coded_width=int(first.width), coded_height=int(first.height),
                video_bit_rate=int(v.bit_rate) if v.bit_rate else None,
                audio_bit_rate=int(a.bit_rate) if a is not None and a.bit_rate else None)
    except MediaError:
        raise
    except av.error.FileNotFoundError as e:  # an http 404 as FFmpeg's own protocol reports it
        raise open_error(uri, FileNotFoundError(str(e))) from e
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as e:
        raise MediaError("unreadable container", f"{uri}: {e}") from e
    except Exception as e:  # missing or unreadable through fsspec (s3 404, HTTP 500, permission, read timeout): final
        err = open_error(uri, e)
        if err is None:
            raise
        raise err from e


def _size_of(uri: str) -> int | None:
    with contextlib.suppress(Exception):
        import fsspec

        local = local_path(uri)
        if local is not None:
            return os.path.getsize(local)
        fs, path = fsspec.core.url_to_fs(uri, **_remote_options(uri))
        return int(fs.size(path))
    return None


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    # Display-matrix rotation is counter-clockwise in degrees; np.rot90 turns counter-clockwise.
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


@dataclass
class DecodeLog:
    """What a tolerant decoding pass met: source-time ranges lost to damaged packets, and how far
    the stream reached (damaged packets included), so a file that really stops early still reads
    as truncated while a few bad packets in the middle cost only their own span."""

    damaged: list[tuple[float, float]] = field(default_factory=list)
    end_s: float | None = None  # end of the last packet demuxed, decodable or not
    errors: list[str] = field(default_factory=list)  # the first few decoder messages

    def note(self, message: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(message)

    def reach(self, t: float) -> None:
        self.end_s = t if self.end_s is None else max(self.end_s, t)

    def add(self, start: float, end: float) -> None:
        self.damaged.append((float(start), float(max(start, end))))
        self.damaged = merge_ranges(self.damaged)


def merge_ranges(ranges) -> list[tuple[float, float]]:
    """Sorted, non-overlapping union of (start, end) ranges; touching ranges merge."""
    out: list[tuple[float, float]] = []
    for a, b in sorted((float(a), float(b)) for a, b in ranges):
        if out and a <= out[-1][1] + 1e-9:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


_DECODE_ERRORS = (av.error.InvalidDataError, av.error.FFmpegError)


def _decode_tolerant(container, stream, log: DecodeLog):
    """Decoded frames of ``stream``, packet by packet, going on past packets that fail to decode.

    A video frame is damaged when its packet fails to decode, when the decoder flags it corrupt
    (MPEG-4 part 2 conceals errors and only flags the frame; H.264 fails the packet, or with
    frame threads flags the frame), or when
    it comes after such a frame before the next clean key frame: inter frames predict from the
    broken picture, and the decoder's error concealment hides that without flagging them.
    Damaged frames are not yielded; each damaged range runs from the first damaged frame (or
    failed packet) to the next clean key frame, or to the end of the stream.
    """
    tb = float(stream.time_base)
    damaged_from: float | None = None  # start of the damaged range we are in, None when clean
    last_clean: float | None = None

    def taint(t: float | None) -> float:
        t = t if t is not None else (last_clean if last_clean is not None else 0.0)
        if last_clean is not None:
            t = max(t, last_clean + 1e-6)  # frames already yielded were clean
        return t if damaged_from is None else min(damaged_from, t)

    for packet in container.demux(stream):
        check_deadline(str(container.name))
        t_packet = None if packet.pts is None else packet.pts * tb
        if t_packet is not None:
            log.reach(t_packet + (packet.duration or 0) * tb)
        try:
            frames = packet.decode()
        except _DECODE_ERRORS as e:
            log.note(f"{t_packet if t_packet is None else round(t_packet, 3)} s: {e}")
            damaged_from = taint(t_packet)
            continue
        for frame in frames:
            if frame.pts is None:
                continue
            t = frame.pts * tb
            if frame.is_corrupt:
                log.note(f"{t:.3f} s: frame flagged corrupt by the decoder")
                damaged_from = taint(t)
                continue
            if damaged_from is not None and frame.key_frame:
                log.add(damaged_from, t)  # a clean key frame: the stream is whole again
                damaged_from = None
            if damaged_from is not None:
                damaged_from = taint(t)
                continue
            last_clean = t
            yield frame
    if damaged_from is not None:
        log.add(damaged_from, log.end_s if log.end_s is not None else damaged_from)


def _reformatters() -> tuple["av.video.reformatter.VideoReformatter", "av.video.reformatter.VideoReformatter"]:
    """A scaler and a pixel-format converter kept for a whole decode. ``frame.reformat`` and
    ``to_ndarray(format=...)`` build a new swscale context for every frame, and with FFmpeg 8's
    default (``threads=0``) a new slice-thread pool too: twice the CPU of a kept context on one
    thread, for the same pixels (docs/benchmarks.md, "Detect stage")."""
    from av.video.reformatter import VideoReformatter

    return VideoReformatter(), VideoReformatter()


def iter_frames(uri: str, *, start_s: float = 0.0, end_s: float | None = None, rotation: int = 0,
                fmt: str = "rgb24", max_side: int | None = None,
                square_pixels: bool = True,
                damage: "DecodeLog | None" = None,
                limits: DecodeLimits | None = None, raw: bool = False,
                threads: int | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (time_s, HxWx3 uint8 array) for every decoded frame with time in [start_s, end_s).

    Frames come in square pixels (``square_pixels``: resampled by the stream's sample aspect
    ratio, pipeline.geometry), so they have the size ``probe`` reports as width x height.

    Without ``damage``, decoding errors mid-stream raise MediaError("decode error") naming the
    file and time. With a ``DecodeLog``, decoding goes on past damaged packets: frames that are
    broken or depend on a broken one are not yielded, and their time ranges go to the log (see
    ``_decode_tolerant``); the log's ``end_s`` still tells a truncated file from a damaged one.

    ``limits`` bound the decoding (a stream that holds more frames, or bigger ones, than it
    declared): MediaError("too many frames") once this call has decoded more than
    ``max_frames``, MediaError("frame too large") for a frame past ``max_frame_pixels``.

    ``raw``: yield the decoded ``av.VideoFrame`` (square pixels, not rotated) instead of an array, for a
    caller that converts only the part it needs (pipeline/crop.py).

    ``threads``: FFmpeg decoder threads (frame or slice threading, as the codec allows); None lets
    FFmpeg pick (cores + 1). The frames are the same for any count (FFmpeg's threaded decoding is
    bit-exact).
    """
    limits = limits or DecodeLimits()
    with open_container(uri, limits) as c:
        v = c.streams.video[0]
        check_declared(uri, c, v, limits)  # as probe does, for callers that did not probe
        v.thread_type = "AUTO"
        if threads is not None:
            v.thread_count = max(1, int(threads))
        tb = float(v.time_base)
        sar = stream_sar(v) if square_pixels else 1
        if start_s > 1.0:
            with contextlib.suppress(Exception):
                c.seek(int(max(0.0, start_s - 1.0) / tb), stream=v, backward=True)
        last_t = None
        n_decoded = 0
        to_size, to_fmt = _reformatters()
        try:
            for frame in (c.decode(v) if damage is None else _decode_tolerant(c, v, damage)):
                check_deadline(uri)
                n_decoded += 1
                if n_decoded > limits.max_frames:
                    raise too_many_frames(uri, n_decoded, limits, "decoding reached")
                if frame.width * frame.height > limits.max_frame_pixels:
                    raise frame_too_large(uri, frame.width, frame.height, limits, "a decoded frame is")
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
                    frame = to_size.reformat(frame, width=size[0], height=size[1],
                                             interpolation="BICUBIC" if sar != 1 else None, threads=1)
                if raw:
                    last_t = t
                    yield t, frame
                    continue
                img = to_fmt.reformat(frame, format=fmt, threads=1).to_ndarray()
                last_t = t
                yield t, _rotate(img, rotation)
        except (av.error.InvalidDataError, av.error.FFmpegError) as e:
            where = f"after t={last_t:.3f}s" if last_t is not None else "before the first frame"
            raise MediaError("decode error", f"{uri}: {e} ({where})") from e


@dataclass
class AudioTrack:
    """The first audio stream as float32 mono at ``rate`` on the source timeline, with where it
    really has sound.

    ``samples[i]`` is the sound at source time ``t0 + i / rate``. Audio is placed by its
    timestamps, so audio after a gap stays aligned with the video; ``spans`` (sample-index
    ranges [start, end)) say which samples were decoded. Samples outside every span are zeros
    that exist only to keep that alignment: ``cut`` refuses any range that reaches them, so no
    clip is ever given digital silence the source did not have.

    Decoded with ``keep`` (``decode_audio_track``), only the samples of those windows are held,
    in ``held`` (sample index of its first sample, samples), and ``samples`` is empty: the
    coverage is the whole track's, but ``cut`` serves only the windows.
    """

    samples: np.ndarray
    t0: float
    rate: int
    spans: list[tuple[int, int]]
    damaged: list[tuple[float, float]] = field(default_factory=list)  # source times lost to bad packets
    errors: list[str] = field(default_factory=list)
    held: list[tuple[int, np.ndarray]] | None = None  # with ``keep``: the retained pieces, in order

    def index_of(self, t: float) -> int:
        """Sample index of source time ``t`` (the same rounding for every cut)."""
        return int(round((t - self.t0) * self.rate))

    def span_times(self) -> list[tuple[float, float]]:
        return [(self.t0 + a / self.rate, self.t0 + b / self.rate) for a, b in self.spans]

    def covers(self, first: int, n: int) -> bool:
        return any(a <= first and first + n <= b for a, b in self.spans)

    def cut(self, first: int, n: int, *, uri: str = "") -> np.ndarray:
        """``n`` decoded samples from index ``first``; MediaError when any of them is not real audio."""
        if not self.covers(first, n):
            raise self.not_covered(first, n, uri)
        if self.held is None:
            return self.samples[first:first + n].copy()
        for a, x in self.held:
            if a <= first and first + n <= a + len(x):
                return x[first - a:first - a + n].copy()
        # decoded audio that the caller chose not to keep: a bug of the caller's windows, never silence
        raise ValueError(f"{uri}: audio samples {first}-{first + n} were decoded but not kept (keep windows "
                         f"too narrow)")

    def not_covered(self, first: int, n: int, uri: str = "") -> MediaError:
        t = self.t0 + first / self.rate
        spans = ", ".join(f"{a:.3f}-{b:.3f}" for a, b in self.span_times()) or "none"
        return MediaError("audio not covered", f"{uri}: {t:.3f}-{t + n / self.rate:.3f} s is not inside the "
                                               f"decoded audio (spans {spans} s)")


def decode_audio_track(uri: str, rate: int = 16000, *, tolerant: bool = True,
                       keep: list[tuple[float, float]] | None = None) -> AudioTrack:
    """The first audio stream with its coverage (``AudioTrack``).

    Resampling and down-mixing use FFmpeg's swresample through PyAV's AudioResampler, one
    resampler per contiguous run, flushed at every gap so no sample is carried across it.
    A run ends where more than 20 ms of audio are missing by the timestamps (audio that starts
    late, stops early, or has a hole) and at a packet that fails to decode; with ``tolerant``,
    decoding goes on after it and the lost time is recorded in ``damaged`` (the frame after a
    failed AAC packet is dropped too: its overlap-add half comes from the lost frame). Without
    ``tolerant`` a decode error raises MediaError("audio decode error").

    ``keep``: source-time windows [start_s, end_s) whose samples are held (``AudioTrack.held``);
    the whole stream is still decoded the same way (the same resampler runs, so the samples kept
    are the very ones of a full decode, and the coverage is the whole track's), but the rest is
    dropped as it is decoded: a long input holds its clips' audio, not 64 KB per second of it.
    ``[]`` holds nothing (coverage only). Pieces are kept by whole resampler output chunks
    (~64 ms), so a window's edges come with a little more.
    """
    runs: list[tuple[float, int, list]] = []  # (source time of the run's first sample, samples, pieces)
    damaged: list[tuple[float, float]] = []
    errors: list[str] = []
    with open_container(uri) as c:
        if not c.streams.audio:
            raise MediaError("no audio stream", f"{uri} has no audio stream")
        a = c.streams.audio[0]
        tb = float(a.time_base)
        run_t0: float | None = None
        chunks: list[np.ndarray] = []
        total = 0  # samples placed in this run so far (the resampler holds back only a few)
        resampler = None
        drop_next = False

        def held(x: np.ndarray) -> np.ndarray | int:
            """A chunk about to be appended to the run, or just its length when ``keep`` drops it."""
            if keep is None:
                return x
            t = run_t0 + total / rate  # the chunk's source time (total: the run's samples so far)
            if any(a - 0.1 <= t + len(x) / rate and t <= b + 0.1 for a, b in keep):
                return x
            # the held chunks before this one are a finished piece: one array now, not thousands of
            # small ones joined at the run's end (which would double the piece for a moment)
            n_held = next((i for i, c in enumerate(reversed(chunks)) if isinstance(c, int)), len(chunks))
            if n_held > 1:
                chunks[-n_held:] = [np.concatenate(chunks[-n_held:])]
            return len(x)

        def close_run():
            nonlocal run_t0, chunks, total, resampler
            if resampler is not None:
                chunks.extend(held(out.to_ndarray().reshape(-1)) for out in resampler.resample(None))
            if run_t0 is not None and chunks:
                runs.append((run_t0, *_join_chunks(chunks)))
            run_t0, chunks, total, resampler = None, [], 0, None

        for packet in _demux_until_error(c, a, errors, uri, strict=not tolerant):
            check_deadline(uri)
            t_packet = None if packet.pts is None else packet.pts * tb
            try:
                frames = packet.decode()
            except _DECODE_ERRORS as e:
                if not tolerant:
                    raise MediaError("audio decode error", f"{uri}: {e}") from e
                if len(errors) < 5:
                    errors.append(f"{t_packet if t_packet is None else round(t_packet, 3)} s: {e}")
                if t_packet is not None:
                    damaged.append((t_packet, t_packet + (packet.duration or 0) * tb))
                close_run()
                drop_next = True
                continue
            for frame in frames:
                t = None if frame.pts is None else float(frame.pts * tb)
                if drop_next and t is not None:
                    damaged.append((t, t + frame.samples / frame.sample_rate))
                    drop_next = False
                    continue
                if t is not None and run_t0 is not None:
                    drift = int(round((t - run_t0) * rate)) - total
                    if drift > rate // 50:  # more than 20 ms missing: the run ends, a new one starts
                        close_run()
                    elif drift < -(rate // 50) and chunks:  # overlapping timestamps: trim the overlap
                        last = _chunk_len(chunks[-1])
                        cut = min(-drift, last)
                        chunks[-1] = last - cut if isinstance(chunks[-1], int) else chunks[-1][: last - cut]
                        total -= cut
                if run_t0 is None:
                    if t is None:
                        continue  # nowhere to place it
                    run_t0 = t
                    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
                for out in resampler.resample(frame):
                    chunks.append(held(out.to_ndarray().reshape(-1)))
                    total += _chunk_len(chunks[-1])
        close_run()
    return _place_runs(runs, rate, merge_ranges(damaged), errors, sparse=keep is not None)


def _chunk_len(chunk: np.ndarray | int) -> int:
    return chunk if isinstance(chunk, int) else len(chunk)


def _join_chunks(chunks: list) -> tuple[int, list[tuple[int, np.ndarray]]]:
    """A run's length and its held pieces (offset in the run, float32 samples): consecutive held
    chunks joined, dropped ones (their lengths) skipped."""
    pieces, pos, run = [], 0, []
    for c in chunks + [0]:  # the 0 closes the last piece
        if isinstance(c, int):
            if run:
                piece = run[0] if len(run) == 1 else np.concatenate(run)
                pieces.append((pos - len(piece), piece.astype(np.float32, copy=False)))
                run = []
            pos += c
        else:
            run.append(c)
            pos += len(c)
    return pos, pieces


def _demux_until_error(container, stream, errors: list[str], uri: str, *, strict: bool):
    """Packets of ``stream``; a container that cannot be read further ends the audio there (the
    coverage then stops at the last packet read) or, when ``strict``, raises MediaError."""
    try:
        yield from container.demux(stream)
    except _DECODE_ERRORS as e:
        if strict:
            raise MediaError("audio decode error", f"{uri}: {e}") from e
        errors.append(f"demuxing stopped: {e}")


def _place_runs(runs, rate: int, damaged, errors, *, sparse: bool = False) -> AudioTrack:
    """The runs on one timeline from the first run's start; ``sparse``: only their held pieces
    are stored (``AudioTrack.held``), the spans are the same."""
    if not runs:
        return AudioTrack(np.zeros(0, np.float32), 0.0, rate, [], damaged, errors, held=[] if sparse else None)
    t0 = runs[0][0]
    placed: list[tuple[int, int, list]] = []  # (first sample index, length, pieces at offsets in the run)
    for t, length, pieces in runs:
        first = int(round((t - t0) * rate))
        if placed and first < placed[-1][0] + placed[-1][1]:  # rounding overlap with the run before
            skip = placed[-1][0] + placed[-1][1] - first
            first, length = first + skip, length - skip
            pieces = [(max(o - skip, 0), x[max(skip - o, 0):]) for o, x in pieces if o + len(x) > skip]
        if length > 0:
            placed.append((first, length, pieces))
    n = placed[-1][0] + placed[-1][1] if placed else 0
    samples = np.zeros(0 if sparse else n, np.float32)
    held: list[tuple[int, np.ndarray]] = []
    spans: list[tuple[int, int]] = []
    for first, length, pieces in placed:
        for o, x in pieces:
            if not sparse:
                samples[first + o:first + o + len(x)] = x
            elif held and held[-1][0] + len(held[-1][1]) == first + o:  # runs that abut: one piece
                held[-1] = (held[-1][0], np.concatenate([held[-1][1], x]))
            else:
                held.append((first + o, x))
        if spans and spans[-1][1] == first:
            spans[-1] = (spans[-1][0], first + length)
        else:
            spans.append((first, first + length))
    return AudioTrack(samples, float(t0), rate, spans, damaged, errors, held=held if sparse else None)


def decode_audio(uri: str, rate: int = 16000, *, start_s: float | None = None,
                 end_s: float | None = None) -> tuple[np.ndarray, float]:
    """Whole first audio stream as float32 mono at ``rate``, plus the source time of sample 0.

    Placed by timestamps with zeros where the stream has none, and strict (a decode error
    raises). For tools and tests; the curation path uses ``decode_audio_track``, whose
    coverage spans keep those zeros out of every clip.
    """
    track = decode_audio_track(uri, rate, tolerant=False)
    samples, t0 = track.samples, track.t0
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


# Encoder threads of every clip (see ClipEncoder). One: x264 ultrafast on a 512x512 clip costs ~20%
# less CPU in one thread than in four (docs/benchmarks.md, issue 13), and the crop stage already
# overlaps its encoding with the scoring thread.
X264_THREADS = 1


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
        # A fixed thread count: x264's output bytes depend on it, and its default follows the CPUs of the
        # machine, so clips made on nodes of different sizes (or a resumed run elsewhere) would differ.
        self._vs.options = {"crf": str(crf), "preset": preset, "threads": str(X264_THREADS)}
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
        # Frame+slice threading: 2.4x faster on an H200 node's CPU (5.5 -> 2.3 ms per 512x512 frame,
        # benchmarks/gpu_features.py); H.264 threading gives the same frames as a single thread.
        v.thread_type = "AUTO"
        info = {"fps": float(v.average_rate), "width": v.codec_context.width, "height": v.codec_context.height,
                "audio_rate": c.streams.audio[0].rate if c.streams.audio else None,
                "audio_channels": c.streams.audio[0].channels if c.streams.audio else None}
        to_rgb = _reformatters()[1]  # one swscale context for the clip, not one (and a thread pool) per frame
        frames = np.stack([to_rgb.reformat(f, format="rgb24", threads=1).to_ndarray() for f in c.decode(v)])
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
