"""Shot boundaries with PySceneDetect's detectors, fed the frames the tracker already decodes.

syncnet_python ``run_pipeline.py`` finds shots with PySceneDetect's ``ContentDetector`` (default
threshold 27) before tracking faces. By default we run its ``AdaptiveDetector`` (the content score
relative to its neighbours: it also finds cuts between two shots of the same person) and its
``HistogramDetector`` (luma-histogram correlation: the only one that finds cross-dissolves); the
measured comparison is in docs/pipeline.md "Shots", reproduced by benchmarks/shots.py. The detectors
see what ``SceneManager`` would give them: frames downscaled to a longest side of 256 px
(``scene_manager.compute_downscale_factor``, bilinear) in OpenCV's BGR order.

A detector may report a cut a few frames after it happened (``event_buffer_length``), so
``mark_shots`` holds that many frames back: every frame leaves it already knowing whether it
starts a new shot, and the tracker never links a face across a cut.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import cv2
import numpy as np

# scenedetect.scene_manager.DEFAULT_MIN_WIDTH: SceneManager's auto-downscale target
SCENEDETECT_WIDTH = 256
SHOT_DETECTORS = ("content", "adaptive", "histogram", "hash", "threshold", "hsv")


def scenedetect_frame(img_rgb: np.ndarray) -> np.ndarray:
    """An RGB analysis frame as SceneManager would pass it to a detector (auto-downscale, BGR)."""
    h, w = img_rgb.shape[:2]
    factor = max(h, w) / SCENEDETECT_WIDTH  # compute_downscale_factor(max(frame size))
    if factor > 1.0:
        img_rgb = cv2.resize(img_rgb, (max(1, round(w / factor)), max(1, round(h / factor))),
                             interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR)


class HsvHistogramDetector:
    """The pipeline's former detector, kept for the comparison: a cut where the Bhattacharyya
    distance of consecutive 16x8 hue-saturation histograms (64x64 thumbnail) exceeds threshold.
    It takes the RGB analysis frame itself, as it did inside tracking.analyze_video."""

    event_buffer_length = 0
    takes_analysis_frame = True

    def __init__(self, threshold: float = 0.45):
        self.threshold = threshold
        self._prev = None

    def process_frame(self, frame_num: int, frame_rgb: np.ndarray) -> list[int]:
        small = cv2.resize(frame_rgb, (64, 64), interpolation=cv2.INTER_AREA)
        hist = cv2.calcHist([cv2.cvtColor(small, cv2.COLOR_RGB2HSV)], [0, 1], None, [16, 8], [0, 180, 0, 256])
        hist = cv2.normalize(hist, hist).flatten()
        cut = self._prev is not None and cv2.compareHist(self._prev, hist, cv2.HISTCMP_BHATTACHARYYA) > self.threshold
        self._prev = hist
        return [frame_num] if cut else []

    def post_process(self, frame_num: int) -> list[int]:
        return []


def mean_pixel_distance(left: np.ndarray, right: np.ndarray) -> float:
    """PySceneDetect's ``content_detector._mean_pixel_distance`` (the mean |left - right| of two 8-bit
    planes, three per frame for ContentDetector and AdaptiveDetector) as one OpenCV call: OpenCV sums
    the absolute differences of 8-bit pixels exactly (integers, far below 2**53), so the result is the
    same float as scenedetect's int32 casts and NumPy sum, for a tenth of its CPU (0.46-0.64 -> 0.05-0.07
    CPU s a round of the real clips, docs/benchmarks.md issue 13; tests/test_shots.py compares them)."""
    if left.ndim != 2 or left.shape != right.shape:
        raise ValueError(f"two 2-D planes of one shape expected, got {left.shape} and {right.shape}")
    return cv2.norm(left, right, cv2.NORM_L1) / float(left.shape[0] * left.shape[1])


def _use_opencv_pixel_distance() -> None:
    """Point scenedetect 0.6.6's ContentDetector (and AdaptiveDetector, its subclass) at
    ``mean_pixel_distance``: it calls the module function by name for each plane."""
    from scenedetect.detectors import content_detector

    content_detector._mean_pixel_distance = mean_pixel_distance


def make_detector(name: str, threshold: float, min_scene_len: int = 15):
    """One detector by name with its own threshold (PySceneDetect's defaults: content 27,
    adaptive 3.0, histogram 0.05, hash 0.395, threshold 12; hsv is ours, 0.45)."""
    from scenedetect.detectors import (AdaptiveDetector, ContentDetector, HashDetector,
                                       HistogramDetector, ThresholdDetector)

    _use_opencv_pixel_distance()
    if name == "content":
        return ContentDetector(threshold=threshold, min_scene_len=min_scene_len)
    if name == "adaptive":
        return AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_scene_len)
    if name == "histogram":
        return HistogramDetector(threshold=threshold, min_scene_len=min_scene_len)
    if name == "hash":
        return HashDetector(threshold=threshold, min_scene_len=min_scene_len)
    if name == "threshold":
        return ThresholdDetector(threshold=threshold, min_scene_len=min_scene_len)
    if name == "hsv":
        return HsvHistogramDetector(threshold)
    raise ValueError(f"unknown shot detector {name!r}; expected one of {SHOT_DETECTORS}")


class ShotDetector:
    """Several detectors on the same frames; a frame starts a new shot if any of them says so."""

    # ThresholdDetector reports a fade when the picture comes back, however long the black
    # lasted; its cuts later than this many frames are placed at the oldest frame still held.
    MAX_LAG = 30

    def __init__(self, detectors: dict[str, float], min_scene_len: int = 15):
        if not detectors:
            raise ValueError("track.shot_detectors is empty: at least one shot detector is needed")
        self.detectors = [make_detector(n, t, min_scene_len) for n, t in detectors.items()]
        self.lag = min(self.MAX_LAG, max(getattr(d, "event_buffer_length", 0) for d in self.detectors))
        if any(n == "threshold" for n in detectors):
            self.lag = self.MAX_LAG

    def process(self, frame_num: int, img_rgb: np.ndarray) -> list[int]:
        frame = None
        cuts = set()
        for d in self.detectors:
            if getattr(d, "takes_analysis_frame", False):
                cuts.update(d.process_frame(frame_num, img_rgb))
                continue
            if frame is None:
                frame = scenedetect_frame(img_rgb)
            cuts.update(d.process_frame(frame_num, frame))
        return sorted(cuts)

    def finish(self, last_frame_num: int) -> list[int]:
        return sorted({c for d in self.detectors for c in d.post_process(last_frame_num)})


def mark_shots(frames: Iterable[tuple[float, np.ndarray]], shots: ShotDetector
               ) -> Iterator[tuple[float, np.ndarray, bool]]:
    """(t, img, starts_new_shot) for every frame, in order, ``shots.lag`` frames behind decoding."""
    held: deque[tuple[int, float, np.ndarray]] = deque()
    cuts: set[int] = set()
    n = -1
    for n, (t, img) in enumerate(frames):
        cuts.update(c for c in shots.process(n, img) if c > 0)
        held.append((n, t, img))
        while len(held) > shots.lag:
            yield _release(held, cuts)
    if n >= 0:
        cuts.update(c for c in shots.finish(n) if c > 0)
    while held:
        yield _release(held, cuts)


def _release(held: deque, cuts: set[int]) -> tuple[float, np.ndarray, bool]:
    i, t, img = held.popleft()
    late = {c for c in cuts if c < i}  # reported after its frame left: cut here instead
    cuts.difference_update(late)
    starts = i in cuts or bool(late)
    cuts.discard(i)
    return t, img, starts
