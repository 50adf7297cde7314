"""Clips derived from a real clip by one known change (rotation, a turned face, a cut-off chin,
a second face), for checking that the scoring rules catch exactly that change."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.media import decode_audio, encode_clip, iter_frames, slice_audio


def load_real(path: Path, seconds: float):
    frames = [f for t, f in iter_frames(str(path), end_s=seconds)]
    audio, t0 = decode_audio(str(path))
    return frames, slice_audio(audio, t0, 16000, 0.0, len(frames) / 25)


def write(path: Path, frames, audio) -> Path:
    h, w = frames[0].shape[:2]
    frames = [f[: h - h % 2, : w - w % 2] for f in frames]
    path.write_bytes(encode_clip(frames, audio))
    return path


def rotate(frame: np.ndarray, degrees: float) -> np.ndarray:
    """In-plane rotation (roll) about the frame centre on a larger black canvas."""
    pad = frame.shape[0] // 4
    big = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    m = cv2.getRotationMatrix2D((big.shape[1] / 2, big.shape[0] / 2), degrees, 1.0)
    return cv2.warpAffine(big, m, (big.shape[1], big.shape[0]))


class MeshTurner:
    """Re-renders the face turned about the vertical axis (a yaw-like warp): FaceMesh's 3-D
    landmarks are rotated about the head axis and each triangle's texture (a Delaunay
    triangulation of the landmarks, so eyes and mouth are covered too) is warped to its new
    place, far triangles first; the original face area is inpainted beforehand."""

    def __init__(self):
        import mediapipe as mp

        self.mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False)

    def __call__(self, frame: np.ndarray, yaw_degrees: float) -> np.ndarray:
        h, w = frame.shape[:2]
        res = self.mesh.process(frame)
        if not res.multi_face_landmarks:
            return frame
        p = np.array([[q.x * w, q.y * h, q.z * w] for q in res.multi_face_landmarks[0].landmark], np.float32)
        centre = p.mean(0)
        centre[2] += 0.35 * (p[:, 0].max() - p[:, 0].min())  # pivot behind the face: the head's axis
        t = np.deg2rad(yaw_degrees)
        rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]], np.float32)
        q = (p - centre) @ rot.T + centre
        from scipy.spatial import Delaunay

        self.tris = Delaunay(p[:, :2]).simplices
        hull = cv2.convexHull(p[:, :2].astype(np.int32))
        mask = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(mask, hull, 255)
        out = cv2.inpaint(frame, cv2.dilate(mask, np.ones((9, 9), np.uint8)), 5, cv2.INPAINT_TELEA)
        depth = q[self.tris][:, :, 2].mean(1)
        for tri in self.tris[np.argsort(-depth)]:  # larger z = farther from the camera in FaceMesh
            src, dst = p[tri, :2], q[tri, :2]
            if abs(np.cross(dst[1] - dst[0], dst[2] - dst[0])) < 1e-3:
                continue
            x, y, bw, bh = cv2.boundingRect(dst.astype(np.float32))
            x0, y0 = max(x, 0), max(y, 0)
            x1, y1 = min(x + bw + 1, w), min(y + bh + 1, h)
            if x1 <= x0 or y1 <= y0:
                continue
            m = cv2.getAffineTransform(src, dst - np.array([x0, y0], np.float32))
            patch = cv2.warpAffine(frame, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            tmask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillConvexPoly(tmask, (dst - [x0, y0]).astype(np.int32), 1)
            region = out[y0:y1, x0:x1]
            region[tmask > 0] = patch[tmask > 0]
        return out


def paste_second_face(frame: np.ndarray, face_img: np.ndarray) -> np.ndarray:
    """Side by side: the speaker on the left, a second (still) real face on the right."""
    other = cv2.resize(face_img, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_AREA)
    return np.concatenate([frame, other], axis=1)


def squeeze_width(frames, factor: float):
    """Frames resampled to ``factor`` x their width (even), as an anamorphic re-encode stores them."""
    h, w = frames[0].shape[:2]
    cw = int(round(w * factor / 2)) * 2
    return [cv2.resize(f, (cw, h), interpolation=cv2.INTER_AREA) for f in frames]


def write_anamorphic(path: Path, frames, audio, sar) -> Path:
    """H.264 (crf 18, as ``write``) + AAC MP4 whose stream declares the sample aspect ratio ``sar``
    (written into the H.264 VUI and the MP4 ``pasp`` box, where players and FFmpeg read it)."""
    return write_h264(path, frames, audio, crf=18, sar=sar)


def write_h264(path: Path, frames, audio, *, crf: int | None = 18, bit_rate: int | None = None,
               sar=None) -> Path:
    """H.264 (at ``bit_rate`` when given, else ``crf``; veryfast) + 16 kHz AAC MP4 at 25 fps,
    optionally declaring a sample aspect ratio."""
    from fractions import Fraction

    import av

    from pipeline.media import mux_audio

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.time_base = Fraction(1, 25)
        if sar is not None:
            vs.codec_context.sample_aspect_ratio = Fraction(sar)
        if bit_rate:
            vs.bit_rate = bit_rate
            vs.options = {"preset": "veryfast"}
        else:
            vs.options = {"crf": str(crf), "preset": "veryfast"}
        aus = out.add_stream("aac", rate=16000)
        aus.layout = "mono"
        aus.time_base = Fraction(1, 16000)
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts = i
            for packet in vs.encode(vf):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
        mux_audio(out, aus, np.asarray(audio, np.float32)[None], 16000)
    return path


def on_canvas(frame: np.ndarray, top: int, bottom: int, left: int, right: int, value: int = 0) -> np.ndarray:
    """The frame with bars of ``value`` added around it (letterbox / pillarbox / windowbox)."""
    return cv2.copyMakeBorder(frame, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(value,) * 3)


def burn_bars(frame: np.ndarray, top: int = 0, bottom: int = 0, value: int = 0) -> np.ndarray:
    """Letterbox bars painted over the picture itself (rows lost, frame size unchanged)."""
    out = frame.copy()
    out[:top] = value
    if bottom:
        out[out.shape[0] - bottom:] = value
    return out


def remux_audio(src: Path, dst: Path, *, keep=lambda t: True, shift_s: float = 0.0, end_s: float | None = None) -> Path:
    """``src`` with its packets copied (nothing re-encoded), audio packets edited by time: those
    whose source time t fails ``keep(t)`` are left out (audio that starts late, ends early or has
    a gap), and the rest are moved by ``shift_s`` (negative: the audio leads the video); packets
    that would start before 0 are left out. Audio is moved in whole time-base ticks, so a shift
    of k video frames is exactly k * rate / 25 samples. ``end_s``: packets of both streams from
    then on are left out (a shorter source; cut at a key frame so no frame loses its reference)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        vin, ain = inp.streams.video[0], inp.streams.audio[0]
        vout, aout = out.add_stream_from_template(vin), out.add_stream_from_template(ain)
        ticks = int(round(shift_s / ain.time_base))
        for packet in inp.demux(vin, ain):
            if packet.dts is None:
                continue
            if end_s is not None and packet.pts * packet.stream.time_base >= end_s:
                continue
            if packet.stream is ain:
                if not keep(float(packet.pts * ain.time_base)) or packet.pts + ticks < 0:
                    continue
                packet.pts += ticks
                packet.dts += ticks
                packet.stream = aout
            else:
                packet.stream = vout
            out.mux(packet)
    return dst


def corrupt_packets(src: Path, dst: Path, *, video_s=(), audio_s=(), seed: int = 0) -> Path:
    """A copy of ``src`` whose video / audio packets playing at the given times have their payload
    overwritten with random bytes (bit rot in the middle of a file; the container stays intact)."""
    import av

    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(seed)
    with av.open(str(src)) as c:
        for packet in c.demux():
            if packet.pts is None or packet.pos is None or packet.pos < 0:
                continue
            s = packet.stream
            t, d = float(packet.pts * s.time_base), float((packet.duration or 0) * s.time_base)
            if any(t <= x < t + d for x in (video_s if s.type == "video" else audio_s)):
                lo = packet.pos + min(8, packet.size // 4)  # keep the first bytes: the header still parses
                data[lo:packet.pos + packet.size] = rng.integers(0, 256, packet.pos + packet.size - lo,
                                                                 dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def digital_silence_runs(audio: np.ndarray, rate: int = 16000, level: float = 1e-5) -> float:
    """Longest run (seconds) of samples below ``level`` in magnitude: digital silence."""
    quiet = np.abs(np.asarray(audio, np.float64)) < level
    if not quiet.any():
        return 0.0
    edges = np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return float((ends - starts).max() / rate)


# --- shot transitions (tests/test_shots.py, benchmarks/shots.py) --------------------------------
# Labelled clips for judging shot-boundary detectors: two real clips joined by a hard cut, a fade
# through black or a cross-dissolve, and hard cuts between two shots of the same person. Frames are
# square (side SHOT_SIDE, below the pipeline's max_side, so analysis sees them unscaled) at 25 fps.

SHOT_SIDE = 512
SHOT_FPS = 25


@dataclass
class LabelledClip:
    name: str
    kind: str  # "hard", "fade", "dissolve", "same_person" or "none" (a real clip, no cut)
    path: Path
    # frame indices: a hard cut's first new frame (first == last); a gradual transition's first
    # mixed frame .. first frame fully of the new shot; None for a clip without a cut
    truth: tuple[int, int] | None


def square_segment(path: Path, start_s: float, seconds: float, side: int = SHOT_SIDE) -> list[np.ndarray]:
    """The source's frames in [start_s, start_s + seconds), centre-cropped square, resized to side."""
    out = []
    for _, f in iter_frames(str(path), start_s=start_s, end_s=start_s + seconds):
        h, w = f.shape[:2]
        s = min(h, w)
        y0, x0 = (h - s) // 2, (w - s) // 2
        out.append(cv2.resize(f[y0:y0 + s, x0:x0 + s], (side, side), interpolation=cv2.INTER_AREA))
    return out


def join_hard(a, b):
    return list(a) + list(b), (len(a), len(a))


def join_fade(a, b, n_out: int, n_in: int):
    """A fades to black over its last n_out frames, B fades in over its first n_in."""
    out = [f.astype(np.float32) * (1 - (i + 1) / (n_out + 1)) for i, f in enumerate(a[-n_out:])]
    inn = [f.astype(np.float32) * ((i + 1) / (n_in + 1)) for i, f in enumerate(b[:n_in])]
    frames = list(a[:-n_out]) + [np.clip(f, 0, 255).astype(np.uint8) for f in out + inn] + list(b[n_in:])
    return frames, (len(a) - n_out, len(a) + n_in)


def join_dissolve(a, b, n: int):
    """Cross-dissolve over n frames: A's last n frames blended into B's first n."""
    mix = [cv2.addWeighted(fa, 1 - (i + 1) / (n + 1), fb, (i + 1) / (n + 1), 0.0)
           for i, (fa, fb) in enumerate(zip(a[-n:], b[:n]))]
    return list(a[:-n]) + mix + list(b[n:]), (len(a) - n, len(a))


def _write_silent(path: Path, frames) -> Path:
    path.write_bytes(encode_clip(frames, np.zeros(int(len(frames) / SHOT_FPS * 16000), np.float32), fps=SHOT_FPS))
    return path


# (A, B) pairs of different people; each is joined by every transition in TRANSITIONS.
PEOPLE_PAIRS = [("wda_aoc_000.mp4", "edtalk_obama.mp4"),
                ("retalking_face2.mp4", "liveportrait_s18_music_static.mp4"),
                ("edtalk_mouth_source_noaudio.mp4", "retalking_face1_vfr30.mp4"),
                ("liveportrait_d18_silent.mp4", "latentsync_demo1_portrait_hevc.mp4")]
TRANSITIONS = [("hard", lambda a, b: join_hard(a, b)),
               ("fade", lambda a, b: join_fade(a, b, 6, 7)),  # 0.52 s through black
               ("fade", lambda a, b: join_fade(a, b, 12, 13)),  # 1.0 s
               ("dissolve", lambda a, b: join_dissolve(a, b, 13)),  # 0.52 s
               ("dissolve", lambda a, b: join_dissolve(a, b, 25))]  # 1.0 s
# The same person before and after a hard cut: a later moment of the same clip, or mirrored.
SAME_PERSON = [("edtalk_obama.mp4", 0.0, 6.0, False), ("wda_aoc_000.mp4", 0.0, 5.0, False),
               ("edtalk_mouth_source_noaudio.mp4", 0.0, 5.0, False),
               ("wda_aoc_000.mp4", 0.0, 2.0, True), ("edtalk_obama.mp4", 0.0, 2.0, True)]


def transition_clips(real_dir: Path, out_dir: Path, seconds: float = 2.0) -> list[LabelledClip]:
    """Every labelled transition clip, written to out_dir as 25 fps H.264 (silent audio)."""
    segs: dict[tuple[str, float], list[np.ndarray]] = {}

    def seg(name, start):
        if (name, start) not in segs:
            segs[(name, start)] = square_segment(real_dir / name, start, seconds)
        return segs[(name, start)]

    clips = []
    for a, b in PEOPLE_PAIRS:
        for i, (kind, join) in enumerate(TRANSITIONS):
            frames, truth = join(seg(a, 0.0), seg(b, 0.0))
            name = f"{kind}{i}_{Path(a).stem[:12]}_{Path(b).stem[:12]}"
            clips.append(LabelledClip(name, kind, _write_silent(out_dir / f"{name}.mp4", frames), truth))
    for src, t_a, t_b, mirror in SAME_PERSON:
        b = [np.ascontiguousarray(f[:, ::-1]) for f in seg(src, t_b)] if mirror else seg(src, t_b)
        frames, truth = join_hard(seg(src, t_a), b)
        name = f"same_{Path(src).stem[:12]}_{'mirror' if mirror else f'{t_b:g}s'}"
        clips.append(LabelledClip(name, "same_person", _write_silent(out_dir / f"{name}.mp4", frames), truth))
    return clips


def zoom(frames, to: float):
    """A digital zoom-in about the centre, from 1x to ``to`` over the frames (a camera move)."""
    out = []
    for i, f in enumerate(frames):
        z = 1 + (to - 1) * i / max(len(frames) - 1, 1)
        m = cv2.getRotationMatrix2D((f.shape[1] / 2, f.shape[0] / 2), 0.0, z)
        out.append(cv2.warpAffine(f, m, (f.shape[1], f.shape[0]), borderMode=cv2.BORDER_REFLECT))
    return out


def pan(frames, fraction: float):
    """A horizontal pan: the view slides by ``fraction`` of the width over the frames."""
    w = frames[0].shape[1]
    m = lambda i: np.float32([[1, 0, -fraction * w * i / max(len(frames) - 1, 1)], [0, 1, 0]])  # noqa: E731
    return [cv2.warpAffine(f, m(i), (w, f.shape[0]), borderMode=cv2.BORDER_REFLECT) for i, f in enumerate(frames)]


def exposure_ramp(frames, gain: float, start: int, n: int):
    """The picture brightens by ``gain`` over n frames from ``start`` (auto-exposure, a light)."""
    g = lambda i: 1 + (gain - 1) * min(max((i - start) / n, 0.0), 1.0)  # noqa: E731
    return [np.clip(f.astype(np.float32) * g(i), 0, 255).astype(np.uint8) for i, f in enumerate(frames)]


def no_cut_clips(real_dir: Path, out_dir: Path, seconds: float = 4.0) -> list[LabelledClip]:
    """One shot each, with what a careless detector takes for a cut: a fast zoom (1x -> 1.5x in
    1.3 s), a fast pan (a quarter of the width in 1.3 s), a brightness step (x1.3 over 3 frames)."""
    clips = []
    for src in ("edtalk_obama.mp4", "wda_aoc_000.mp4"):
        base = square_segment(real_dir / src, 0.0, seconds)
        k, stem = len(base) // 3, Path(src).stem[:12]
        # the move runs over the middle second; the last frames hold its end position
        variants = {"zoom": base[:k] + zoom(base[k:2 * k], 1.5) + [zoom([f, f], 1.5)[1] for f in base[2 * k:]],
                    "pan": base[:k] + pan(base[k:2 * k], 0.25) + [pan([f, f], 0.25)[1] for f in base[2 * k:]],
                    "exposure": exposure_ramp(base, 1.3, k, 3)}
        for what, frames in variants.items():
            name = f"nocut_{what}_{stem}"
            clips.append(LabelledClip(name, "no_cut", _write_silent(out_dir / f"{name}.mp4", frames), None))
    return clips


def real_clips(real_dir: Path) -> list[LabelledClip]:
    """The real video clips as they are, each one shot (no detector in benchmarks/shots.py cuts any)."""
    return [LabelledClip(p.stem, "none", p, None) for p in sorted(real_dir.glob("*.mp4"))]


def judge_cuts(cuts: list[int], clip: LabelledClip, tolerance: int = 1) -> tuple[bool, int, int | None]:
    """(transition found, false cuts, timing error in frames of the first good cut) for the cut
    frames a detector reported on a labelled clip. A hard cut must be within ``tolerance`` frames;
    a gradual one anywhere in its span; every other cut is false."""
    if clip.truth is None:
        return False, len(cuts), None
    first, last = clip.truth
    lo, hi = (first - tolerance, last + tolerance) if first == last else (first, last)
    good = [c for c in cuts if lo <= c <= hi]
    return bool(good), len(cuts) - len(good), (abs(good[0] - first) if good and first == last else None)


def reencode(src: Path, dst: Path, *, crf: int = 30, audio_bitrate: int = 32_000) -> Path:
    """``src`` decoded and encoded again at a lower quality (H.264 ``crf``, AAC ``audio_bitrate``)."""
    frames = [f for _, f in iter_frames(str(src))]
    audio, _ = decode_audio(str(src))
    dst.write_bytes(encode_clip(frames, audio[: len(frames) * 640], crf=crf, audio_bitrate=audio_bitrate))
    return dst


def mirror_crop_remux(src: Path, dst: Path, *, crop=(0.06, 0.0, 0.10, 0.08), container: str = "matroska") -> Path:
    """``src`` mirrored left-right and cropped by the given fractions (left, top, right, bottom),
    the video encoded again (H.264 crf 23) and the audio packets copied as they are (re-muxed) into
    another container (Matroska by default): a re-upload with different framing."""
    from fractions import Fraction

    import av

    frames = [f for _, f in iter_frames(str(src))]
    h, w = frames[0].shape[:2]
    x0, y0 = int(crop[0] * w) // 2 * 2, int(crop[1] * h) // 2 * 2
    x1, y1 = w - int(crop[2] * w) // 2 * 2, h - int(crop[3] * h) // 2 * 2
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=container) as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = x1 - x0, y1 - y0, "yuv420p"
        vs.time_base = Fraction(1, 25)
        vs.options = {"crf": "23", "preset": "veryfast"}
        ain = inp.streams.audio[0]
        aout = out.add_stream_from_template(ain)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[y0:y1, x0:x1][:, ::-1]), format="rgb24")
            vf.pts = i
            for packet in vs.encode(vf):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
        for packet in inp.demux(ain):
            if packet.dts is None:
                continue
            packet.stream = aout
            out.mux(packet)
    return dst
