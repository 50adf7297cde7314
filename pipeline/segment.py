"""Segment: face tracks + shots -> candidate clips, each with one square crop box.

A clip keeps one fixed crop for its whole length (as Loopy-style training data does), so the
head moves inside the frame and head-motion statistics stay measurable. The box is centred on
the median of the median-filtered face centres and its side is ``crop_scale`` x the median
face side, then moved (not shrunk) to stay inside the shot's active picture (the frame less any
burned-in letterbox/pillarbox bars, pipeline/geometry.py) where possible; along an axis where it
cannot fit, it is moved to cover the whole picture, which gives the least padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import median_filter

from .geometry import ActivePicture, outside_share, place_in_picture
from .media import merge_ranges
from .tracking import VideoAnalysis

# Output clips are a multiple of 8 frames: 8 frames at 25 fps = 5120 samples at 16 kHz = exactly
# 5 AAC frames of 1024 samples, so the AAC stream in video.mp4 decodes to exactly the video's
# length (AAC pads its last frame, and MP4 readers do not trim that padding).
FRAME_QUANTUM = 8


@dataclass
class CandidateClip:
    clip_index: int
    track_id: int
    shot_index: int
    start_s: float
    n_frames: int
    crop_x0: float
    crop_y0: float
    crop_size: float
    crop_scale: float
    face_size_px: float
    padded: bool
    max_faces: int  # most faces seen at one detection time inside the clip
    active_picture: list[float] | None = None  # [x0, y0, x1, y1] of the shot's picture inside its bars
    pad_frac: float = 0.0  # share of the crop's area outside the active picture (shown as padding)

    @property
    def end_s(self) -> float:
        return self.start_s + self.n_frames / 25.0


@dataclass
class ShortSegment:
    """A tracked face segment too short to become a clip (recorded as a clip-level reject)."""
    track_id: int
    start_s: float
    duration_s: float
    cut_by: str | None = None  # "audio" / "damage": what trimmed the track to this (see Coverage)


# Audio coverage is found in samples and cut in samples; candidate clips end this far inside a
# span so that rounding a clip's start to a sample index can never carry its end past the span
# (a start on the span's first sample rounds onto it, so starts need no margin).
COVERAGE_MARGIN_S = 0.001
AUDIO_SHORTFALL_S = 0.08  # less missing audio than this is not named as the cause of a trim


@dataclass
class Coverage:
    """Where the source has both picture and sound. A candidate clip lies inside the audio spans
    and outside every damaged range (bad packets, video or audio), so nothing in a clip is
    padded with silence or shows a broken picture. ``audio`` None: not constrained."""
    audio: list[tuple[float, float]] | None = None
    damaged: list[tuple[float, float]] = field(default_factory=list)

    def pieces(self, start: float, end: float) -> tuple[list[tuple[float, float]], str | None]:
        """The parts of [start, end) inside the coverage, and what removed the rest
        ("audio", "damage", "audio+damage"; None when nothing was removed)."""
        parts = [(start, end)] if end > start else []
        by_audio = False
        if self.audio is not None:
            # A hole that a damaged audio packet left counts as damage, not as missing audio; and
            # streams that end a few ms apart are not "missing audio" (under two video frames).
            explained = merge_ranges(list(self.audio) + list(self.damaged))
            by_audio = _total(_intersect(parts, explained)) < (end - start) - AUDIO_SHORTFALL_S
            parts = [(max(a, s0), min(b, e0 - COVERAGE_MARGIN_S)) for a, b in parts for s0, e0 in self.audio]
            parts = [(a, b) for a, b in parts if b > a]
        for d0, d1 in self.damaged:
            parts = [q for a, b in parts for q in ((a, min(b, d0)), (max(a, d1), b)) if q[1] > q[0]]
        by_damage = any(d0 < end and d1 > start for d0, d1 in self.damaged)
        cut_by = "+".join(n for n, hit in (("audio", by_audio), ("damage", by_damage)) if hit) or None
        return parts, cut_by


def _total(parts) -> float:
    return sum(b - a for a, b in parts)


def _intersect(parts, spans) -> list[tuple[float, float]]:
    return [(max(a, s0), min(b, e0)) for a, b in parts for s0, e0 in spans if min(b, e0) > max(a, s0)]


def _track_spans(analysis: VideoAnalysis, shots, half: float, fps: int, video_end_s: float, coverage: Coverage):
    """(track, start, end, cut_by) for every covered part of every track's shot-bounded span; a
    track with no covered part gives one empty span, so it is still reported as too short."""
    for track in sorted(analysis.tracks, key=lambda tr: (tr.t_first, tr.track_id)):
        shot_start, shot_end = shots[track.shot_index]
        start = max(track.t_first - half, shot_start, float(analysis.frame_times[0]))
        end = min(track.t_last + half + (1.0 / fps), shot_end, video_end_s)
        parts, cut_by = coverage.pieces(start, end)
        for a, b in parts or [(start, start)]:
            yield track, a, b, cut_by


def _odd(n: int) -> int:
    return max(1, n if n % 2 else n - 1)


def crop_box(boxes: np.ndarray, *, width: int, height: int, crop_scale: float, smooth: int,
             picture: ActivePicture | None = None):
    """Square crop (x0, y0, side, used_scale, face_side, padded) for face boxes [N,4], placed in
    ``picture`` (default: the whole ``width`` x ``height`` frame)."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    if len(boxes) >= 3 and smooth > 1:
        k = _odd(min(smooth, len(boxes)))
        cx, cy, side = (median_filter(a, size=k, mode="nearest") for a in (cx, cy, side))
    face = float(np.median(side))
    size = crop_scale * face
    center_x, center_y = float(np.median(cx)), float(np.median(cy))
    pic = picture if picture is not None else ActivePicture.full(width, height)
    # Keep the face scale (no shrinking, so the face never fills more than intended) and pad
    # where the crop is larger than the picture.
    padded = size > min(pic.width, pic.height)
    x0 = place_in_picture(center_x - size / 2, size, pic.x0, pic.x1)
    y0 = place_in_picture(center_y - size / 2, size, pic.y0, pic.y1)
    return x0, y0, size, size / face if face > 0 else crop_scale, face, padded


def segment_tracks(analysis: VideoAnalysis, *, video_end_s: float, detect_fps: float, min_clip_s: float,
                   max_clip_s: float, crop_scale: float, smooth_window_s: float, fps: int = 25,
                   coverage: Coverage | None = None):
    """Candidate clips and the too-short segments, in (start time, track) order.

    Clips lie inside ``coverage`` (audio spans minus damaged ranges): a track whose span has
    missing audio or damage is trimmed or split there, and a remainder too short for a clip is a
    ShortSegment whose ``cut_by`` says what trimmed it.
    """
    shots = analysis.shot_bounds(video_end_s)
    half = 0.5 / detect_fps
    clips: list[CandidateClip] = []
    short: list[ShortSegment] = []
    quantum_s = FRAME_QUANTUM / fps
    for track, start, end, cut_by in _track_spans(analysis, shots, half, fps, video_end_s, coverage or Coverage()):
        length = end - start
        if length + 1e-9 < max(min_clip_s, quantum_s):
            short.append(ShortSegment(track.track_id, start, max(length, 0.0), cut_by))
            continue
        n_pieces = max(1, math.ceil(length / max_clip_s - 1e-9))
        piece = length / n_pieces
        arr = track.arrays()
        for p in range(n_pieces):
            p_start = start + p * piece
            n_frames = int(math.floor(piece * fps + 1e-6)) // FRAME_QUANTUM * FRAME_QUANTUM
            if n_frames / fps + 1e-9 < min_clip_s or n_frames == 0:
                short.append(ShortSegment(track.track_id, p_start, piece, cut_by))
                continue
            p_end = p_start + n_frames / fps
            sel = (arr["times"] >= p_start - half) & (arr["times"] < p_end + half)
            if not sel.any():
                sel = np.argmin(np.abs(arr["times"] - p_start))[None]
            boxes = arr["boxes"][sel]
            picture = (analysis.active_pictures[track.shot_index] if analysis.active_pictures
                       else ActivePicture.full(analysis.width, analysis.height))
            x0, y0, size, used_scale, face, padded = crop_box(
                boxes, width=analysis.width, height=analysis.height, crop_scale=crop_scale,
                smooth=int(round(smooth_window_s * detect_fps)) | 1, picture=picture)
            in_clip = (analysis.detect_times >= p_start) & (analysis.detect_times < p_end)
            max_faces = int(analysis.faces_per_detection[in_clip].max()) if in_clip.any() else 1
            clips.append(CandidateClip(
                clip_index=-1, track_id=track.track_id, shot_index=track.shot_index, start_s=float(p_start),
                n_frames=n_frames, crop_x0=float(x0), crop_y0=float(y0), crop_size=float(size),
                crop_scale=float(used_scale), face_size_px=float(face), padded=bool(padded), max_faces=max_faces,
                active_picture=picture.as_list(),
                pad_frac=outside_share(x0, y0, size, picture)))
    clips.sort(key=lambda c: (c.start_s, c.track_id))
    for i, c in enumerate(clips):
        c.clip_index = i
    return clips, short
