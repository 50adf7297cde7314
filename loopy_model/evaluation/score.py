"""Score one video with the curation pipeline's own scorers (one code path, imported).

A video is normalised exactly as the crop & score stage normalises a candidate clip
(``pipeline.crop.crop_and_normalize``: 512x512, 25 fps by "the source frame on screen at
t = start + j/25", 16 kHz mono audio cut from the same source timeline), and every output
frame goes to the same ``pipeline.clip_scores.ClipObserver`` the curation job uses: FaceMesh
on the 512 frame, the face nearest the centre, the syncnet_python crop around the
13-frame-median box, then SyncNet (Sync-C / Sync-D / offset), speech, mouth activity, head
pose, head movement and completeness. The face keypoints are DWPose's
(``pipeline.features.dwpose``) and the Loopy 3.5 head-motion / expression variances are
``pipeline.features.motion.motion_variances`` over 12-frame windows, averaged as the feature
stage averages them (``head_motion_var_mean``, ``expression_var_mean``).

Which square of the source becomes the 512 frame (``crop``):
  * ``frame``: the largest centred square of the frame. A generated video *is* the crop, so
    its pixels are scored as they are (a 512x512 25 fps input is decoded frame for frame).
  * ``face``: the curation job's detect & track + segment stages choose the crop (face box x
    ``segment.crop_scale``), and the longest candidate clip is scored: for raw footage, e.g.
    ground-truth videos, scored as the curation job would have cut them.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.clip_scores import ClipObserver, load_syncnet
from pipeline.config import CurateConfig, load_config
from pipeline.crop import crop_and_normalize
from pipeline.features.dwpose import DWPoseFace
from pipeline.features.motion import motion_variances
from pipeline.filters import evaluate as failed_rules
from pipeline.media import MediaError, decode_audio, n_output_frames, probe, slice_audio
from pipeline.segment import CandidateClip, crop_box

FPS, SIZE, AUDIO_RATE = 25, 512, 16000
CROP_MODES = ("frame", "face")


class EvalInputError(ValueError):
    """An input that cannot be scored; ``reason`` is a short stable label (the table's ``error``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class EvalConfig:
    profile: str = "smoke"
    model_dir: str | None = None
    crop: str = "frame"
    syncnet_weights: str | None = None  # a SyncNet state dict (syncnet_v2.model layout) overriding the profile's
    fid_weights: str | None = None
    fvd_weights: str | None = None
    reference: str | None = None  # an eval dir (fid_stats.npz / fvd_stats.npz) or a pytorch-fid .npz (mu, sigma)
    fid_stride: int = 1  # every n-th 25 fps frame goes into the FID statistics
    device: str = "auto"
    batch_size: int = 16
    curate: CurateConfig = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.fid_stride < 1:
            raise ValueError(f"fid_stride must be >= 1, got {self.fid_stride}")
        if self.curate is None:
            # The curation defaults (thresholds, crop scale, detector) with the evaluation's models;
            # a generated clip may be short or silent, so probe does not reject those here.
            self.curate = load_config(None, profile=self.profile, model_dir=self.model_dir,
                                      **{"probe.require_audio": False, "probe.min_duration_s": 0.2,
                                         "features.enabled": False})


class KeypointSink:
    """DWPose face keypoints of the 512 frames, run in batches as the frames stream by."""

    def __init__(self, dwpose: DWPoseFace, batch: int):
        self.dwpose, self.batch = dwpose, max(1, batch)
        self.buf: list[np.ndarray] = []
        self.kps: list[np.ndarray] = []

    def __call__(self, frame: np.ndarray) -> None:
        self.buf.append(frame)
        if len(self.buf) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.kps.append(self.dwpose(np.stack(self.buf)))
            self.buf = []

    def result(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.kps) if self.kps else np.zeros((0, 68, 3), np.float32)


@dataclass
class Observed:
    uri: str
    probe: object
    clip: CandidateClip
    observer: ClipObserver
    kps: KeypointSink
    sinks: list
    audio: np.ndarray
    have_audio: bool
    notes: list
    extra: dict
    t0: float


class Scorer:
    """Loads every model once; ``score(path)`` -> one row of ``EVAL_SCHEMA`` (or raises EvalInputError)."""

    def __init__(self, cfg: EvalConfig, frame_sinks_factory=None):
        from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector
        from pipeline.features.extractor import resolve_device

        self.cfg = cfg
        cc = cfg.curate
        # The crop & score stage's own models (pipeline/stages.py CropScoreStage.__init__).
        self.face_model = MediaPipeFaceDetector(min_confidence=cc.detect.min_confidence, landmarks=True,
                                                ranges="short")
        if cfg.syncnet_weights:
            self.syncnet, self.sync_weights = load_syncnet_file(cfg.syncnet_weights)
        else:
            self.syncnet, self.sync_weights = load_syncnet(cc.profile, cc.model_dir, cc.score.syncnet_model)
        self.landmarks3d = None
        if cc.profile == "full":
            from pipeline.faces.landmarks3d import Landmarks3D

            self.landmarks3d = Landmarks3D.from_model_dir(cc.model_dir, cc.score.landmarks3d_model)
        self.box_detector = None  # SyncNet / 1k3d68 boxes from the profile's detector, as CropScoreStage
        if cc.detector_backend != "mediapipe":
            from pipeline.faces import make_detector

            self.box_detector = make_detector(cc)
        device = resolve_device(cfg.device)
        self.dwpose = DWPoseFace.load(cc.profile, cc.model_dir, device=str(device), batch_size=cfg.batch_size)
        self._detect = None  # detect & track stage, built on the first --crop face video
        self.frame_sinks_factory = frame_sinks_factory
        self.models = {"face": self.face_model.name, "syncnet": self.sync_weights, "keypoints": self.dwpose.model_id,
                       "pose": (self.landmarks3d.name if self.landmarks3d is not None else "facemesh-478>ibug68")
                       + "+meanshape_68"}

    # -- crops ---------------------------------------------------------------------------
    def _frame_clip(self, p) -> CandidateClip:
        side = float(min(p.width, p.height))
        end = p.video_start_s + (p.video_duration_s or p.duration_s)
        n = n_output_frames(end - p.video_start_s, FPS)
        return CandidateClip(clip_index=0, track_id=0, shot_index=0, start_s=float(p.video_start_s), n_frames=n,
                             crop_x0=(p.width - side) / 2, crop_y0=(p.height - side) / 2, crop_size=side,
                             crop_scale=1.0, face_size_px=float("nan"), padded=False, max_faces=0)

    def _face_clip(self, uri: str) -> tuple[CandidateClip, dict]:
        from pipeline.stages import DetectTrackStage, new_row

        if self._detect is None:
            self._detect = DetectTrackStage(self.cfg.curate)
        row = self._detect(new_row(Path(uri).stem, uri, "eval", "video", {}))
        payload = json.loads(row["payload"])
        if row["kind"] == "reject":
            raise EvalInputError(payload["reason"], payload.get("detail") or uri)
        clips = [CandidateClip(**c) for c in payload["clips"]]
        best = max(clips, key=lambda c: (c.n_frames, -c.start_s))
        return best, {"candidates": len(clips), "face_detector": self._detect.detector.name}

    # -- one video -----------------------------------------------------------------------
    def observe(self, path: str | Path) -> "Observed":
        """Decode and normalise one video, streaming every 512 frame through the observers."""
        uri = str(path)
        t0 = time.perf_counter()
        p = probe_input(uri)
        notes: list[str] = []
        try:
            audio, audio_t0 = decode_audio(uri, rate=AUDIO_RATE)
            have_audio = len(audio) > 0
        except MediaError as e:
            if e.reason != "no audio stream":
                raise EvalInputError(e.reason, e.detail or str(e)) from None
            audio, audio_t0, have_audio = np.zeros(0, np.float32), p.video_start_s, False
        if not have_audio:
            notes.append("no audio: lip sync and speech not measured")
        extra = {}
        if self.cfg.crop == "face":
            clip, extra = self._face_clip(uri)
        else:
            clip = self._frame_clip(p)
        if clip.n_frames < 1:
            raise EvalInputError("no video frames", f"{uri}: {p.duration_s:.3f} s of video")

        observer = ClipObserver(clip, self.face_model, self.syncnet.image_size, FPS, SIZE,
                                landmarks3d=self.landmarks3d, box_detector=self.box_detector)
        kps = KeypointSink(self.dwpose, self.dwpose.batch_size)
        sinks = self.frame_sinks_factory() if self.frame_sinks_factory else []

        def on_frame(_clip, frame):
            observer.observe(frame)
            kps(frame)
            for s in sinks:
                s(frame)

        errors: list[MediaError] = []
        clip_audio = None
        cfg = self.cfg.curate.output
        for cc in crop_and_normalize(uri, [clip], rotation=p.rotation, audio=audio, audio_t0=audio_t0, size=SIZE,
                                     fps=FPS, audio_rate=AUDIO_RATE, crf=cfg.crf, preset=cfg.preset,
                                     audio_bitrate=cfg.audio_bitrate, on_error=lambda c, e: errors.append(e),
                                     on_frame=on_frame,
                                     on_source_frame=lambda c, img: observer.observe_source(
                                         img, p.rotation, p.sample_aspect_ratio)):
            clip_audio = cc.audio
        n_seen = len(observer.boxes)
        if clip_audio is None:
            # The stream held fewer frames than its stated length (or failed mid-way): score what
            # decoded, cut the audio to it as crop_and_normalize would have, and say so.
            if n_seen == 0:
                e = errors[0] if errors else MediaError("no video frames", uri)
                raise EvalInputError(e.reason, e.detail or str(e))
            notes.append(f"{errors[0].reason if errors else 'short stream'}: scored the {n_seen} of "
                         f"{clip.n_frames} frames that decoded")
            clip.n_frames = n_seen
            clip_audio = slice_audio(audio, audio_t0, AUDIO_RATE, clip.start_s, clip.start_s + n_seen / FPS)
        return Observed(uri, p, clip, observer, kps, sinks, clip_audio, have_audio, notes, extra, t0)

    def sync_inputs(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """The SyncNet input crops [T, S, S, 3] (S = this scorer's SyncNet size) and the 16 kHz
        audio exactly as ``score`` feeds them to SyncNet (for training or checking a SyncNet)."""
        ob = self.observe(path)
        ob.observer._cut_sync_crops(final=True)
        return np.stack(ob.observer.sync_crops), ob.audio

    def score(self, path: str | Path) -> dict:
        ob = self.observe(path)
        uri, p, clip, observer, notes = ob.uri, ob.probe, ob.clip, ob.observer, ob.notes
        have_audio, kps, sinks, extra, t0 = ob.have_audio, ob.kps, ob.sinks, ob.extra, ob.t0
        clip_audio = ob.audio

        # Face size as the curation job measures it (median face side in source pixels, the
        # segment stage's crop_box over median-filtered boxes); in --crop face the detect stage did.
        have = np.array([n > 0 for n in observer.n_faces])
        k = clip.crop_size / SIZE
        boxes = np.stack(observer.boxes) if observer.boxes else np.zeros((0, 4), np.float32)
        if self.cfg.crop == "frame" and have.any():
            src = boxes[have] * k + np.array([clip.crop_x0, clip.crop_y0] * 2, np.float32)
            smooth = int(round(self.cfg.curate.track.smooth_window_s * FPS)) | 1
            clip.face_size_px = float(crop_box(src, width=p.width, height=p.height, crop_scale=1.0, smooth=smooth)[4])
        face_out = float(np.median(np.maximum(boxes[have, 2] - boxes[have, 0], boxes[have, 3] - boxes[have, 1]))) \
            if have.any() else None

        # the probe facts give the quality scores' bits per pixel, as in the curation job
        scores, detail = observer.finish(clip_audio, self.syncnet, self.sync_weights, (p.width, p.height),
                                         batch_size=self.cfg.curate.score.syncnet_batch_size, probe=p.as_dict())
        if not have_audio:
            for key in ("sync_conf", "sync_dist", "sync_offset", "sync_conf_frame_mean", "sync_conf_frame_p10",
                        "speech_ratio", "loudness_dbfs"):
                scores[key] = None
        elif detail.get("sync_error"):
            notes.append(f"sync: {detail['sync_error']}")
        for sink in sinks:  # FID / FVD statistics of the run
            sink.flush()
        kp = kps.result()
        motion = motion_variances(kp, self.cfg.curate.features.motion_window)
        failed = failed_rules(scores, self.cfg.curate.filters)
        row = dict(scores)
        row.update(
            path=uri, video=Path(uri).name, status="ok", error=None, notes="; ".join(notes) or None,
            profile=self.cfg.curate.profile, crop_mode=self.cfg.crop, has_audio=have_audio,
            src_width=p.width, src_height=p.height, src_fps=p.fps, src_vfr=p.vfr, src_rotation=p.rotation,
            start_s=clip.start_s, n_frames=clip.n_frames, duration_s=clip.n_frames / FPS,
            crop_x0=clip.crop_x0, crop_y0=clip.crop_y0, crop_size=clip.crop_size,
            face_size_out_px=face_out, face_detected_frac=float(have.mean()) if len(have) else 0.0,
            head_motion_var_mean=float(motion[:, 0].mean()) if len(motion) else None,
            expression_var_mean=float(motion[:, 1].mean()) if len(motion) else None,
            motion_windows=int(len(motion)),
            curation_pass=not failed, curation_failed_rules=",".join(f["rule"] for f in failed) or None,
            model_face=self.models["face"], model_pose=detail.get("pose_source") or self.models["pose"],
            model_keypoints=self.models["keypoints"], seconds=time.perf_counter() - t0,
            crop_candidates=extra.get("candidates"))
        row["sync_weights"] = self.sync_weights
        for key, v in list(row.items()):
            if isinstance(v, float) and not math.isfinite(v):
                row[key] = None
        return row


def probe_input(uri: str):
    """Container facts of a video, or EvalInputError naming why it is none."""
    if not Path(uri).exists() and "://" not in uri:
        raise EvalInputError("not found", uri)
    if "://" not in uri and Path(uri).stat().st_size == 0:
        raise EvalInputError("empty file", "0 bytes")
    try:
        p = probe(uri)
    except MediaError as e:
        detail = "" if e.reason == "no video stream" else (e.detail or str(e))  # e.g. an audio-only file
        raise EvalInputError(e.reason, detail) from None
    if p.n_frames < 2:  # e.g. an mp3's cover art: a video stream holding one still picture
        raise EvalInputError("not a video", f"{uri}: its video stream holds {p.n_frames} frame(s) (a still image)")
    if p.width < 16 or p.height < 16:
        raise EvalInputError("video too small", f"{uri}: {p.width}x{p.height}")
    return p


def load_syncnet_file(path: str):
    """A SyncNet state dict (the published ``syncnet_v2.model`` or any width, same key layout)."""
    import torch

    from pipeline.scoring.syncnet import SyncNet

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SyncNet weights not found: {p}")
    model = SyncNet.from_state_dict_file(p)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), model.model_id


