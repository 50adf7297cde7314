"""A synthetic talking head for the demo and tests, made from a real face photo that ships
with scikit-image (``skimage.data.astronaut()``, public domain, NASA) and needs no network.

The mouth opens with the loudness envelope of a synthetic speech-like signal (a voiced
source at a gliding pitch, shaped into syllables at ~4 Hz), the head sways slowly, and
optional timing markers (a bright patch on the chest for one source frame + a click in the
audio at the same instant) make audio/video alignment measurable after any processing.
Frame timestamps can be made irregular to emulate variable-frame-rate phone video.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from .media import mux_audio

# Pixel geometry of astronaut() (512x512): mouth centre and the chest patch used as marker.
_MOUTH = (226, 157)
_MARKER = (135, 175, 24)  # x, y, side: beside the cheek, inside a 2x face crop


def speech_like_audio(duration_s: float, rate: int = 16000, seed: int = 0, syllable_hz: float = 4.0):
    """Voiced syllables: harmonics of a 110-190 Hz pitch under a 4 Hz on/off envelope."""
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * rate))
    t = np.arange(n) / rate
    f0 = 150 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    # Syllable envelope: random-length bursts with gaps, like running speech.
    env = np.zeros(n)
    pos = 0
    while pos < n:
        length = int(rate * rng.uniform(0.12, 0.3))
        gap = int(rate * rng.uniform(0.04, 0.15))
        env[pos:pos + length] = np.sin(np.linspace(0, np.pi, min(length, n - pos)))
        pos += length + gap
    noise = rng.normal(0, 0.05, n)
    audio = (0.2 * voiced + noise) * env  # peaks stay below ~0.5, so timing clicks (0.95) stand out
    return audio.astype(np.float32), env.astype(np.float32)


def make_talking_head(path: str | Path, *, duration_s: float = 6.0, fps: float = 25.0, size: int = 640,
                      vfr: bool = False, markers_s: tuple[float, ...] = (), audio_rate: int = 44100,
                      stereo: bool = True, seed: int = 0, sway_px: float = 6.0) -> Path:
    """Write an H.264/AAC MP4 talking head; returns the path."""
    from skimage import data

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    face = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_CUBIC)
    s = size / 512
    audio16, env16 = speech_like_audio(duration_s, 16000, seed)
    rng = np.random.default_rng(seed + 1)
    # Frame times: regular, or jittered between 0.6x and 1.6x the nominal interval (VFR).
    times = []
    t = 0.0
    while t < duration_s - 1e-9:
        times.append(t)
        step = 1.0 / fps
        t += step * (rng.uniform(0.6, 1.6) if vfr else 1.0)
    # Markers land on exact frames: snap each marker time onto the frame grid we produce.
    marker_frames = {int(np.argmin(np.abs(np.array(times) - m))) for m in markers_s}
    marker_times = sorted(times[i] for i in marker_frames)
    # Audio at the container rate; clicks at the marker frames' exact times.
    n_audio = int(round(duration_s * audio_rate))
    audio = np.interp(np.arange(n_audio) / audio_rate, np.arange(len(audio16)) / 16000, audio16).astype(np.float32)
    for mt in marker_times:
        i = int(round(mt * audio_rate))
        audio[i:i + int(0.004 * audio_rate)] = 0.95
    with av.open(str(path), "w") as out:
        tb = Fraction(1, 90000)
        vs = out.add_stream("libx264", rate=int(round(fps)))
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        vs.time_base = tb
        vs.codec_context.time_base = tb
        vs.options = {"crf": "20", "preset": "veryfast"}
        aus = out.add_stream("aac", rate=audio_rate)
        aus.layout = "stereo" if stereo else "mono"
        aus.time_base = Fraction(1, audio_rate)
        for i, ft in enumerate(times):
            k = min(int(ft * 16000), len(env16) - 1)
            openness = float(env16[k])
            ang = 1.5 * np.sin(2 * np.pi * 0.3 * ft)
            dx = sway_px * s * np.sin(2 * np.pi * 0.2 * ft)
            m = cv2.getRotationMatrix2D((size / 2, size / 2), ang, 1.0)
            m[0, 2] += dx
            img = face.copy()
            mx, my = int(_MOUTH[0] * s), int(_MOUTH[1] * s)
            cv2.ellipse(img, (mx, my), (int(15 * s), max(1, int(14 * s * openness))), 0, 0, 360, (60, 20, 25), -1)
            if i in marker_frames:
                x, y, w = (int(v * s) for v in _MARKER)
                img[y:y + w, x:x + w] = 255
            img = cv2.warpAffine(img, m, (size, size), borderMode=cv2.BORDER_REFLECT)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = int(round(ft / tb))
            frame.time_base = tb
            for p in vs.encode(frame):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        mux_audio(out, aus, np.stack([audio, audio]) if stereo else audio[None], audio_rate)
    return path


MARKER_BOX = _MARKER
