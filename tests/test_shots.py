"""Shot boundaries (pipeline/shots.py): PySceneDetect's detectors on the frames the tracker decodes.

The labelled clips (tests/derived_clips.py) join two real clips by a hard cut, a fade through
black or a cross-dissolve, or cut between two shots of the same person; the real clips have no
cut. The full comparison with our former HSV detector is benchmarks/shots.py (docs/pipeline.md
"Shots"); here the configured detectors must find every transition and cut no real clip.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL_DIR
from derived_clips import SHOT_FPS, join_dissolve, join_hard, judge_cuts, real_clips, square_segment, transition_clips
from pipeline.config import load_config
from pipeline.media import iter_frames
from pipeline.shots import ShotDetector, make_detector, mark_shots, mean_pixel_distance, scenedetect_frame

pytestmark = pytest.mark.realdata

TRACK = load_config().track
MAX_SIDE = load_config().detect.max_side


def _cuts(frames, detectors=None) -> list[int]:
    """Cut frame indices of (t, frame) pairs decoded as analyze_video decodes them, through mark_shots."""
    shots = ShotDetector(detectors or TRACK.shot_detectors, TRACK.min_shot_frames)
    return [i for i, (_, _, new) in enumerate(mark_shots(frames, shots)) if new]


def _decode(path):
    return iter_frames(str(path), max_side=MAX_SIDE)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """(clip, configured detectors' cuts, former HSV detector's cuts) per labelled clip."""
    if not REAL_DIR.exists():
        pytest.skip(f"{REAL_DIR} is absent")
    out = []
    for c in transition_clips(REAL_DIR, tmp_path_factory.mktemp("shots")):
        frames = list(_decode(c.path))
        out.append((c, _cuts(frames), _cuts(frames, {"hsv": 0.45})))
    return out


@pytest.mark.parametrize("kind", ["hard", "fade", "dissolve"])
def test_every_transition_between_two_people_is_found(labelled, kind):
    """Hard cuts within 1 frame, fades and dissolves inside the transition, nothing else cut."""
    judged = {c.name: (cuts, judge_cuts(cuts, c)) for c, cuts, _ in labelled if c.kind == kind}
    assert len(judged) == {"hard": 4, "fade": 8, "dissolve": 8}[kind]
    for name, (cuts, (found, false, err)) in judged.items():
        assert found and false == 0, f"{name}: cuts {cuts}"
        if kind == "hard":
            assert err <= 1, f"{name}: cuts {cuts}"


def test_cuts_between_shots_of_the_same_person(labelled):
    """A later moment of the same clip or its mirror image is found at the frame; one remains
    out of reach (Obama 6 s later: the content score at the cut is 11, within his talking)."""
    found = {c.name: judge_cuts(cuts, c) for c, cuts, _ in labelled if c.kind == "same_person"}
    assert {n for n, (ok, false, err) in found.items() if ok and false == 0 and err == 0} == \
        set(found) - {"same_edtalk_obama_6s"}
    assert found["same_edtalk_obama_6s"] == (False, 0, None)


def test_former_hsv_detector_misses_what_the_switch_is_for(labelled):
    """Our former HSV-histogram threshold on the same frames: no dissolve, no same-person cut, and
    a hard cut between two similar-coloured people missed (why shots come from PySceneDetect)."""
    found = {}
    for c, _, hsv_cuts in labelled:
        ok, false, _ = judge_cuts(hsv_cuts, c)
        found.setdefault(c.kind, []).append(ok and false == 0)
    assert {k: sum(v) for k, v in found.items()} == {"hard": 3, "fade": 7, "dissolve": 0, "same_person": 0}


@pytest.mark.parametrize("clip", real_clips(REAL_DIR) if REAL_DIR.exists() else [], ids=lambda c: c.name)
def test_no_cut_in_a_real_clip(clip):
    assert _cuts(_decode(clip.path)) == []


def _scenedetect_mean_pixel_distance():
    """scenedetect's own ``_mean_pixel_distance``, from a fresh copy of its module (the detectors'
    module points at ours once a detector is made)."""
    import importlib.util

    spec = importlib.util.find_spec("scenedetect.detectors.content_detector")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._mean_pixel_distance


def test_mean_pixel_distance_is_scenedetects():
    """The OpenCV mean |a - b| gives scenedetect's float exactly: on the H, S and V planes of every pair of
    consecutive frames of a real clip (as AdaptiveDetector makes them) and on random and extreme planes;
    and the content detectors use it."""
    import cv2

    reference = _scenedetect_mean_pixel_distance()
    assert reference is not mean_pixel_distance
    planes = [cv2.split(cv2.cvtColor(scenedetect_frame(img), cv2.COLOR_BGR2HSV))
              for _, img in _decode(REAL_DIR / "edtalk_obama.mp4")]
    pairs = [(a[k], b[k]) for a, b in zip(planes, planes[1:]) for k in range(3)]
    rng = np.random.default_rng(3)
    for shape in [(144, 256), (256, 144), (1, 1), (7, 3)]:
        pairs.append(tuple(rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2)))
        pairs.append((np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)))
    assert len(pairs) > 1000
    assert all(mean_pixel_distance(a, b) == reference(a, b) for a, b in pairs)
    from scenedetect.detectors import content_detector

    make_detector("adaptive", 3.0)
    assert content_detector._mean_pixel_distance is mean_pixel_distance


def test_mark_shots_places_late_cuts_at_their_frame(labelled):
    """AdaptiveDetector reports a cut window_width (2) frames after it happened; mark_shots holds
    frames back so the cut still lands on its own frame, before the tracker sees that frame."""
    clip = next(c for c, _, _ in labelled if c.name == "hard0_wda_aoc_000_edtalk_obama")
    frames = [img for _, img in iter_frames(str(clip.path), max_side=MAX_SIDE)]
    offline = ShotDetector({"adaptive": 3.0})
    reported = [(i, c) for i, f in enumerate(frames) for c in offline.process(i, f)]
    assert reported == [(clip.truth[0] + 2, clip.truth[0])]
    shots = ShotDetector({"adaptive": 3.0})
    assert shots.lag == 2
    marked = list(mark_shots(((0.04 * i, f) for i, f in enumerate(frames)), shots))
    assert [i for i, (_, _, new) in enumerate(marked) if new] == [clip.truth[0]]
    assert [t for t, _, _ in marked] == [0.04 * i for i in range(len(frames))]


def test_a_cut_reported_beyond_the_held_frames_lands_on_the_oldest_held_one():
    """ThresholdDetector reports a fade through black at its middle, once the picture returns:
    after 4 s of black that frame has left; the cut goes on the oldest frame still held (black)."""
    grey, black = np.full((64, 64, 3), 120, np.uint8), np.zeros((64, 64, 3), np.uint8)
    frames = [grey] * 20 + [black] * 100 + [grey] * 20
    shots = ShotDetector({"threshold": 12.0})
    marked = list(mark_shots(((0.04 * i, f) for i, f in enumerate(frames)), shots))
    assert [i for i, (_, _, new) in enumerate(marked) if new] == [120 - ShotDetector.MAX_LAG]
    # held long enough, the same fade is cut at its middle (PySceneDetect's fade_bias 0)
    short = [grey] * 20 + [black] * 40 + [grey] * 20
    marked = list(mark_shots(((0.04 * i, f) for i, f in enumerate(short)), ShotDetector({"threshold": 12.0})))
    assert [i for i, (_, _, new) in enumerate(marked) if new] == [40]


def test_tracks_split_at_a_dissolve_and_a_hard_cut(labelled):
    """analyze_video with the smoke face detector: no face track reaches from one person's frames
    into the other's, and the shot bounds are the detected cuts."""
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector
    from pipeline.tracking import analyze_video

    detector = MediaPipeFaceDetector(min_confidence=0.5, landmarks=False)
    for name in ("hard0_wda_aoc_000_edtalk_obama", "dissolve4_wda_aoc_000_edtalk_obama"):
        clip, cuts = next((c, k) for c, k, _ in labelled if c.name == name)
        a = analyze_video(str(clip.path), detector, rotation=0, width=512, height=512, detect_fps=5.0,
                          max_side=MAX_SIDE, iou_threshold=TRACK.iou_threshold, max_gap_s=TRACK.max_gap_s,
                          shot_detectors=TRACK.shot_detectors, min_shot_frames=TRACK.min_shot_frames)
        t_first, t_last = a.frame_times[clip.truth[0]], a.frame_times[clip.truth[1]]
        assert np.allclose(a.cut_times, a.frame_times[cuts]) and len(cuts) >= 1
        assert len(a.tracks) >= 2 and {tr.shot_index for tr in a.tracks} == set(range(len(cuts) + 1))
        for tr in a.tracks:
            assert not (tr.t_first < t_first and tr.t_last >= t_last), f"{name}: track {tr.track_id} spans the transition"
        # both people were tracked: a long track before the transition and one after it
        assert any(tr.t_last < t_last and len(tr.detections) >= 5 for tr in a.tracks)
        assert any(tr.t_first >= t_first and len(tr.detections) >= 5 for tr in a.tracks)


@pytest.mark.slow
def test_curation_clips_never_cross_a_cut(tmp_path, ray_local):
    """The whole smoke pipeline on one joined clip (Ocasio-Cortez | hard cut | Obama | 0.5 s
    dissolve | retalking face 2, each with its own speech): every candidate clip, kept or
    rejected, lies inside one shot, and each of the three people yields one."""
    import pyarrow.parquet as pq

    from pipeline.inputs import expand_inputs
    from pipeline.media import decode_audio, encode_clip, slice_audio
    from pipeline.runner import run_curation

    if not REAL_DIR.exists():
        pytest.skip(f"{REAL_DIR} is absent")
    seconds, n_mix = 3.0, 13
    parts = []
    for name in ("wda_aoc_000.mp4", "edtalk_obama.mp4", "retalking_face2.mp4"):
        frames = square_segment(REAL_DIR / name, 0.0, seconds)
        audio, t0 = decode_audio(str(REAL_DIR / name))
        parts.append((frames, slice_audio(audio, t0, 16000, 0.0, len(frames) / SHOT_FPS)))
    (a, sa), (b, sb), (c, sc) = parts
    ab, (cut, _) = join_hard(a, b)
    abc, (mix_first, mix_last) = join_dissolve(ab, c, n_mix)
    audio = np.concatenate([sa, sb[: int((len(b) - n_mix) / SHOT_FPS * 16000)], sc])
    src = tmp_path / "in" / "joined.mp4"
    src.parent.mkdir()
    src.write_bytes(encode_clip(abc, audio, fps=SHOT_FPS))
    out = tmp_path / "out"
    run_curation(expand_inputs([str(src.parent)]), out, load_config(None, **{"features.enabled": False}),
                 progress_every_s=60)
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    spans = [(r["start_s"], r["start_s"] + r["duration_s"]) for r in scores]
    t_cut, t_mix0, t_mix1 = cut / SHOT_FPS, mix_first / SHOT_FPS, mix_last / SHOT_FPS
    assert len(spans) >= 3, scores
    for s, e in spans:
        assert e <= t_cut + 1e-3 or s >= t_cut - 1e-3, f"clip {s:.2f}-{e:.2f} s crosses the cut at {t_cut:.2f} s"
        assert e <= t_mix1 + 1e-3 or s >= t_mix0 - 1e-3, f"clip {s:.2f}-{e:.2f} s crosses the dissolve"
    assert any(e <= t_cut + 1e-3 for s, e in spans)
    assert any(s >= t_cut - 1e-3 and e <= t_mix1 + 1e-3 for s, e in spans)
    assert any(s >= t_mix0 - 1e-3 for s, e in spans)
