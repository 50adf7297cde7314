"""Speech / loudness / silence and motion scores: synthetic checks of every definition,
and the real clips in ../shared/data/real (skipped when that directory is absent)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.scoring import motion, pose, speech

REAL = Path(os.environ.get("REAL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
SPEECH_CLIPS = ["wda_aoc_000.mp4", "edtalk_obama.mp4", "retalking_face2.mp4"]


def real(name: str) -> Path:
    p = REAL / name
    if not p.exists():
        pytest.skip(f"real clip {p} is absent")
    return p


def decode_frames(path: Path, n: int) -> list[np.ndarray]:
    import av

    out = []
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def face_mesh():
    mp = pytest.importorskip("mediapipe")

    def run(images, static=True):
        """[T, 478, 2] pixel landmarks of the first face (NaN where none was found)."""
        out = []
        with mp.solutions.face_mesh.FaceMesh(static_image_mode=static, max_num_faces=1,
                                             refine_landmarks=True) as fm:
            for im in images:
                h, w = im.shape[:2]
                r = fm.process(np.ascontiguousarray(im))
                if r.multi_face_landmarks:
                    out.append([(p.x * w, p.y * h) for p in r.multi_face_landmarks[0].landmark])
                else:
                    out.append(np.full((478, 2), np.nan))
        return np.asarray(out, np.float64)

    return run


# ================================================================ speech


def test_loudness_and_digital_silence():
    sr = 16000
    t = np.arange(sr) / sr
    sine = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    assert speech.loudness_dbfs(sine) == pytest.approx(-3.01, abs=0.02)
    assert speech.peak_dbfs(sine) == pytest.approx(0.0, abs=0.01)
    assert speech.loudness_dbfs(0.1 * sine) == pytest.approx(-23.01, abs=0.02)
    zeros = np.zeros(sr, np.float32)
    assert speech.is_digital_silence(zeros) and speech.is_digital_silence(np.zeros(0))
    assert speech.loudness_dbfs(zeros) == speech.FLOOR_DBFS
    assert not speech.is_digital_silence(0.001 * sine)
    half = np.concatenate([zeros[: sr // 2], sine[: sr // 2]])
    assert speech.silent_fraction(half) == pytest.approx(0.5, abs=0.02)
    s = speech.speech_scores(zeros)
    assert s["speech_ratio"] == 0 and s["digital_silence"] and s["silent_fraction"] == 1


def test_steady_tone_and_noise_are_not_speech():
    rng = np.random.default_rng(0)
    sr = 16000
    t = np.arange(3 * sr) / sr
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220, 277, 330, 440)) * 0.1
    noise = rng.standard_normal(3 * sr) * 0.05
    for x in (chord, noise, chord + noise):
        assert speech.voice_activity(x).speech_ratio < 0.1


@pytest.mark.realdata
def test_no_audio_stream_decodes_empty():
    a = speech.load_audio(real("edtalk_mouth_source_noaudio.mp4"))
    assert a.size == 0
    s = speech.speech_scores(a)
    assert s["digital_silence"] and s["speech_ratio"] == 0 and s["duration_s"] == 0


@pytest.mark.realdata
def test_real_clips_speech_silence_music():
    ratios = {}
    for name in SPEECH_CLIPS + ["edtalk_mouth_source.wav"]:
        a = speech.load_audio(real(name))
        s = speech.speech_scores(a)
        ratios[name] = s["speech_ratio"]
        assert not s["digital_silence"] and -35 < s["loudness_dbfs"] < -15, (name, s)
        assert s["speech_ratio"] > 0.5, (name, s)
    silent = speech.speech_scores(speech.load_audio(real("liveportrait_d18_silent.mp4")))
    assert silent["digital_silence"] and silent["speech_ratio"] == 0 and silent["duration_s"] > 5
    music = speech.speech_scores(speech.load_audio(real("liveportrait_s18_music_static.mp4")))
    assert not music["digital_silence"] and music["loudness_dbfs"] > -25  # loud, but not speech
    assert music["speech_ratio"] < 0.1
    assert min(ratios.values()) > music["speech_ratio"] + 0.4


@pytest.mark.realdata
def test_load_audio_resamples_to_16k_mono():
    a = speech.load_audio(real("edtalk_obama.mp4"))  # 48 kHz stereo AAC, 20 s
    assert a.dtype == np.float32 and a.ndim == 1
    assert len(a) / 16000 == pytest.approx(20.0, abs=0.1)
    part = speech.load_audio(real("edtalk_obama.mp4"), start_s=1.0, duration_s=2.0)
    assert len(part) == 32000 and np.array_equal(part, a[16000:48000])


# Head pose: tests/test_pose.py


# ================================================================ motion


def _face68(gap: float, dx: float = 0.0) -> np.ndarray:
    lm = np.full((68, 2), np.nan)
    lm[36], lm[45] = (100 + dx, 100), (160 + dx, 100)  # eye outer corners: IOD 60
    lm[48], lm[54] = (110 + dx, 160), (150 + dx, 160)  # mouth corners: 60 below the eyes
    lm[62], lm[66] = (130 + dx, 158), (130 + dx, 158 + gap)
    lm[30] = (130 + dx, 130)
    return lm


def test_mouth_opening_and_activity():
    assert motion.face_size(_face68(0))[0] == pytest.approx(60)
    gaps = 6 + 6 * np.sin(np.arange(50) / 3)
    seq = np.stack([_face68(g) for g in gaps])
    o = motion.mouth_opening(seq)
    np.testing.assert_allclose(o, gaps / 60)
    a = motion.mouth_activity(o, fps=25)
    assert a["mouth_open_std"] == pytest.approx(np.std(gaps / 60))
    assert a["mouth_speed"] == pytest.approx(np.abs(np.diff(gaps / 60)).mean() * 25)
    still = motion.mouth_activity(motion.mouth_opening(np.stack([_face68(0)] * 10)))
    assert still["mouth_open_std"] == 0 and still["mouth_speed"] == 0


def test_head_movement():
    T = 26
    static = np.tile([100.0, 100, 200, 200], (T, 1))
    m = motion.head_movement(boxes=static)
    assert m["head_translation_max"] == 0 and m["head_speed"] == 0 and m["head_scale_ratio"] == 1
    moving = static + np.arange(T)[:, None] * [4.0, 0, 4, 0]  # 4 px / frame, face size 100
    m = motion.head_movement(boxes=moving, fps=25)
    assert m["head_speed"] == pytest.approx(1.0)  # 0.04 face sizes per frame x 25 fps
    assert m["head_translation_range"] == pytest.approx(1.0) and m["head_translation_max"] == pytest.approx(0.5)
    growing = static + np.arange(T)[:, None] * [-1.0, -1, 1, 1]
    assert motion.head_movement(boxes=growing)["head_scale_ratio"] == pytest.approx(150 / 100)
    # landmarks only (points a model did not give are NaN and ignored): 2 px / frame, face size 60
    lm = np.stack([_face68(5, dx=2.0 * t) for t in range(T)])
    m = motion.head_movement(landmarks=lm, image_size=(640, 480))
    assert m["head_speed"] == pytest.approx(2.0 / 60 * 25)
    assert m["movement_score_25fps"] == pytest.approx(100 - 100 * 2.0 / 480)  # TalkVid's formula: / min(W, H)


def test_completeness():
    w, h = 640, 480
    boxes = np.tile([270.0, 190, 370, 290], (10, 1))  # 100 px face in the middle
    boxes[7:] += [300, 0, 300, 0]  # last 3 frames: box runs past the right edge
    c = motion.completeness(boxes, (w, h))
    assert c["complete_fraction"] == pytest.approx(0.7)
    assert c["head_inside_min"] < 1
    boxes[7:] -= [300, 0, 300, 0]
    lm = np.stack([_face68(5, dx=200)] * 10)
    lm[2, 30] = (-5, 130)  # the nose tip of frame 2 is out of the image
    c = motion.completeness(boxes, (w, h), landmarks=lm)
    assert c["complete_fraction"] == pytest.approx(0.9)
    assert c["talkvid_completeness_min"] == pytest.approx(60) and c["talkvid_completeness"] == pytest.approx(96)
    assert motion.complete_frames(boxes, (w, h), landmarks=lm).tolist() == [True] * 2 + [False] + [True] * 7


@pytest.mark.realdata
def test_real_mouth_activity_speaking_vs_static(face_mesh):
    speeds = {}
    for name in ("wda_aoc_000.mp4", "liveportrait_s18_music_static.mp4"):
        frames = decode_frames(real(name), 40)
        lm = face_mesh(frames, static=False)
        h, w = frames[0].shape[:2]
        speeds[name] = motion.mouth_activity(motion.mouth_opening(lm))["mouth_speed"]
        boxes = np.concatenate([lm.min(1), lm.max(1)], 1)
        assert motion.completeness(boxes, (w, h), landmarks=lm)["talkvid_completeness"] == 100
        hm = motion.head_movement(boxes=boxes, landmarks=lm, image_size=(w, h))
        assert hm["head_translation_max"] < 0.3 and hm["movement_score_25fps"] > 95
        angles = pose.pose_sequence(lm)
        assert pose.pose_stats(angles)["orientation_score_25fps_mean"] > 85  # near-frontal talking heads
    assert speeds["wda_aoc_000.mp4"] > 0.3 > 0.05 > speeds["liveportrait_s18_music_static.mp4"]


def test_facemesh_crop_is_black_outside_the_frame_and_keeps_the_face_centred():
    """The crop FaceMesh sees (pipeline/faces/mediapipe_backend.padded_crop) equals cropping the
    frame zero-padded on every side, for boxes inside, across and wholly outside the frame."""
    from pipeline.faces.mediapipe_backend import padded_crop

    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (90, 160, 3), dtype=np.uint8)  # no black pixel of its own
    pad = 400
    reference = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    boxes = [(10, 5, 60, 55), (-30, -20, 40, 50), (130, 60, 200, 130), (-50, -50, 250, 250), (170, 10, 220, 60)]
    boxes += [tuple(int(v) for v in (x, y, x + s, y + s))
              for x, y, s in zip(rng.integers(-200, 200, 200), rng.integers(-150, 150, 200), rng.integers(1, 300, 200))]
    for x0, y0, x1, y1 in boxes:
        crop = padded_crop(image, x0, y0, x1, y1)
        assert crop.shape == (y1 - y0, x1 - x0, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, reference[y0 + pad:y1 + pad, x0 + pad:x1 + pad])
    corner = padded_crop(image, -30, -20, 40, 50)
    assert not corner[:20].any() and not corner[:, :30].any() and corner[20:, 30:].all()


# the extreme floats (+-3.4e38) times the frame size overflow float32 to +-inf on both sides, on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_landmark_pixels_equal_the_per_point_conversion():
    """mediapipe_backend.landmark_pixels (read from the wire bytes) gives bit for bit the float32 points
    the per-point expressions gave, for random, signed-zero and extreme floats, with and without an
    offset, and falls back to reading point by point when visibility or presence is set."""
    pytest.importorskip("mediapipe")
    from mediapipe.framework.formats import landmark_pb2

    from pipeline.faces.mediapipe_backend import landmark_pixels

    def per_point(lm_list, w, h, x0=None, y0=None):
        if x0 is None:
            return np.array([[p.x * w, p.y * h, p.z * w] for p in lm_list.landmark], dtype=np.float32)
        return np.array([[p.x * w + x0, p.y * h + y0, p.z * w] for p in lm_list.landmark], dtype=np.float32)

    rng = np.random.default_rng(5)
    for trial in range(30):
        values = rng.normal(0.5, 0.3, (478, 3)).astype(np.float32)
        values[rng.integers(0, 478, 10), rng.integers(0, 3, 10)] = rng.choice(
            np.array([0.0, -0.0, 1e-40, -3.4e38, 3.4e38, 1.0], np.float32), 10)
        lm_list = landmark_pb2.NormalizedLandmarkList()
        for x, y, z in values:
            p = lm_list.landmark.add()
            p.x, p.y, p.z = float(x), float(y), float(z)
        if trial % 4 == 3:  # another layout on the wire: read point by point
            lm_list.landmark[int(rng.integers(0, 478))].visibility = 0.5
            lm_list.landmark[int(rng.integers(0, 478))].presence = 0.25
        w, h = (int(v) for v in rng.integers(16, 2000, 2))
        x0, y0 = (int(v) for v in rng.integers(-500, 500, 2))
        for args in ((w, h), (w, h, x0, y0)):
            got, want = landmark_pixels(lm_list, *args), per_point(lm_list, *args)
            assert got.dtype == np.float32 and got.shape == (478, 3)
            assert got.tobytes() == want.tobytes()  # bit for bit, signed zeros included


def test_facemesh_landmarks_equal_the_per_point_conversion_on_a_real_face():
    """On FaceMesh's own output for real frames the detector's landmarks are the per-point conversion."""
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector, padded_crop

    detector = MediaPipeFaceDetector(landmarks=True, ranges="short")
    for frame in decode_frames(real("wda_aoc_000.mp4"), 3):
        face = detector.detect(frame)[0]
        cx, cy = face.center
        side = max(face.width, face.height) * detector.crop_expand
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        x1, y1 = int(round(cx + side / 2)), int(round(cy + side / 2))
        crop = padded_crop(np.ascontiguousarray(frame), x0, y0, x1, y1)
        lm = detector._mesh.process(crop).multi_face_landmarks[0].landmark
        ch, cw = crop.shape[:2]
        want = np.array([[p.x * cw + x0, p.y * ch + y0, p.z * cw] for p in lm], dtype=np.float32)
        assert face.landmarks.tobytes() == want.tobytes()


def test_sync_box_smoothing_equals_three_medians():
    """ClipObserver._smoothed_box (one sort for the three medians) gives bit for bit the box of three
    np.median calls (main ee385b8), for windows of every length with and without held NaN boxes."""
    from pipeline.clip_scores import ClipObserver, _column_medians

    def three_medians(det_boxes, i, size=512, half=6):
        window = np.stack(det_boxes[max(0, i - half):i + half + 1])
        window = window[np.isfinite(window).all(axis=1)]
        if not len(window):
            return np.array([0, 0, size, size], np.float32)
        cx = np.median((window[:, 0] + window[:, 2]) / 2)
        cy = np.median((window[:, 1] + window[:, 3]) / 2)
        half_side = np.median(np.maximum(window[:, 2] - window[:, 0], window[:, 3] - window[:, 1])) / 2
        return np.array([cx - half_side, cy - half_side, cx + half_side, cy + half_side], np.float32)

    observer = ClipObserver.__new__(ClipObserver)  # only det_boxes and size are read
    observer.size = 512
    rng = np.random.default_rng(11)
    for _ in range(2000):
        n = int(rng.integers(1, 30))
        boxes = [(rng.random(4) * [300, 300, 200, 200] + [0, 0, 300, 300]).astype(np.float32) for _ in range(n)]
        for k in rng.integers(0, n, int(rng.integers(0, 5))):
            boxes[k] = np.full(4, np.nan, np.float32)
        observer.det_boxes = boxes
        i = int(rng.integers(0, n))
        assert observer._smoothed_box(i).tobytes() == three_medians(boxes, i).tobytes()
        values = rng.normal(100, 50, (n, 3)).astype(np.float32)
        assert _column_medians(values).tobytes() == np.median(values, axis=0).tobytes()


def test_observer_thread_keeps_frame_order_and_hands_errors_back():
    """The crop stage's per-frame scoring thread (clip_scores.ObserverThread): every observation
    runs, in the order submitted, before ``drain`` returns; an observation's exception is raised
    in the caller's thread, and the thread still ends on ``close``."""
    from pipeline.clip_scores import ObserverThread

    seen: list[int] = []
    worker = ObserverThread(depth=2)
    for i in range(50):
        worker.submit(seen.append, i)
    worker.drain()
    assert seen == list(range(50))

    def fail(i):
        raise ValueError(f"frame {i} is broken")

    worker.submit(fail, 7)
    with pytest.raises(ValueError, match="frame 7 is broken"):
        worker.drain()
    worker.submit(seen.append, 50)  # usable again once the error was handed back
    worker.drain()
    assert seen[-1] == 50
    worker.close()
    assert not worker._thread.is_alive()


# ================================================================ landmark rate (score.landmarks_every / landmarks_on_box)


def test_skipped_landmarks_are_the_linear_interpolation_of_their_neighbours():
    from pipeline.clip_scores import interpolate_skipped

    rng = np.random.default_rng(1)
    lms = rng.normal(0, 50, (12, 478, 3)).astype(np.float32)
    skipped = np.zeros(12, bool)
    skipped[[1, 2, 4, 8, 11]] = True
    lms[skipped] = np.nan
    lms[7] = np.nan  # a landmark frame where FaceMesh found nothing
    expected = lms.copy()
    expected[1] = lms[0] + (lms[3] - lms[0]) / 3
    expected[2] = lms[0] + (lms[3] - lms[0]) * 2 / 3
    expected[4] = (lms[3] + lms[5]) / 2
    # 8: its left neighbour has no landmarks; 11: no right neighbour: both stay NaN
    interpolate_skipped(lms, skipped)
    np.testing.assert_allclose(lms, expected, rtol=1e-6, atol=1e-4)
    assert np.isnan(lms[[7, 8, 11]]).all()


class _RecordingDetector:
    """The real MediaPipe detector, recording on which frames the landmark model ran."""

    def __init__(self, detector):
        self.detector, self.name, self.calls = detector, detector.name, []

    def detect(self, image, landmarks=True):
        self.calls.append(landmarks)
        return self.detector.detect(image, landmarks=landmarks)


def _observe(frames, detector, every, identity=None, identity_frames=5):
    from pipeline.clip_scores import ClipObserver
    from pipeline.segment import CandidateClip

    clip = CandidateClip(clip_index=0, track_id=0, shot_index=0, start_s=0.0, n_frames=len(frames), crop_x0=0.0,
                         crop_y0=0.0, crop_size=512.0, crop_scale=1.0, face_size_px=200.0, padded=False,
                         max_faces=1)
    obs = ClipObserver(clip, detector, 224, identity=identity, identity_frames=identity_frames, landmarks_every=every)
    for f in frames:
        obs.observe(f)
    return obs


@pytest.mark.realdata
def test_landmarks_every_k_runs_facemesh_on_the_expected_frames_and_interpolates_between():
    """score.landmarks_every = 3 on 11 crop-stage frames: FaceMesh on frames 0, 3, 6, 9, the last (10) and the
    identity embedding's frame 5 (identity_frames=3: 0, 5, 10), BlazeFace on all; the landmarks of the
    frames between are the linear interpolation of the landmark frames'; every = 1 is FaceMesh on every frame."""
    from pipeline.faces.arcface import ArcFace
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector

    frames = decode_frames(real("wda_aoc_000.mp4"), 11)  # 512 x 512 like the crop stage's frames
    mp_detector = MediaPipeFaceDetector(landmarks=True, ranges="short")
    reference = [mp_detector.detect(f)[0] for f in frames]
    every1 = _observe(frames, _RecordingDetector(mp_detector), 1, ArcFace.smoke(), 3)
    assert every1.detector.calls == [True] * 11
    for face, lm, box in zip(reference, every1.landmarks, every1.boxes):
        np.testing.assert_array_equal(lm, face.landmarks)
        np.testing.assert_array_equal(box, face.box)

    every3 = _observe(frames, _RecordingDetector(mp_detector), 3, ArcFace.smoke(), 3)
    ran = [i for i, c in enumerate(every3.detector.calls) if c]
    assert ran == [0, 3, 5, 6, 9, 10]
    np.testing.assert_array_equal(np.stack(every3.boxes), np.stack(every1.boxes))
    assert every3._id_frames == every1._id_frames == [0, 5, 10]
    lms = every3._landmark_array()
    for i in ran:
        np.testing.assert_array_equal(lms[i], reference[i].landmarks)
    for a, b in zip(ran, ran[1:]):
        for i in range(a + 1, b):
            expected = reference[a].landmarks + (reference[b].landmarks - reference[a].landmarks) * ((i - a) / (b - a))
            np.testing.assert_allclose(lms[i], expected, atol=1e-3)
    # the interpolation stays near what FaceMesh gives on these frames (a talking head at 25 fps)
    assert np.abs(lms[..., :2] - np.stack([f.landmarks for f in reference])[..., :2]).mean() < 2.0
    scores, detail = every3.finish(np.zeros(16000, np.float32), *_smoke_syncnet(), (512, 512))
    assert detail["landmark_frames"] == {"every": 3, "measured": 6, "interpolated": 5}
    assert "landmark_frames" not in every1.finish(np.zeros(16000, np.float32), *_smoke_syncnet(), (512, 512))[1]
    assert scores["mouth_activity"] is not None


def _smoke_syncnet():
    from pipeline.clip_scores import load_syncnet

    return load_syncnet("smoke", None)


@pytest.mark.realdata
def test_landmarks_on_box_are_close_to_the_facemesh_solution():
    """score.landmarks_on_box: the landmark model on BlazeFace's region (no second detection) gives the same
    478 points within a pixel or two of the FaceMesh solution on its crop, and the same kps5 layout."""
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector

    frames = decode_frames(real("wda_aoc_000.mp4"), 5)
    solution = MediaPipeFaceDetector(landmarks=True, ranges="short")
    on_box = MediaPipeFaceDetector(landmarks=True, ranges="short", landmarks_on_box=True)
    assert on_box.name != solution.name
    for f in frames:
        a, b = solution.detect(f)[0], on_box.detect(f)[0]
        np.testing.assert_array_equal(a.box, b.box)
        assert b.landmarks.shape == (478, 3) and b.kps5.shape == (5, 2)
        np.testing.assert_array_equal(b.kps5, b.landmarks[[468, 473, 1, 61, 291], :2])
        assert np.abs(a.landmarks[:, :2] - b.landmarks[:, :2]).mean() < 2.0
    assert on_box.detect(frames[0], landmarks=False)[0].landmarks is None
