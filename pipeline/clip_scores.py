"""Per-clip scores, measured on the 512x512 25 fps frames while the crop stage writes them.

For every output frame the face model runs on the crop (face box + landmarks of the face
nearest the crop centre, number of faces), and the SyncNet input crop is cut around the face
box of the profile's detector (joonson/syncnet_python ``crop_video`` geometry,
``pipeline.scoring.syncnet``): SCRFD in ``full`` (WIDER FACE boxes, as syncnet_python's S3FD),
BlazeFace in ``smoke``. In ``full`` the same SCRFD box feeds insightface 1k3d68, as insightface's
``FaceAnalysis`` does. On a few evenly spaced frames the face is aligned on its 5 keypoints (SCRFD's in
``full``, FaceMesh's in ``smoke``) and embedded by ArcFace (``identity``; docs/identity.md).
When the clip is complete, ``finish`` turns the series into the scores of
``schemas.SCORES_SCHEMA``:
lip sync, speech, mouth activity, head pose, head movement and completeness (completeness in
*source* pixels against the shot's active picture, since a head cut off by the source frame or
by a letterbox bar burned into it is what it detects). Definitions and their sources:
docs/scoring.md.
"""
from __future__ import annotations

import math

import numpy as np

from .scoring import fingerprint as fingerprints
from .scoring import motion as motion_scores
from .scoring import pose as pose_scores
from .scoring import quality as quality_scores
from .scoring import speech as speech_scores
from .scoring import syncnet as sync
from .segment import CandidateClip

SMOKE_SYNC_WEIGHTS = "smoke-random"


def load_syncnet(profile: str, model_dir: str | None, model_file: str = "syncnet_v2.model"):
    """The published SyncNet v2 weights in ``full``; a tiny random SyncNet in ``smoke``."""
    if profile == "smoke":
        model = sync.SyncNet.tiny(seed=0)
        return model.eval(), SMOKE_SYNC_WEIGHTS
    from pathlib import Path

    if not model_dir:
        raise FileNotFoundError("the full profile needs a model directory holding "
                                f"{model_file} (python jobs/fetch_models.py --profile full --dir MODELS)")
    path = Path(model_dir) / model_file
    if not path.exists():
        raise FileNotFoundError(f"SyncNet weights not found: {path} "
                                "(python jobs/fetch_models.py --profile full --dir MODELS)")
    model = sync.SyncNet.from_state_dict_file(path)
    import torch

    if torch.cuda.is_available():  # the actor was given a GPU (score.num_gpus): Ray sets CUDA_VISIBLE_DEVICES
        model = model.cuda()
    return model.eval(), model.model_id


# syncnet_python run_pipeline.py crop_video: box centres and sizes are median-filtered over 13
# frames before the crops are cut; a frame's crop waits until the 6 frames after it are seen.
SYNC_BOX_MEDIAN = 13


class ClipObserver:
    """Collects the per-frame observations of one clip (a few MB per clip once finished)."""

    def __init__(self, clip: CandidateClip, detector, sync_size: int, fps: int = 25, size: int = 512,
                 landmarks3d=None, box_detector=None, identity=None, identity_frames: int = 5,
                 iqa_model=None, landmarks_every: int = 1):
        self.clip, self.detector, self.sync_size, self.fps, self.size = clip, detector, sync_size, fps, size
        # full profile: insightface 1k3d68 68x3 landmarks give the head pose (its 3-D fit);
        # FaceMesh's dense landmarks still give mouth opening, movement and completeness.
        self.landmarks3d = landmarks3d
        # the profile's detector (SCRFD in full) boxes the face for SyncNet and 1k3d68; None = the
        # landmark model's own box (BlazeFace in smoke)
        self.box_detector = box_detector
        # ArcFace (pipeline/faces/arcface.py): aligned 112x112 crops of up to `identity_frames` evenly spaced
        # frames; a frame without keypoints hands its turn to the next frame that has them
        self.identity = identity
        n = max(int(clip.n_frames), 1)
        self._id_targets = sorted(set(np.linspace(0, n - 1, min(int(identity_frames), n)).round().astype(int).tolist()))
        self._id_crops: list[np.ndarray] = []
        self._id_frames: list[int] = []
        self.lm68: list[np.ndarray | None] = []
        self.boxes: list[np.ndarray] = []
        self.det_boxes: list[np.ndarray] = []
        self.landmarks: list[np.ndarray | None] = []
        # score.landmarks_every: the landmark model runs on every k-th frame (and the last, and the
        # frame after one where it found nothing); frames between two landmark frames get the linear
        # interpolation of theirs in `_landmark_array` (docs/benchmarks.md, issue 13)
        self.landmarks_every = int(landmarks_every)
        if self.landmarks_every < 1:
            raise ValueError(f"landmarks_every must be >= 1, got {landmarks_every}")
        self._lm_skipped: list[bool] = []  # frame i had a face but its landmarks were not computed
        self.n_faces: list[int] = []
        self.sync_crops: list[np.ndarray] = []
        self._pending: list[tuple[int, np.ndarray]] = []  # frames waiting for their smoothed box
        # technical quality (pipeline/scoring/quality.py): face patch of the crop, source grid
        self.quality = quality_scores.QualityAccumulator(iqa_model=iqa_model)
        # near-duplicate signatures (pipeline/dedup.py): phash of a few evenly spaced frames
        self._phash_at = set(fingerprints.phash_frame_indices(clip.n_frames))
        self.phash: list[int] = []
        self.phash_mirrored: list[int] = []

    def _central_face(self, faces):
        c = self.size / 2
        return min(faces, key=lambda f: (f.center[0] - c) ** 2 + (f.center[1] - c) ** 2) if faces else None

    def observe(self, frame: np.ndarray) -> None:
        if len(self.boxes) in self._phash_at:
            h, hm = fingerprints.phash_pair(frame)
            self.phash.append(h)
            self.phash_mirrored.append(hm)
        want_landmarks = self._landmarks_due(len(self.boxes))
        faces = self.detector.detect(frame) if want_landmarks else self.detector.detect(frame, landmarks=False)
        self.quality.add_frame(frame)
        self.n_faces.append(len(faces))
        face = self._central_face(faces)
        if face is not None:
            box, lms = face.box.astype(np.float32), face.landmarks
        else:  # hold the last box so SyncNet keeps a crop; the frame counts as incomplete
            box, lms = (self.boxes[-1] if self.boxes else np.full(4, np.nan, np.float32)), None
        self.boxes.append(box)
        self.landmarks.append(lms)
        self._lm_skipped.append(face is not None and not want_landmarks)
        if face is not None:
            self.quality.add_face(frame, box)
        det_face, det_box = face, box
        if self.box_detector is not None:
            det_face = self._central_face(self.box_detector.detect(frame))
            held = self.det_boxes[-1] if self.det_boxes else np.full(4, np.nan, np.float32)
            det_box = det_face.box.astype(np.float32) if det_face is not None else held
        self.det_boxes.append(det_box)
        if self.landmarks3d is not None:
            self.lm68.append(self.landmarks3d(frame, det_box) if det_face is not None else None)
        if self.identity is not None:
            # keypoints of the profile's detector: SCRFD kps5 in full, FaceMesh 468/473/1/61/291 in smoke
            self._identity_frame(len(self.n_faces) - 1, frame, det_face)
        self._pending.append((len(self.det_boxes) - 1, frame))
        self._cut_sync_crops(final=False)

    def _landmarks_due(self, i: int) -> bool:
        """Whether frame i gets the landmark model (always, with ``landmarks_every`` = 1)."""
        k = self.landmarks_every
        if k == 1 or i % k == 0 or i >= int(self.clip.n_frames) - 1:
            return True
        # the last landmark frame found none: try again now rather than k frames later
        prev = i - 1
        if not self._lm_skipped[prev] and self.landmarks[prev] is None:
            return True
        # the identity embedding's next frame needs FaceMesh's keypoints (smoke) on that very frame
        return (self.identity is not None and self.box_detector is None and bool(self._id_targets)
                and i >= self._id_targets[0])

    def _identity_frame(self, i: int, frame: np.ndarray, face) -> None:
        if not self._id_targets or i < self._id_targets[0] or face is None or face.kps5 is None:
            return
        try:
            self._id_crops.append(self.identity.align(frame, face.kps5))
        except ValueError:  # degenerate keypoints: the next frame takes this turn
            return
        self._id_frames.append(i)
        while self._id_targets and self._id_targets[0] <= i:
            self._id_targets.pop(0)

    def _identity_scores(self) -> tuple[dict, dict]:
        """(scores fields, detail): the clip's ArcFace embedding (mean of the frames' L2-normalised embeddings,
        L2-normalised; fp16 values) or None when no sampled frame had a face with keypoints."""
        from .faces.arcface import clip_embedding

        out = {"identity_model": self.identity.name, "identity_embedding": None}
        detail = {"frames": list(self._id_frames)}
        if self._id_crops:
            emb = clip_embedding(self.identity.embed(self._id_crops)).astype(np.float16)
            out["identity_embedding"] = [float(v) for v in emb]
        return out, detail

    def observe_source(self, img: np.ndarray, rotation: int = 0, sample_aspect_ratio: str = "1:1") -> None:
        """The full-resolution source frame an output frame was cut from: blockiness on the
        source's 8x8 coding grid inside the clip's crop box (the 512 crop's resampling moves it)."""
        h, w = img.shape[:2]
        c = self.clip
        # inside the shot's active picture: a letterbox bar's edge often lies on the 8x8 grid and
        # would read as one long block edge
        region = quality_scores.source_region(w, h, c.crop_x0, c.crop_y0, c.crop_size, picture=c.active_picture)
        self.quality.add_source(img, region, quality_scores.display_grid(rotation, w, h),
                                quality_scores.grid_directions(rotation, sample_aspect_ratio))

    def _smoothed_box(self, i: int) -> np.ndarray:
        half = SYNC_BOX_MEDIAN // 2
        window = np.stack(self.det_boxes[max(0, i - half):i + half + 1])
        window = window[np.isfinite(window).all(axis=1)]
        if not len(window):
            return np.array([0, 0, self.size, self.size], np.float32)
        # centre x, centre y and side of every box, the median of each column from one sort
        centre_side = np.stack([(window[:, 0] + window[:, 2]) / 2, (window[:, 1] + window[:, 3]) / 2,
                                np.maximum(window[:, 2] - window[:, 0], window[:, 3] - window[:, 1])], axis=1)
        cx, cy, side = _column_medians(centre_side)
        half_side = side / 2
        return np.array([cx - half_side, cy - half_side, cx + half_side, cy + half_side], np.float32)

    def _cut_sync_crops(self, final: bool) -> None:
        half = SYNC_BOX_MEDIAN // 2
        while self._pending and (final or self._pending[0][0] + half < len(self.det_boxes)):
            i, frame = self._pending.pop(0)
            self.sync_crops.append(sync.syncnet_crop(frame, self._smoothed_box(i), size=self.sync_size))

    def _landmark_array(self) -> np.ndarray:
        n = next((lm.shape for lm in self.landmarks if lm is not None), (478, 3))
        out = np.full((len(self.landmarks),) + n, np.nan, np.float32)
        for i, lm in enumerate(self.landmarks):
            if lm is not None:
                out[i] = lm
        interpolate_skipped(out, np.array(self._lm_skipped, bool))
        return out

    def finish(self, audio16k: np.ndarray, syncnet, sync_weights: str, source_size: tuple[int, int],
               batch_size: int = 20, probe: dict | None = None) -> tuple[dict, dict]:
        """(scores row fields, extra detail for meta.json). Frees the per-frame buffers.
        ``probe``: the source's probe facts (bits per pixel)."""
        self._cut_sync_crops(final=True)
        try:
            out, detail = self._finish(audio16k, syncnet, sync_weights, source_size, batch_size)
            q, q_detail = self.quality.scores(probe)
            out.update({k: v for k, v in q.items() if v is not None})
            detail["quality"] = _jsonable(q_detail)
            return out, detail
        finally:
            self.sync_crops, self.landmarks, self.lm68, self._id_crops = [], [], [], []

    def _finish(self, audio16k, syncnet, sync_weights, source_size, batch_size) -> tuple[dict, dict]:
        c = self.clip
        fps = self.fps
        lms = self._landmark_array()
        boxes = np.stack(self.boxes)
        detail: dict = {}
        out: dict = {"face_size_px": c.face_size_px, "n_faces_max": int(max(c.max_faces, max(self.n_faces, default=0))),
                     "sync_weights": sync_weights}
        out["other_faces"] = out["n_faces_max"] > 1
        # speech
        sp = speech_scores.speech_scores(audio16k)
        out["speech_ratio"], out["loudness_dbfs"] = sp["speech_ratio"], sp["loudness_dbfs"]
        detail["speech"] = {k: v for k, v in sp.items() if isinstance(v, (int, float, bool))}
        # lip sync (syncnet_python definitions); needs >= 5 frames + their audio
        detail["sync_box_source"] = getattr(self.box_detector or self.detector, "name", None)
        try:
            res = sync.sync_scores(syncnet, np.stack(self.sync_crops), audio16k, batch_size=batch_size)
            out.update(sync_conf=res.conf, sync_dist=res.min_dist, sync_offset=int(res.offset),
                       sync_conf_frame_mean=res.frame_conf_mean, sync_conf_frame_p10=res.frame_conf_p10)
        except ValueError as e:
            detail["sync_error"] = str(e)
        have = np.isfinite(lms[..., :2]).all(axis=(1, 2))
        if have.sum() >= 2:
            opening = motion_scores.mouth_opening(lms[..., :2])
            ma = motion_scores.mouth_activity(opening, fps=fps)
            out["mouth_activity"] = ma["mouth_speed"]
            detail["mouth"] = ma
            if self.landmarks_every > 1:  # score.landmarks_every: how many frames had their own landmarks
                interpolated = int(np.sum(np.array(self._lm_skipped, bool) & have))
                detail["landmark_frames"] = {"every": self.landmarks_every, "interpolated": interpolated,
                                             "measured": int(have.sum()) - interpolated}
            # insightface's 68-point fit to its meanshape_68 (pipeline/scoring/pose.py) on 1k3d68's points
            # (full) or FaceMesh's mapped to iBUG-68 (smoke)
            if self.landmarks3d is not None:
                lm68 = np.stack([np.full((68, 3), np.nan, np.float32) if p is None else p for p in self.lm68])
                angles = pose_scores.pose_sequence(lm68)
                detail["pose_source"] = self.landmarks3d.name + "+meanshape_68"
            else:
                angles = pose_scores.pose_sequence(lms[..., :2])
                detail["pose_source"] = "facemesh-478>ibug68+meanshape_68"
            ps = pose_scores.pose_stats(angles, fps=fps)
            for name in ("yaw", "pitch", "roll"):
                out[f"{name}_mean"] = ps[f"{name}_mean"]
                out[f"{name}_abs_max"] = ps[f"{name}_max_abs"]
                out[f"{name}_abs_p95"] = ps[f"{name}_abs_p95"]
                out[f"{name}_range"] = ps[f"{name}_range"]
            detail["pose"] = ps
            hm = motion_scores.head_movement(boxes=np.where(have[:, None], boxes, np.nan), fps=fps)
            out["head_translation"] = hm.get("head_translation_max")
            ratio = hm.get("head_scale_ratio")
            out["head_scale_change"] = None if ratio is None else ratio - 1.0
            detail["movement"] = hm
        # completeness in source pixels against the active picture (geometry.py): crop
        # coordinates -> coordinates relative to the picture's top-left corner
        pic = c.active_picture or [0.0, 0.0, float(source_size[0]), float(source_size[1])]
        k = c.crop_size / self.size
        ox, oy = c.crop_x0 - pic[0], c.crop_y0 - pic[1]
        src_boxes = boxes * k + np.array([ox, oy, ox, oy], np.float32)
        src_boxes[~have] = np.nan
        src_lms = lms[..., :2] * k + np.array([ox, oy], np.float32)
        comp = motion_scores.completeness(src_boxes, (pic[2] - pic[0], pic[3] - pic[1]), landmarks=src_lms)
        out["complete_frac"] = comp["complete_fraction"]
        comp["active_picture"] = [float(v) for v in pic]
        detail["completeness"] = comp
        out["pad_frac"] = float(c.pad_frac)
        if self.identity is not None:
            id_scores, detail["identity"] = self._identity_scores()
            out.update(id_scores)
        out["phash"], out["phash_mirrored"] = list(self.phash), list(self.phash_mirrored)
        out["audio_fingerprint"] = fingerprints.encode_fingerprint(fingerprints.subfingerprints(audio16k))
        for key, v in list(out.items()):
            if isinstance(v, float) and math.isnan(v):
                out[key] = None
        return out, _jsonable(detail)


def _column_medians(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=0)`` of a few finite rows, bit for bit (the middle value, or the two
    middle values' sum halved in the array's dtype, as numpy's mean of two computes it), without
    np.median's per-call overhead: SyncNet's box smoothing takes three medians on every frame."""
    ordered = np.sort(values, axis=0)
    n = len(ordered)
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / ordered.dtype.type(2)


def interpolate_skipped(lms: np.ndarray, skipped: np.ndarray) -> None:
    """In place: each run of skipped frames between two frames with landmarks gets their linear
    interpolation in the frame index; a run without landmarks on both sides stays NaN."""
    have = np.isfinite(lms).all(axis=tuple(range(1, lms.ndim)))
    i, n = 0, len(lms)
    while i < n:
        if not skipped[i]:
            i += 1
            continue
        j = i
        while j < n and skipped[j]:
            j += 1
        a, b = i - 1, j  # the landmark frames around the run i..j-1
        if a >= 0 and b < n and have[a] and have[b]:
            t = ((np.arange(i, j) - a) / (b - a)).astype(np.float32).reshape((-1,) + (1,) * (lms.ndim - 1))
            lms[i:j] = lms[a] + (lms[b] - lms[a]) * t
        i = j


class ObserverThread:
    """The clips' per-frame observations (``ClipObserver.observe`` / ``observe_source``) in one
    worker thread, in the order they were submitted, while the caller decodes, crops and encodes
    the next frames: MediaPipe, OpenCV and NumPy release the GIL for most of their work, so the
    scoring stage uses a second core (docs/benchmarks.md, issue 13). At most ``depth`` frames wait,
    so memory stays bounded. An exception of an observation is raised again by the next
    ``submit`` or ``drain``."""

    def __init__(self, depth: int = 4):
        import queue
        import threading

        self._queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="clip observers", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    fn, args = item
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, fn, *args) -> None:
        self._raise()
        self._queue.put((fn, args))

    def drain(self) -> None:
        """Wait until every submitted observation is done (before a clip's ``finish``)."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.ndarray):
        return None  # series stay out of meta.json
    return obj


def select_speakers(clips_scores: dict[int, dict], clips: dict[int, CandidateClip]) -> dict[int, int]:
    """Clips that lose the speaking-face choice -> the clip index that won.

    Clips of different face tracks that overlap in time show several people at once; the one
    speaking is the track with the highest sync confidence (real SyncNet) or, with smoke
    weights, the highest mouth activity. The others are rejected, and the winner is flagged
    ``other_faces``.
    """
    losers: dict[int, int] = {}
    order = sorted(clips_scores)

    def strength(i):
        s = clips_scores[i]
        real = s.get("sync_weights") not in (None, SMOKE_SYNC_WEIGHTS)
        v = s.get("sync_conf") if real else s.get("mouth_activity")
        return -math.inf if v is None else v

    for i in order:
        for j in order:
            if i >= j or clips[i].track_id == clips[j].track_id:
                continue
            overlap = min(clips[i].end_s, clips[j].end_s) - max(clips[i].start_s, clips[j].start_s)
            if overlap <= 0:
                continue
            win, lose = (i, j) if strength(i) >= strength(j) else (j, i)
            losers[lose] = win
            clips_scores[win]["other_faces"] = True
    return losers
