"""The media half of the bad-input corpus (issue 12): one file per kind, generated (nothing committed).

``write_corpus(directory)`` writes every kind and returns ``{file name: Kind}``; each ``Kind`` says
what the curation job must do with it: keep it, or reject it with a given reason.

Legitimate formats (codecs, frame rates, rotation, audio rates and layouts, audio offsets) are
built from one source with a real face, so the expected outcome is "kept" and the test proves
the format path end to end: 3 s of a real clip from ``REAL_DIR`` downscaled to 256 px, or the
synthetic talking head (``pipeline.demo``) when the real clips are absent. Broken files
(empty, not a video, truncated, a decompression bomb) have a reject reason instead.
"""
from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

SIDE = 256  # the source's picture: small enough that ~25 kept inputs curate in about a minute
SECONDS = 3.0
AUDIO_RATE = 48000
SOURCE_CLIP = "wda_aoc_000.mp4"  # frontal, one speaker, 512x512 25 fps (tests/conftest.KEEP_CLIPS)


@dataclass(frozen=True)
class Kind:
    expect: str  # "kept" or "rejected"
    reason: str | None = None  # the rejects reason (videos.parquet `reason`) when rejected
    detail_has: tuple[str, ...] = ()  # words the reject's detail must contain (sizes, caps)
    note: str = ""


@dataclass
class Source:
    frames: list[np.ndarray]  # RGB SIDE x SIDE at 25 fps
    audio: np.ndarray  # float32 mono at AUDIO_RATE, as long as the frames
    origin: str

    def audio_at(self, rate: int) -> np.ndarray:
        n = int(round(len(self.audio) * rate / AUDIO_RATE))
        x = np.arange(n) * AUDIO_RATE / rate
        return np.interp(x, np.arange(len(self.audio)), self.audio).astype(np.float32)


def load_source(real_dir: Path | None, tmp: Path, seconds: float = SECONDS) -> Source:
    """``seconds`` of the real clip (or the synthetic talking head) at SIDE x SIDE, audio at 48 kHz."""
    from pipeline.media import decode_audio, iter_frames, slice_audio

    src = real_dir / SOURCE_CLIP if real_dir is not None else None
    window = (slice(None), slice(None))
    if src is None or not src.exists():
        from pipeline.demo import make_talking_head

        src = make_talking_head(tmp / "synthetic_source.mp4", duration_s=seconds + 0.2, size=512, seed=5)
        # BlazeFace finds the astronaut's face at x 174-278, y 68-172 of 512: a 190 px window around it
        # makes it ~140 px in the 256 px source (filters.face_size_px_min is 128) and its 2x crop pads
        # little (a 172 px window, a 155 px face, pads past filters.pad_frac_max)
        window = (slice(25, 215), slice(131, 321))
    frames = [cv2.resize(img[window], (SIDE, SIDE), interpolation=cv2.INTER_AREA)
              for _, img in iter_frames(str(src), end_s=seconds)]
    audio, t0 = decode_audio(str(src), rate=AUDIO_RATE)
    return Source(frames, slice_audio(audio, t0, AUDIO_RATE, 0.0, len(frames) / 25), src.name)


@dataclass
class Audio:
    channels: np.ndarray  # float32 [C, N]
    rate: int
    layout: str = "mono"
    codec: str = "aac"
    start_s: float = 0.0


def mono(x: np.ndarray, rate: int = AUDIO_RATE, **kw) -> Audio:
    return Audio(x[None], rate, "mono", **kw)


def write_media(path: Path, frames, *, fps: float = 25, times=None, codec: str = "libx264",
                pix_fmt: str = "yuv420p", fmt: str | None = None, options: dict | None = None,
                audio: list[Audio] = (), container_options: dict | None = None) -> Path:
    """Frames (RGB arrays, shown at ``times`` seconds, else every 1/fps; any iterable, so 8K frames
    can be made one at a time) and audio streams into one file."""
    frames = iter(frames)
    first = next(frames)
    h, w = first.shape[:2]
    tb = Fraction(1, 90000) if times is not None else Fraction(1, 1) / Fraction(fps).limit_denominator(1000)
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as out:
        vs = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        vs.width, vs.height, vs.pix_fmt = w, h, pix_fmt
        vs.time_base = tb
        vs.codec_context.time_base = tb
        vs.options = options if options is not None else {"crf": "20", "preset": "veryfast"}
        streams = []
        for a in audio:
            s = out.add_stream(a.codec, rate=a.rate)
            s.layout = a.layout
            s.time_base = Fraction(1, a.rate)
            streams.append(s)
        for i, img in enumerate(itertools.chain([first], frames)):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts = int(round(times[i] / tb)) if times is not None else i
            vf.time_base = tb
            for packet in vs.encode(vf):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
        for a, s in zip(audio, streams):
            _encode_audio(out, s, a)
    return path


def _encode_audio(out, stream, a: Audio, block: int = 1024) -> None:
    offset = int(round(a.start_s * a.rate))
    for start in range(0, a.channels.shape[1], block):
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(a.channels[:, start:start + block], np.float32),
                                        format="fltp", layout=a.layout)
        af.sample_rate = a.rate
        af.pts = offset + start
        af.time_base = Fraction(1, a.rate)
        for packet in stream.encode(af):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


# ---- rotation: the display matrix of the MP4 track header ('tkhd'), as phones write it


def set_mp4_rotation(path: Path, clockwise_degrees: int) -> Path:
    """Rewrite the video track's tkhd matrix to show the stored picture turned ``clockwise_degrees``
    (what a phone held sideways writes; ffmpeg's ``-metadata:s:v rotate=``). ISO 14496-12 8.3.2:
    (x', y') = (a x + c y, b x + d y) in 16.16 fixed point, y pointing down."""
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")  # write_media adds the video stream first: its trak comes first
    assert at > 0, f"{path} has no tkhd box"
    version = data[at + 4]
    matrix_at = at + 4 + 4 + (32 if version == 1 else 20) + 16
    cos, sin = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[clockwise_degrees % 360]
    a, b, c, d = cos, sin, -sin, cos
    # tkhd width/height stay the stored size, as phones and ffmpeg write them (FFmpeg reads a
    # difference from the coded size as anamorphic pixels)
    struct.pack_into(">9i", data, matrix_at, a << 16, b << 16, 0, c << 16, d << 16, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    return path


def landscape(frames) -> list[np.ndarray]:
    """The source pillarboxed to 320x256, so a quarter turn changes the frame's shape."""
    return [cv2.copyMakeBorder(f, 0, 0, 32, 32, cv2.BORDER_CONSTANT, value=0) for f in frames]


def write_rotated(path: Path, src: Source, clockwise_degrees: int) -> Path:
    """The landscape source stored turned the other way, with a display matrix that turns it upright again."""
    stored = [np.ascontiguousarray(np.rot90(f, clockwise_degrees // 90)) for f in landscape(src.frames)]  # ccw
    write_media(path, stored, audio=[mono(src.audio)])
    return set_mp4_rotation(path, clockwise_degrees)


# ---- decompression bombs, built small: the size and count live in headers nothing checks for sense


def _vp9_ivf(path: Path, n: int = 3, side: int = 64, keyint: int = 1000) -> bytearray:
    with av.open(str(path), "w", format="ivf") as out:
        vs = out.add_stream("libvpx-vp9", rate=25)
        vs.width = vs.height = side
        vs.pix_fmt = "yuv420p"
        vs.options = {"deadline": "realtime", "cpu-used": "8", "g": str(keyint), "lag-in-frames": "0"}
        for i in range(n):
            vf = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")
            vf.pts = i
            for packet in vs.encode(vf):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
    return bytearray(path.read_bytes())


def _ivf_frames(data: bytearray):
    """(offset of the frame data, size) of every IVF frame (32-byte file header, 12-byte frame headers)."""
    pos = 32
    while pos + 12 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        yield pos + 12, size
        pos += 12 + size


def _set_vp9_key_frame_size(data: bytearray, at: int, width: int, height: int) -> None:
    """Profile-0 VP9 key frame header (VP9 spec 6.2): frame_marker(2) profile(2) show_existing(1)
    frame_type(1) show_frame(1) error_resilient(1) sync_code(24) color_space(3) color_range(1), then
    frame_width_minus_1(16) frame_height_minus_1(16)."""
    bits = int.from_bytes(data[at:at + 9], "big")
    assert bits >> 70 == 0b10 and (bits >> 40) & 0xFFFFFF == 0x498342, "not a profile-0 VP9 key frame"
    for pos, value in ((36, width - 1), (52, height - 1)):
        shift = 72 - pos - 16
        bits = (bits & ~(0xFFFF << shift)) | (value << shift)
    data[at:at + 9] = bits.to_bytes(9, "big")


def write_pixel_bomb(path: Path, width: int = 16000, height: int = 16000) -> Path:
    """A ~200-byte VP9 file whose key frame (and IVF header) declare ``width`` x ``height``: decoding
    it would allocate a 16000x16000 picture (384 MB in yuv420p, 768 MB as RGB) per frame."""
    data = _vp9_ivf(path)
    struct.pack_into("<HH", data, 12, width, height)
    _set_vp9_key_frame_size(data, next(_ivf_frames(data))[0], width, height)
    path.write_bytes(bytes(data))
    return path


def write_growing_bomb(path: Path, width: int = 16000, height: int = 16000) -> Path:
    """64x64 VP9 whose header and first key frame are honest, and whose second key frame (frame 4)
    grows to ``width`` x ``height``: only a check while decoding can catch it."""
    data = _vp9_ivf(path, n=8, keyint=4)
    frames = list(_ivf_frames(data))
    _set_vp9_key_frame_size(data, frames[4][0], width, height)
    path.write_bytes(bytes(data))
    return path


def write_frame_count_bomb(path: Path, frames: int = 4_000_000_000) -> Path:
    """A 3-frame 64x64 VP9 file whose IVF header declares ``frames`` frames at 25 fps (~5 years):
    the frame-count cap refuses it from the header before decoding."""
    data = _vp9_ivf(path)
    struct.pack_into("<III", data, 16, 25, 1, frames)  # time base 1/25, length in frames
    path.write_bytes(bytes(data))
    return path


def write_understated_count(path: Path, frames: int = 12, declared: int = 2) -> Path:
    """64x64 VP9 of ``frames`` frames whose IVF header declares only ``declared``: a frame cap must
    hold while decoding, not just on the header."""
    data = _vp9_ivf(path, n=frames)
    struct.pack_into("<III", data, 16, 25, 1, declared)
    path.write_bytes(bytes(data))
    return path


# ---- the corpus


def _vfr_times(n: int, seed: int = 7) -> list[float]:
    """Intervals between 0.6x and 1.6x of 1/25 s (phone video), spanning about as long as the source."""
    rng = np.random.default_rng(seed)
    steps = rng.uniform(0.6, 1.6, n) / 25
    return list(np.concatenate([[0.0], np.cumsum(steps[:-1])]) * (n / 25) / np.sum(steps))


def _resampled(frames: list[np.ndarray], fps: float) -> list[np.ndarray]:
    """The 25 fps source shown at ``fps`` (nearest source frame for every output instant)."""
    n = int(round(len(frames) / 25 * fps))
    return [frames[min(len(frames) - 1, int(i * 25 / fps))] for i in range(n)]


def _scaled(frames, w: int, h: int, pad_to: tuple[int, int] | None = None):
    out = []
    for f in frames:
        img = cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC if w > f.shape[1] else cv2.INTER_AREA)
        if pad_to is not None:
            pw, ph = pad_to
            left, top = (pw - w) // 2, (ph - h) // 2
            img = cv2.copyMakeBorder(img, top, ph - h - top, left, pw - w - left, cv2.BORDER_CONSTANT, value=0)
        out.append(img)
    return out


def write_corpus(directory: Path, real_dir: Path | None) -> tuple[dict[str, Kind], Source]:
    """Every media kind into ``directory``; returns {file name: Kind} and the source used."""
    from derived_clips import corrupt_packets

    directory.mkdir(parents=True, exist_ok=True)
    work = directory.parent / (directory.name + "_work")
    work.mkdir(exist_ok=True)
    src = load_source(real_dir, work)
    frames, audio = src.frames, src.audio
    kinds: dict[str, Kind] = {}
    d = directory

    def kept(name: str, note: str = "") -> None:
        kinds[name] = Kind("kept", note=note)

    def rejected(name: str, reason: str, *detail: str, note: str = "") -> None:
        kinds[name] = Kind("rejected", reason, tuple(detail), note)

    # -- broken files
    (d / "zero_byte.mp4").write_bytes(b"")
    rejected("zero_byte.mp4", "unreadable container")
    (d / "html_page.mp4").write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
                                     "<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>\n")
    rejected("html_page.mp4", "unreadable container")
    whole = write_media(work / "moov_at_end.mp4", frames, audio=[mono(audio)])
    data = whole.read_bytes()
    (d / "truncated_moov_missing.mp4").write_bytes(data[: len(data) * 6 // 10])  # index at the end: cut off
    rejected("truncated_moov_missing.mp4", "unreadable container", note="moov at the end, cut mid-mdat")
    fast = write_media(work / "faststart.mp4", frames, audio=[mono(audio)], container_options={"movflags": "+faststart"})
    data = fast.read_bytes()
    (d / "truncated_faststart.mp4").write_bytes(data[: len(data) * 6 // 10])
    rejected("truncated_faststart.mp4", "truncated stream", note="moov first, cut mid-mdat")
    with av.open(str(d / "audio_only.m4a"), "w", format="mp4") as out:
        s = out.add_stream("aac", rate=AUDIO_RATE)
        s.layout = "mono"
        _encode_audio(out, s, mono(audio))
    rejected("audio_only.m4a", "no video stream")
    write_media(d / "video_only.mp4", frames)
    rejected("video_only.mp4", "no audio stream")
    write_media(d / "one_frame.mp4", frames[:1], audio=[mono(audio[: AUDIO_RATE // 25])])
    rejected("one_frame.mp4", "too short")
    write_media(d / "tiny_16x16.mp4", _scaled(frames, 16, 16), audio=[mono(audio)])
    rejected("tiny_16x16.mp4", "picture too small", "16x16", note="a face of ~8 px")
    write_pixel_bomb(d / "bomb_16000x16000.ivf")
    rejected("bomb_16000x16000.ivf", "frame too large", "16000x16000", "40,000,000")
    write_frame_count_bomb(d / "bomb_4e9_frames.ivf")
    rejected("bomb_4e9_frames.ivf", "too many frames", "4,000,000,000", "3,000,000")

    # -- legitimate formats: every one must come out as a kept clip
    write_media(d / "reference_h264.mp4", landscape(frames), audio=[mono(audio)])
    kept("reference_h264.mp4", "the source as plain H.264/AAC 25 fps, 320x256 (the upright reference)")
    for degrees in (90, 180, 270):
        write_rotated(d / f"rotate_{degrees}.mp4", src, degrees)
        kept(f"rotate_{degrees}.mp4", f"display matrix turns the stored picture {degrees} deg clockwise")
    for fps, name in ((60, "fps_60.mp4"), (50, "fps_50.mp4"), (12.5, "fps_12_5.mp4")):
        write_media(d / name, _resampled(frames, fps), fps=fps, audio=[mono(audio)])
        kept(name)
    write_media(d / "fps_variable.mp4", frames, times=_vfr_times(len(frames)), audio=[mono(audio)])
    kept("fps_variable.mp4", "frame intervals 0.6-1.6 x 40 ms")
    write_media(d / "interlaced_tff.mp4", frames, audio=[mono(audio)],
                options={"crf": "20", "preset": "veryfast", "x264-params": "interlaced=1:tff=1"})
    kept("interlaced_tff.mp4", "H.264 field-coded, top field first")
    write_media(d / "size_odd_275x241.mp4", _scaled(frames, 241, 241, pad_to=(275, 241)),
                pix_fmt="yuv444p", audio=[mono(audio)])
    kept("size_odd_275x241.mp4", "odd width and height (4:4:4, as 4:2:0 needs even sizes)")
    # 8K UHD: 2.4 s (a clip needs 2 s) at 12.5 fps, 30 frames; the face upscaled 8x, windowboxed on black,
    # with sensor-like noise: a noiseless upscale is smoother than any camera picture, and x264's block
    # edges on it fail the blockiness rule (B/A ~1.3-1.6 without the noise, ~1.0 with it)
    rng = np.random.default_rng(8)

    def noisy(img: np.ndarray) -> np.ndarray:
        return np.clip(img + rng.normal(0, 3, img.shape).astype(np.float32), 0, 255).astype(np.uint8)

    # one frame at a time: 30 frames of 8K RGB would hold 3 GB
    eight_k = (_scaled([noisy(_scaled([f], 2160, 2160)[0])], 2160, 2160, pad_to=(7680, 4320))[0]
               for f in _resampled(frames[:60], 12.5))
    write_media(d / "size_8k_7680x4320.mp4", eight_k, fps=12.5, audio=[mono(audio[: AUDIO_RATE * 12 // 5])],
                options={"crf": "23", "preset": "ultrafast", "x264-params": "deblock=1"})
    kept("size_8k_7680x4320.mp4", "7680x4320 H.264, 2.4 s at 12.5 fps")
    for rate, layout, name in ((8000, "mono", "audio_8k_mono.mp4"), (11025, "mono", "audio_11025_mono.mp4"),
                               (44100, "stereo", "audio_44100_stereo.mp4"), (48000, "5.1", "audio_48k_5_1.mp4")):
        x = src.audio_at(rate)
        n_ch = {"mono": 1, "stereo": 2, "5.1": 6}[layout]
        write_media(d / name, frames, audio=[Audio(np.stack([x] * n_ch), rate, layout)])
        kept(name)
    write_media(d / "audio_two_streams.mp4", frames,
                audio=[mono(audio), Audio(np.stack([audio * 0.5] * 2), AUDIO_RATE, "stereo")])
    kept("audio_two_streams.mp4", "the first audio stream is used")
    n = len(frames)
    write_media(d / "audio_shorter.mp4", frames, audio=[mono(audio[: int(AUDIO_RATE * (n / 25 - 0.5))])])
    kept("audio_shorter.mp4", "audio ends 0.5 s before the video")
    write_media(d / "audio_longer.mp4", frames, audio=[mono(np.concatenate([audio, audio[: AUDIO_RATE]]))])
    kept("audio_longer.mp4", "audio goes on 1 s after the video")
    write_media(d / "audio_later.mp4", frames, audio=[mono(audio[int(AUDIO_RATE * 0.5):], start_s=0.5)])
    kept("audio_later.mp4", "audio starts 0.5 s after the video")
    gop = write_media(work / "gop25.mp4", frames, audio=[mono(audio)],
                      options={"crf": "20", "preset": "veryfast", "g": "12", "keyint_min": "12"})
    corrupt_packets(gop, d / "corrupt_packets.mp4", video_s=(0.30,), seed=3)
    kept("corrupt_packets.mp4", "random bytes in the video packet at 0.3 s; key frames every 0.48 s")
    write_media(d / "hevc_10bit.mp4", frames, codec="libx265", pix_fmt="yuv420p10le", audio=[mono(audio)],
                options={"preset": "ultrafast", "x265-params": "log-level=error"})
    kept("hevc_10bit.mp4", "HEVC Main 10 in MP4")
    write_media(d / "vp9_opus.webm", frames, codec="libvpx-vp9", fmt="webm",
                audio=[mono(audio, codec="libopus")],
                options={"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"})
    kept("vp9_opus.webm")
    write_media(d / "prores.mov", frames, codec="prores_ks", pix_fmt="yuv422p10le", fmt="mov",
                audio=[mono(audio, codec="pcm_s16le")], options={"profile": "3"})
    kept("prores.mov", "ProRes 422 HQ, PCM audio")
    write_media(d / "mpeg2.ts", frames, codec="mpeg2video", fmt="mpegts", audio=[mono(audio, codec="mp2")],
                options={"b": "4000000", "maxrate": "8000000", "bufsize": "4000000"})
    kept("mpeg2.ts", "MPEG-2 video, MP2 audio in MPEG-TS")
    missing = sorted(set(p.name for p in d.iterdir()) ^ set(kinds))
    assert not missing, f"corpus files and kinds disagree: {missing}"
    return kinds, src
