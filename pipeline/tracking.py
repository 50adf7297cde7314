"""Detect & track: one decode pass yields shot cuts (every frame) and faces (at detect_fps),
which are linked into face tracks that never cross a cut.

Follows the structure of joonson/syncnet_python ``run_pipeline.py`` (scene detection, then an
IoU tracker that tolerates a few missed detections, then per-track interpolation and median
smoothing), with detection at a reduced rate instead of on every frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .faces.base import Face, FaceDetector
from .geometry import ActivePicture, ActivePictureTracker
from .media import iter_frames
from .shots import ShotDetector, mark_shots


@dataclass
class Detection:
    t: float
    face: Face


@dataclass
class Track:
    track_id: int
    shot_index: int
    detections: list[Detection] = field(default_factory=list)

    @property
    def t_first(self) -> float:
        return self.detections[0].t

    @property
    def t_last(self) -> float:
        return self.detections[-1].t

    def arrays(self) -> dict[str, np.ndarray]:
        """Detection times and boxes as arrays: what segmenting and the crop box are made of."""
        times = np.array([d.t for d in self.detections], dtype=np.float64)
        boxes = np.stack([d.face.box for d in self.detections]).astype(np.float32)
        return {"times": times, "boxes": boxes}


@dataclass
class VideoAnalysis:
    frame_times: np.ndarray  # every decoded frame, source timeline
    cut_times: list[float]  # times of the first frame of each new shot
    tracks: list[Track]
    detect_times: np.ndarray
    faces_per_detection: np.ndarray  # number of faces found at each detection time
    scale: float  # analysis pixels -> source pixels
    width: int  # source (rotated) size
    height: int
    # per shot: the picture inside burned-in letterbox/pillarbox bars (source pixels; geometry.py)
    active_pictures: list[ActivePicture] = field(default_factory=list)

    def shot_bounds(self, t_end: float) -> list[tuple[float, float]]:
        starts = [float(self.frame_times[0])] + list(self.cut_times)
        ends = list(self.cut_times) + [t_end]
        return list(zip(starts, ends))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def analyze_video(uri: str, detector: FaceDetector, *, rotation: int, width: int, height: int,
                  detect_fps: float, max_side: int, iou_threshold: float, max_gap_s: float,
                  shot_detectors: dict[str, float], min_shot_frames: int = 15, damage=None,
                  limits=None, decode_threads: int | None = None) -> VideoAnalysis:
    """Decode once at analysis resolution; find cuts on every frame, faces at ``detect_fps``.

    ``damage``: a media.DecodeLog to decode past damaged packets (their frames are skipped and
    their time ranges logged) instead of raising at the first one. ``shot_detectors``: name ->
    threshold (pipeline.shots), run on the same decoded frames. ``limits``: media.DecodeLimits.
    ``decode_threads``: FFmpeg's decoder threads (media.iter_frames; None: FFmpeg's own count)."""
    scale = max(1.0, max(width, height) / max_side)
    times: list[float] = []
    cuts: list[float] = []
    next_detect = -np.inf
    detect_times: list[float] = []
    faces_count: list[int] = []
    tracks: list[Track] = []
    active: list[Track] = []
    shot = 0
    bars = ActivePictureTracker()  # cropdetect-style bar detection, reset at every cut
    frames = iter_frames(uri, rotation=rotation, max_side=max_side, damage=damage, limits=limits,
                         threads=decode_threads)
    for t, img, new_shot in mark_shots(frames, ShotDetector(shot_detectors, min_shot_frames)):
        if new_shot:
            cuts.append(t)
            shot += 1
            bars.new_shot()
            active = []  # tracks never cross a cut
            next_detect = -np.inf  # detect on the first frame of every shot
        bars.add(img)
        times.append(t)
        if t + 1e-6 < next_detect:
            continue
        next_detect = t + 1.0 / detect_fps
        sx = width / img.shape[1]
        sy = height / img.shape[0]
        faces = detector.detect(img)
        for f in faces:  # back to source pixels
            f.box = f.box * np.array([sx, sy, sx, sy], np.float32)
            if f.kps5 is not None:
                f.kps5 = f.kps5 * np.array([sx, sy], np.float32)
            if f.landmarks is not None:
                f.landmarks = f.landmarks * np.array([sx, sy, sx][: f.landmarks.shape[1]], np.float32)
        detect_times.append(t)
        faces_count.append(len(faces))
        active = [tr for tr in active if t - tr.t_last <= max_gap_s + 1e-6]
        # Greedy IoU matching, best pairs first (syncnet_python's tracker links by IoU > 0.5).
        pairs = sorted(((iou(tr.detections[-1].face.box, f.box), ti, fi)
                        for ti, tr in enumerate(active) for fi, f in enumerate(faces)), reverse=True)
        used_t, used_f = set(), set()
        for score, ti, fi in pairs:
            if score < iou_threshold or ti in used_t or fi in used_f:
                continue
            active[ti].detections.append(Detection(t, faces[fi]))
            used_t.add(ti)
            used_f.add(fi)
        for fi, f in enumerate(faces):
            if fi not in used_f:
                tr = Track(track_id=len(tracks), shot_index=shot, detections=[Detection(t, f)])
                tracks.append(tr)
                active.append(tr)
    return VideoAnalysis(frame_times=np.asarray(times), cut_times=cuts, tracks=tracks,
                         detect_times=np.asarray(detect_times), faces_per_detection=np.asarray(faces_count),
                         scale=scale, width=width, height=height, active_pictures=bars.pictures(width, height))
