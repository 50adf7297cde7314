"""The curation stages as Ray Data operators, cheap filters first.

Every row that flows between stages has the same columns (see ``new_row``); ``kind`` says what
it is:

- ``video``: an input still being processed (payload grows stage by stage);
- ``reject``: terminal, a rejected video (clip_index -1) or candidate clip; payload = rejects row;
- ``summary``: terminal marker of a video that produced candidate clips (payload: how many);
- ``clip``: a kept candidate clip; payload = its meta.json, ``mp4`` its video member.

A stage handles the kinds it knows and passes every other row through untouched, so stages
can be added (scoring, features) without the others knowing. Each stage catches every
exception of a row and turns it into a reject naming the file, so a bad input never stops
the job.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

import schemas
from schemas import records
from . import __version__
from .config import CurateConfig
from .malloc import tune_malloc
from .media import (DecodeLog, MediaError, check_input, decode_audio_track, merge_ranges, probe, run_with_deadline,
                    transport_error)
from .segment import FRAME_QUANTUM, CandidateClip, Coverage, segment_tracks
from .shards import load_npy, npy_bytes
from .tracking import analyze_video

# Binary columns every row carries (b"" when unset). `audio16k` is the clip's lossless 16 kHz
# audio (float32 .npy) for the audio models; the rest map to shard members (SAMPLE_MEMBERS).
BLOB_COLUMNS = ("mp4", "audio16k", "latent", "audio_feat", "kps", "motion")
SAMPLE_MEMBERS = {"mp4": "video.mp4", "latent": "latent.npy", "audio_feat": "audio.npy", "kps": "kps.npy",
                  "motion": "motion.npy"}


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj) -> str:
    return json.dumps(obj, default=_json_default)


def new_row(video_id: str, uri: str, source: str, kind: str, payload: dict, clip_index: int = -1, **blobs) -> dict:
    row = {"video_id": video_id, "uri": uri, "source": source, "kind": kind, "clip_index": int(clip_index),
           "payload": dumps(payload)}
    for name in BLOB_COLUMNS:
        row[name] = blobs.get(name, b"")
    return row


def reject_row(row: dict, *, stage: str, reason: str, clip_index: int = -1, key: str | None = None,
               rule: str | None = None, value: float | None = None, threshold: float | None = None,
               detail: str = "", duration_s: float | None = None, retryable: bool = False) -> dict:
    """A ``reject`` row: its payload is the rejects row (schemas.records). ``retryable``: the cause is
    the machine, not the video (a crash, an internal error), so the next run tries the input again."""
    fields = dict(uri=row["uri"], video_id=row["video_id"], source=row["source"], stage=stage, reason=reason,
                  retryable=retryable, rule=rule, value=value, threshold=threshold, detail=detail, duration_s=duration_s)
    payload = (records.input_reject(**fields) if clip_index < 0
               else records.clip_reject(clip_index=clip_index, key=key, **fields))
    return new_row(row["video_id"], row["uri"], row["source"], "reject", payload, clip_index=clip_index)


def _crash_reject(row: dict, stage: str, exc: BaseException, payload: dict | None = None) -> dict:
    dur = (payload or {}).get("probe", {}).get("duration_s")
    # a network read that failed mid-decode (HTTP error, read timeout) is the input's fault, final;
    # any other OSError (a full local disk) stays an internal error, retried by the next run
    exc = transport_error(row["uri"], exc) or exc
    if isinstance(exc, MediaError):
        # final, except a server error (HTTP 5xx): the server failed, not the file
        return reject_row(row, stage=stage, reason=exc.reason, detail=str(exc), value=exc.value, duration_s=dur,
                          retryable=exc.reason.startswith("HTTP 5"))
    tb = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return reject_row(row, stage=stage, reason="internal error", detail=f"{row['uri']}: {tb}", duration_s=dur,
                      retryable=True)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray (unit tests) there is no node
        return None


def _add_timing(payload: dict, stage: str, seconds: float) -> None:
    """Stage wall time for this input, and the Ray node that ran it (run.json sums them)."""
    payload.setdefault("timings", {})[stage] = payload.get("timings", {}).get(stage, 0.0) + seconds
    payload.setdefault("nodes", {})[stage] = _node_id()


def input_timeout_s(config: CurateConfig, duration_s: float | None) -> float:
    """Time one stage may spend on one input (probe.input_timeout_s, probe.input_timeout_per_video_s)."""
    p = config.probe
    return max(p.input_timeout_s, p.input_timeout_per_video_s * float(duration_s or 0.0))


def _fault_injection(uri: str) -> None:
    """Kill this worker process (as a segfaulting decoder or the OOM killer would) when the URI
    contains $CURATE_FAULT_CRASH_ON. Used by tests of crash handling; unset in production."""
    token = os.environ.get("CURATE_FAULT_CRASH_ON")
    if token and token in uri:
        os._exit(137)


class ProbeStage:
    """Container facts; rejects unreadable files, no video, no audio, too short."""

    name = "probe"

    def __init__(self, config: CurateConfig):
        self.config = config

    def __call__(self, row: dict) -> dict:
        if row["kind"] != "video":
            return row
        t0 = time.perf_counter()
        payload = json.loads(row["payload"])
        def checked_probe():
            check_input(row["uri"])  # missing, unreadable, not a file: said plainly before FFmpeg guesses
            return probe(row["uri"], max_packets=self.config.probe.max_vfr_probe_packets,
                         limits=self.config.probe.decode_limits())

        try:  # under the limit too: a stat on a hung network mount blocks like a stalled read
            facts = run_with_deadline(checked_probe, seconds=self.config.probe.input_timeout_s, uri=row["uri"],
                                      what="probe", read_timeout_s=self.config.probe.read_timeout_s)
        except Exception as e:  # noqa: BLE001 - every failure becomes a rejects row
            return _crash_reject(row, self.name, e)
        payload["probe"] = facts.as_dict()
        _add_timing(payload, self.name, time.perf_counter() - t0)
        if facts.audio_streams == 0 and self.config.probe.require_audio:
            return reject_row(row, stage=self.name, reason="no audio stream", rule="probe.require_audio",
                              detail=f"{row['uri']} has no audio stream", duration_s=facts.duration_s)
        if min(facts.width, facts.height) < self.config.probe.min_side_px:
            return reject_row(row, stage=self.name, reason="picture too small", rule="probe.min_side_px",
                              value=min(facts.width, facts.height), threshold=self.config.probe.min_side_px,
                              detail=f"{row['uri']}: {facts.width}x{facts.height} pixels, smaller than "
                                     f"probe.min_side_px = {self.config.probe.min_side_px}", duration_s=facts.duration_s)
        if facts.duration_s < self.config.probe.min_duration_s:
            return reject_row(row, stage=self.name, reason="too short", rule="probe.min_duration_s",
                              value=facts.duration_s, threshold=self.config.probe.min_duration_s,
                              detail=f"{row['uri']} lasts {facts.duration_s:.2f} s", duration_s=facts.duration_s)
        row = dict(row)
        row["payload"] = dumps(payload)
        return row


class DetectTrackStage:
    """Face detection at detect_fps, tracks split at cuts, segmented into candidate clips.

    A Ray actor: the face model is loaded once per actor (in ``__init__``) and reused.
    """

    name = "detect"

    def __init__(self, config: CurateConfig):
        from .faces import make_detector

        tune_malloc(config.ray.malloc_mmap_threshold_kb)  # before its models and frames are allocated
        self.config = config
        self.probe = ProbeStage(config)
        self.detector = make_detector(config)

    def __call__(self, row: dict) -> dict:
        # Probing runs in this actor (it is cheap and decides whether detection runs at all):
        # one operator instead of a task pool feeding an actor pool, which on a small node could
        # hold the CPU the actor pools need.
        row = self.probe(row)
        if row["kind"] != "video":
            return row
        _fault_injection(row["uri"])
        duration = json.loads(row["payload"])["probe"]["duration_s"]
        try:
            return run_with_deadline(lambda: self._detect(row), seconds=input_timeout_s(self.config, duration),
                                     uri=row["uri"], what="face detection",
                                     read_timeout_s=self.config.probe.read_timeout_s)
        except MediaError as e:  # the watchdog gave up on it
            return _crash_reject(row, self.name, e, json.loads(row["payload"]))

    def _detect(self, row: dict) -> dict:
        t0 = time.perf_counter()
        payload = json.loads(row["payload"])
        p = payload["probe"]
        cfg = self.config
        try:
            damage = DecodeLog()  # decoding goes on past damaged packets; clips avoid their span
            analysis = analyze_video(row["uri"], self.detector, rotation=p["rotation"], width=p["width"],
                                     height=p["height"], detect_fps=cfg.detect.detect_fps, max_side=cfg.detect.max_side,
                                     iou_threshold=cfg.track.iou_threshold, max_gap_s=cfg.track.max_gap_s,
                                     shot_detectors=cfg.track.shot_detectors,
                                     min_shot_frames=cfg.track.min_shot_frames, damage=damage,
                                     limits=cfg.probe.decode_limits(), decode_threads=detect_decode_threads(cfg))
            coverage, coverage_record = self._coverage(row["uri"], p, damage)
            video_end = float(analysis.frame_times[-1]) + 1.0 / max(p["fps"], 1.0) if len(analysis.frame_times) else 0.0
            clips, short = segment_tracks(analysis, video_end_s=video_end, detect_fps=cfg.detect.detect_fps,
                                          min_clip_s=cfg.segment.min_clip_s, max_clip_s=cfg.segment.max_clip_s,
                                          crop_scale=cfg.segment.crop_scale, smooth_window_s=cfg.track.smooth_window_s,
                                          coverage=coverage)
        except Exception as e:  # noqa: BLE001
            return _crash_reject(row, self.name, e, payload)
        dur = p["duration_s"]
        # A stream that stops decoding well before its stated length is truncated (a partial
        # download, a cut-off upload): reject it rather than keep a clip of an unknown part.
        # Damaged packets in the middle still count as reached (the demuxer read past them).
        stated = p.get("video_duration_s") or dur
        last_frame = (float(analysis.frame_times[-1]) + 1.0 / max(p["fps"], 1.0)
                      if len(analysis.frame_times) else p["video_start_s"])
        reached = max(last_frame, damage.end_s or last_frame) if damage.damaged else last_frame
        decoded = reached - p["video_start_s"]
        if stated - decoded > max(1.0, 0.05 * stated):
            return reject_row(row, stage=self.name, reason="truncated stream", rule="decoded length vs stated length",
                              value=decoded, threshold=stated,
                              detail=f"{row['uri']}: frames decode to {decoded:.2f} s of a stated {stated:.2f} s",
                              duration_s=dur)
        if not analysis.tracks:
            return reject_row(row, stage=self.name, reason="no face detected", rule="detect.min_confidence",
                              value=0, threshold=cfg.detect.min_confidence,
                              detail=f"{row['uri']}: no face in {len(analysis.detect_times)} sampled frames",
                              duration_s=dur)
        if not clips:
            longest = max((tr.t_last - tr.t_first) for tr in analysis.tracks)
            cut_by = next((s.cut_by for s in short if s.cut_by), None)
            if cut_by:  # the tracks were long enough; what is left inside the coverage is not
                longest = max(s.duration_s for s in short)
                return reject_row(row, stage="segment", reason=f"no face track long enough {coverage_phrase(cut_by)}",
                                  rule="segment.min_clip_s", value=longest, threshold=cfg.segment.min_clip_s,
                                  detail=f"{row['uri']}: {len(analysis.tracks)} face tracks, longest part "
                                         f"{longest:.2f} s {coverage_phrase(cut_by)}; {coverage_text(coverage_record)}",
                                  duration_s=dur)
            return reject_row(row, stage="segment", reason="no face track long enough", rule="segment.min_clip_s",
                              value=longest, threshold=cfg.segment.min_clip_s,
                              detail=f"{row['uri']}: {len(analysis.tracks)} face tracks, longest {longest:.2f} s",
                              duration_s=dur)
        payload["models"] = {"face_detector": self.detector.name}
        payload["analysis"] = {"n_frames_decoded": int(len(analysis.frame_times)), "cuts_s": analysis.cut_times,
                               "n_tracks": len(analysis.tracks), "n_detections": int(len(analysis.detect_times)),
                               "coverage": coverage_record}
        payload["clips"] = [asdict(c) for c in clips]
        payload["short_segments"] = [asdict(s) for s in short]
        _add_timing(payload, self.name, time.perf_counter() - t0)
        out = dict(row)
        out["payload"] = dumps(payload)
        return out


    def _coverage(self, uri: str, p: dict, damage: DecodeLog) -> tuple[Coverage, dict]:
        """Where the source has both picture and sound, learnt before cropping so segmentation can
        keep clips inside it: the audio is decoded here too (AAC decodes at hundreds of times real
        time) with the same function, rate and rounding as the crop stage, so the spans agree
        sample for sample."""
        # keep=[]: the coverage only, no samples held (a 30-minute track is 115 MB of float32)
        audio = decode_audio_track(uri, rate=self.config.output.audio_rate, keep=[]) if p.get("audio_streams") else None
        damaged = sorted([("video", a, b) for a, b in damage.damaged]
                         + [("audio", a, b) for a, b in (audio.damaged if audio else [])], key=lambda d: d[1])
        coverage = Coverage(audio=audio.span_times() if audio is not None else None,
                            damaged=merge_ranges((a, b) for _, a, b in damaged))
        record = {"audio_spans_s": None if audio is None else [[round(a, 6), round(b, 6)] for a, b in coverage.audio],
                  "damaged": [{"stream": k, "start_s": round(a, 6), "end_s": round(b, 6)} for k, a, b in damaged],
                  "decode_errors": damage.errors + (audio.errors if audio else [])}
        return coverage, record


def detect_decode_threads(config: CurateConfig) -> int:
    """FFmpeg threads of the detect stage's decode: the CPUs its actor holds (ray.detect_num_cpus).
    FFmpeg's own count (cores + 1, frame threading) spreads one actor over every core of a node whose
    other CPUs Ray gave to other actors, and costs more CPU for the same frames: one round of the real
    clips on 2 busy cores, 17.3 -> 16.0 CPU s for the stage (docs/benchmarks.md, issue 13)."""
    return max(1, int(config.ray.detect_num_cpus or config.ray.cpus_per_task))


def coverage_phrase(cut_by: str) -> str:
    """How a rejects reason says what trimmed a track (segment.Coverage.pieces' labels)."""
    return {"audio": "inside audio coverage", "damage": "between damaged ranges",
            "audio+damage": "inside audio coverage and between damaged ranges"}[cut_by]


def coverage_text(record: dict | None) -> str:
    if not record:
        return "coverage unknown"
    spans = record.get("audio_spans_s")
    listed = ", ".join(f"{a:.2f}-{b:.2f}" for a, b in spans or []) or "none"
    audio = "no audio stream" if spans is None else f"audio {listed} s"
    bad = ", ".join(f"{d['stream']} {d['start_s']:.2f}-{d['end_s']:.2f}" for d in record.get("damaged", []))
    return audio + (f"; damaged {bad} s" if bad else "")


def _closing(background, clips):
    """The cropped clips of ``clips``; the observer thread ends with them (done, or an error)."""
    try:
        yield from clips
    finally:
        background.close()


# Source audio held around each clip beyond its own span: more than the largest lip-sync offset the
# crop stage may apply (SyncNet searches +-15 frames, 0.6 s at 25 fps).
AUDIO_KEEP_MARGIN_S = 2.0


def sample_key(video_id: str, clip_index: int) -> str:
    return f"{video_id}_{clip_index:04d}"


class CropScoreStage:
    """Crop & normalise, then score and filter: one video row in, a summary + one row per
    candidate clip out (a kept clip, or a reject naming the rule and the measured value).

    A Ray actor: the face model and SyncNet are loaded once per actor. Scores are measured on
    the output frames as they are encoded (no second decode), and every score of every clip
    travels on to scores.parquet, kept or not.
    """

    name = "crop"

    def __init__(self, config: CurateConfig):
        from .clip_scores import load_syncnet
        from .faces.mediapipe_backend import MediaPipeFaceDetector

        tune_malloc(config.ray.malloc_mmap_threshold_kb)  # before its models and frames are allocated
        self.config = config
        # Landmarks on the 512 crops: FaceMesh's 478 points (the detect stage's backend may be
        # SCRFD without dense landmarks in `full`).
        self.face_model = MediaPipeFaceDetector(min_confidence=config.detect.min_confidence, landmarks=True,
                                                ranges="short", landmarks_on_box=config.score.landmarks_on_box)
        self.syncnet, self.sync_weights = load_syncnet(config.profile, config.model_dir, config.score.syncnet_model)
        self.landmarks3d = None
        if config.profile == "full":
            from .faces.landmarks3d import Landmarks3D

            self.landmarks3d = Landmarks3D.from_model_dir(config.model_dir, config.score.landmarks3d_model)
        # ArcFace identity embeddings (pipeline/faces/arcface.py): the published w600k_r50 in full, a small
        # deterministic random stand-in with its I/O in smoke (plumbing only, like the smoke SyncNet)
        self.identity = None
        if config.score.identity:
            from .faces.arcface import ArcFace

            self.identity = (ArcFace.smoke() if config.profile == "smoke"
                             else ArcFace.from_model_dir(config.model_dir, config.score.arcface_model))
        self.iqa_model = None  # optional learned quality model from a local file (never downloaded)
        if config.score.learned_iqa:
            from .scoring.learned_iqa import load_learned_iqa

            self.iqa_model = load_learned_iqa(config.model_dir, config.score.learned_iqa_model)
        # The face box for SyncNet's crop and 1k3d68 comes from the profile's detector (SCRFD in full,
        # the WIDER FACE box convention of syncnet_python's S3FD); with mediapipe it is BlazeFace's own.
        self.box_detector = None
        if config.detector_backend != "mediapipe":
            from .faces import make_detector

            self.box_detector = make_detector(config)

    def __call__(self, row: dict):
        """Yields rows: first everything is computed (a failure here is one video-level reject),
        then the summary and one row per candidate are emitted, their mp4s and audio read back from
        the actor's local temp files one at a time (a long video never holds all its clips in memory)."""
        if row["kind"] != "video":
            yield row
            return
        t0 = time.perf_counter()
        payload = json.loads(row["payload"])
        tmpdir = tempfile.mkdtemp(prefix="crop-score-")
        try:
            try:
                rows = run_with_deadline(lambda: self._crop(row, payload, t0, Path(tmpdir)),
                                         seconds=input_timeout_s(self.config, payload["probe"]["duration_s"]),
                                         uri=row["uri"], what="crop and score",
                                         read_timeout_s=self.config.probe.read_timeout_s)
            except Exception as e:  # noqa: BLE001
                yield _crash_reject(row, self.name, e, payload)
                return
            for i in range(len(rows)):
                # the list lets go of each row as it leaves: it would otherwise hold every emitted clip's
                # mp4 and audio until the input is done (~9 MB per 27-s clip, 11 clips per 5 minutes)
                r, rows[i] = rows[i], None
                for blob in ("mp4", "audio16k"):
                    path = r.pop(f"{blob}_path", None)
                    if path is not None:
                        r[blob] = Path(path).read_bytes()
                        os.unlink(path)
                yield r
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _crop(self, row: dict, payload: dict, t0: float, tmpdir: Path) -> list[dict]:
        from .clip_scores import ObserverThread, select_speakers
        from .crop import crop_and_normalize
        from .filters import evaluate
        from .media import remux_with_audio

        cfg = self.config.output
        filters = self.config.filters
        p = payload["probe"]
        clips = [CandidateClip(**c) for c in payload["clips"]]
        # Only decoded samples are ever cut into a clip (AudioTrack.cut): no silence padding. Only the
        # clips' own audio is held (with room for the lip-sync offset fix, at most +-15 frames), not
        # the whole track: the memory of a long input stays that of its clips.
        audio = decode_audio_track(row["uri"], rate=cfg.audio_rate,
                                   keep=[(c.start_s - AUDIO_KEEP_MARGIN_S, c.end_s + AUDIO_KEEP_MARGIN_S) for c in clips])
        coverage = payload.get("analysis", {}).get("coverage")
        out_rows: list[dict] = []
        n_short = len(payload["short_segments"])
        for i, s in enumerate(payload["short_segments"]):
            ci = len(clips) + i
            cut_by = s.get("cut_by")
            out_rows.append(reject_row(row, stage="segment", clip_index=ci,
                                       reason="clip too short" + (f" {coverage_phrase(cut_by)}" if cut_by else ""),
                                       rule="segment.min_clip_s", value=s["duration_s"],
                                       threshold=self.config.segment.min_clip_s, duration_s=s["duration_s"],
                                       detail=f"{row['uri']}: track {s['track_id']} at {s['start_s']:.2f} s"
                                              + (f", {s['duration_s']:.2f} s left {coverage_phrase(cut_by)} "
                                                 f"({coverage_text(coverage)})" if cut_by else "")))

        def on_error(clip: CandidateClip, err: MediaError):
            observers.pop(clip.clip_index, None)
            out_rows.append(reject_row(row, stage=self.name, reason=err.reason, clip_index=clip.clip_index,
                                       key=sample_key(row["video_id"], clip.clip_index), detail=str(err),
                                       duration_s=clip.n_frames / cfg.fps))

        observers = {c.clip_index: self._observer(c) for c in clips}
        cropped, scores, details = {}, {}, {}
        t_score = 0.0
        background = ObserverThread()  # the per-frame scoring runs beside decoding and encoding
        for cc in _closing(background, crop_and_normalize(
                row["uri"], clips, rotation=p["rotation"], audio=audio,
                size=cfg.size, fps=cfg.fps, audio_rate=cfg.audio_rate, crf=cfg.crf,
                preset=cfg.preset, audio_bitrate=cfg.audio_bitrate, on_error=on_error,
                limits=self.config.probe.decode_limits(),
                on_frame=lambda c, f: background.submit(observers[c.clip_index].observe, f),
                on_source_frame=lambda c, img: background.submit(observers[c.clip_index].observe_source,
                                                                 img, p["rotation"], p.get("sample_aspect_ratio", "1:1")))):
            background.drain()  # every frame of this clip observed
            ci = cc.clip.clip_index
            t1 = time.perf_counter()
            # Score as soon as a clip is complete, so its per-frame buffers are freed right away.
            scores[ci], details[ci] = observers.pop(ci).finish(cc.audio, self.syncnet, self.sync_weights,
                                                               (p["width"], p["height"]),
                                                               batch_size=self.config.score.syncnet_batch_size,
                                                               probe=p)
            t_score += time.perf_counter() - t1
            path = tmpdir / f"{ci}.mp4"
            path.write_bytes(cc.mp4)
            cc.mp4 = b""
            cc.audio = None  # cut again from the track below (the same samples): not every clip's held twice
            cropped[ci] = (cc, path)
        t_crop = time.perf_counter() - t0 - t_score
        losers = select_speakers(scores, {c.clip_index: c for c in clips})
        for ci in sorted(cropped):
            cc, path = cropped.pop(ci)
            c = cc.clip
            key = sample_key(row["video_id"], ci)
            sc = scores[ci]
            failed = evaluate(sc, filters)
            if ci in losers:
                winner = scores[losers[ci]]
                real = sc.get("sync_weights") not in (None, "smoke-random")
                column = "sync_conf" if real else "mouth_activity"  # what the choice was made on
                failed.insert(0, {"rule": "speaker.selection", "column": column, "reason": "not the speaking face",
                                  "value": winner.get(column), "op": "<", "applied": True})
            audio_shift_s = 0.0
            clip_audio = audio.cut(audio.index_of(c.start_s), cc.audio_samples, uri=row["uri"])  # as crop cut it
            offset = sc.get("sync_offset")
            if (not failed and filters.fix_offset and offset and sc.get("sync_weights") == "syncnet_v2"):
                # LatentSync sync_av.py: delay the audio by the measured offset so the clip is in sync,
                # re-cut from the source audio (never shifted and zero-filled).
                fix = self._correct_offset(row, p, cc, path, int(offset), audio, tmpdir)
                if isinstance(fix, dict):  # what is left inside the audio coverage fails a rule
                    rp = json.loads(fix["payload"])
                    if "scores" not in rp:  # rejected before a new measurement: the scores it had
                        rp["scores"] = _scores_row(row, c, key, dict(sc, audio_shift_s=0.0), "rejected", rp["stage"],
                                                   rp["reason"], fps=cfg.fps)
                        fix["payload"] = dumps(rp)
                    out_rows.append(fix)
                    path.unlink(missing_ok=True)
                    continue
                new_cc, new_sc, new_detail, clip_audio, applied = fix
                if new_sc is not None:  # trimmed at the coverage edge, cropped and scored again
                    new_sc["other_faces"] = bool(new_sc.get("other_faces") or sc.get("other_faces"))
                    cc, sc, details[ci] = new_cc, new_sc, new_detail
                    c = cc.clip
                path.write_bytes(remux_with_audio(path.read_bytes(), clip_audio, audio_rate=cfg.audio_rate,
                                                  audio_bitrate=cfg.audio_bitrate))
                audio_shift_s = applied / cfg.fps
            sc["audio_shift_s"] = audio_shift_s
            if failed:
                first = failed[0]
                value = sc.get(first["column"])
                rej = reject_row(row, stage="score", reason=first["reason"], clip_index=ci, key=key, rule=first["rule"],
                                 value=value if isinstance(value, (int, float)) else None,
                                 threshold=first["value"] if isinstance(first["value"], (int, float)) else None,
                                 duration_s=c.n_frames / cfg.fps,
                                 detail=f"{row['uri']} clip {ci} ({c.start_s:.2f}-{c.end_s:.2f} s): fails "
                                        + "; ".join(f"{f['rule']} ({f['column']} {f['op']} {f['value']})" for f in failed))
                rp = json.loads(rej["payload"])
                rp["scores"] = _scores_row(row, c, key, sc, "rejected", "score", first["reason"], fps=cfg.fps)
                rej["payload"] = dumps(rp)
                out_rows.append(rej)
                path.unlink()
                continue
            meta = self._meta(row, p, payload, c, key, cc, sc, details[ci], audio_shift_s)
            if coverage is not None:
                meta["source"]["audio_spans_s"] = coverage["audio_spans_s"]
                meta["source"]["damaged"] = coverage["damaged"]
            clip_row = new_row(row["video_id"], row["uri"], row["source"], "clip", meta, clip_index=ci)
            clip_row["mp4_path"] = str(path)
            # the audio waits on disk too: a long input's clips are not all held until it is done
            audio_path = tmpdir / f"{ci}.audio16k.npy"
            audio_path.write_bytes(npy_bytes(clip_audio))
            clip_row["audio16k_path"] = str(audio_path)
            out_rows.append(clip_row)
        _add_timing(payload, self.name, t_crop)
        _add_timing(payload, "score", t_score)
        summary = {"n_candidates": len(clips) + n_short, "probe": p, "timings": payload.get("timings", {}),
                   "nodes": payload.get("nodes", {}), "analysis": payload.get("analysis", {}),
                   "models": payload.get("models", {})}
        return [new_row(row["video_id"], row["uri"], row["source"], "summary", summary)] + out_rows

    def _correct_offset(self, row: dict, p: dict, cc, path: Path, offset: int, audio, tmpdir: Path):
        """The clip in sync: its audio re-cut from the source ``offset`` frames earlier (a positive
        SyncNet offset means the audio leads; LatentSync delays it by that much).

        Where the corrected audio would reach outside the decoded audio (a clip starting where the
        audio starts, whose audio must be delayed), the clip loses whole FRAME_QUANTUMs at that end
        and is cropped and scored again: the audio a training clip pairs with its lips must be the
        sound the source had at that moment, and padding the missing frames with zeros (what
        ``shift_audio`` does) would teach talking lips over digital silence. The trimmed clip is
        scored like any other (before the shift), so its scores describe exactly the frames
        shipped; it must pass the rules again, and its own re-measured offset is the one applied,
        so its ``sync_offset`` and ``audio_shift_s`` agree.

        Returns (cropped clip, scores, detail, corrected audio, offset applied), or a rejects row;
        scores and detail are None when the clip needed no trim (``path`` then still holds its
        video; after a trim it holds the new one).
        """
        from .filters import evaluate

        cfg = self.config.output
        spf = cfg.audio_rate // cfg.fps
        c = cc.clip
        n = c.n_frames * spf
        first = audio.index_of(c.start_s) - offset * spf  # audio for output frame j: source frame j - offset
        if audio.covers(first, n):
            return cc, None, None, audio.cut(first, n, uri=row["uri"]), offset
        span = next(((a, b) for a, b in audio.spans if a <= first + offset * spf < b), (first, first + n))
        missing = span[0] - first if offset > 0 else first + n - span[1]  # samples outside the span
        trim = -(-max(missing, 1) // (spf * FRAME_QUANTUM)) * FRAME_QUANTUM  # frames, whole quanta
        n_frames = c.n_frames - trim
        start_s = c.start_s + (trim / cfg.fps if offset > 0 else 0.0)
        min_s = self.config.segment.min_clip_s
        key = sample_key(row["video_id"], c.clip_index)
        if n_frames / cfg.fps + 1e-9 < min_s or n_frames <= 0:
            return reject_row(row, stage="score", reason="clip too short inside audio coverage",
                              clip_index=c.clip_index, key=key, rule="segment.min_clip_s", value=max(n_frames, 0) / cfg.fps, threshold=min_s,
                              duration_s=c.n_frames / cfg.fps,
                              detail=f"{row['uri']} clip {c.clip_index} ({c.start_s:.2f}-{c.end_s:.2f} s): correcting "
                                     f"its {offset}-frame audio offset needs audio outside the decoded audio; "
                                     f"{max(n_frames, 0) / cfg.fps:.2f} s would be left")
        trimmed = dataclasses.replace(c, start_s=start_s, n_frames=n_frames)
        result = self._crop_one(row, p, trimmed, audio, tmpdir)
        if isinstance(result, MediaError):
            return reject_row(row, stage=self.name, reason=result.reason, clip_index=c.clip_index, key=key,
                              detail=str(result), duration_s=n_frames / cfg.fps)
        new_cc, sc, detail = result
        path.write_bytes(new_cc.mp4)
        new_cc.mp4 = b""
        failed = evaluate(sc, self.config.filters)
        offset2 = sc.get("sync_offset")
        first = audio.index_of(start_s) - int(offset2 or 0) * spf
        if not failed and not audio.covers(first, n_frames * spf):
            failed = [{"rule": "segment.min_clip_s", "column": "sync_offset", "reason": "clip too short inside audio coverage",
                       "value": offset2, "op": "re-measured"}]
        if failed:
            f = failed[0]
            rej = reject_row(row, stage="score", reason=f["reason"], clip_index=c.clip_index, key=key, rule=f["rule"],
                             value=sc.get(f["column"]) if isinstance(sc.get(f["column"]), (int, float)) else None,
                             duration_s=n_frames / cfg.fps,
                             detail=f"{row['uri']} clip {c.clip_index} trimmed to {start_s:.2f}-{trimmed.end_s:.2f} s "
                                    f"for its {offset}-frame offset fails "
                                    + "; ".join(f"{x['rule']} ({x['column']} {x['op']} {x['value']})" for x in failed))
            rp = json.loads(rej["payload"])
            rp["scores"] = _scores_row(row, trimmed, key, dict(sc, audio_shift_s=0.0), "rejected", "score", f["reason"],
                                       fps=cfg.fps)
            rej["payload"] = dumps(rp)
            return rej
        detail["offset_trim"] = {"frames": trim, "end": "start" if offset > 0 else "end", "from_start_s": c.start_s,
                                 "from_n_frames": c.n_frames}
        return new_cc, sc, detail, audio.cut(first, n_frames * spf, uri=row["uri"]), int(offset2 or 0)

    def _observer(self, clip: CandidateClip):
        """The per-frame scorer of one clip, with every model of this actor (the same for the first
        crop and for the re-crop after an offset trim, so both use the profile's face boxes)."""
        from .clip_scores import ClipObserver

        cfg = self.config.output
        return ClipObserver(clip, self.face_model, self.syncnet.image_size, cfg.fps, cfg.size,
                            landmarks3d=self.landmarks3d, box_detector=self.box_detector, identity=self.identity,
                            identity_frames=self.config.score.identity_frames, iqa_model=self.iqa_model,
                            landmarks_every=self.config.score.landmarks_every)

    def _crop_one(self, row: dict, p: dict, clip: CandidateClip, audio, tmpdir: Path):
        """Crop and score one clip again (the offset trim): (CroppedClip, scores, detail) or the MediaError."""
        from .crop import crop_and_normalize

        cfg = self.config.output
        observer = self._observer(clip)
        errors: list[MediaError] = []
        for cc in crop_and_normalize(row["uri"], [clip], rotation=p["rotation"], audio=audio, size=cfg.size,
                                     fps=cfg.fps, audio_rate=cfg.audio_rate, crf=cfg.crf, preset=cfg.preset,
                                     audio_bitrate=cfg.audio_bitrate, on_error=lambda c, e: errors.append(e),
                                     limits=self.config.probe.decode_limits(),
                                     on_frame=lambda c, f: observer.observe(f),
                                     on_source_frame=lambda c, img: observer.observe_source(
                                         img, p["rotation"], p.get("sample_aspect_ratio", "1:1"))):
            sc, detail = observer.finish(cc.audio, self.syncnet, self.sync_weights, (p["width"], p["height"]),
                                         batch_size=self.config.score.syncnet_batch_size, probe=p)
            return cc, sc, detail
        return errors[0] if errors else MediaError("decode error", f"{row['uri']}: clip {clip.clip_index} not cropped")

    def _meta(self, row, p, payload, c, key, cc, sc, detail, audio_shift_s) -> dict:
        cfg = self.config.output
        return {
            "schema_version": schemas.SCHEMA_VERSION, "pipeline_version": __version__,
            "profile": self.config.profile, "key": key, "video_id": row["video_id"], "clip_index": c.clip_index,
            "source": {"uri": row["uri"], "source": row["source"], "size_bytes": p.get("size_bytes"),
                       "duration_s": p["duration_s"], "fps": p["fps"], "vfr": p["vfr"], "width": p["width"],
                       "height": p["height"], "rotation": p["rotation"], "video_codec": p["video_codec"],
                       "audio_codec": p["audio_codec"], "audio_rate": p["audio_rate"],
                       "audio_channels": p["audio_channels"],
                       "sample_aspect_ratio": p.get("sample_aspect_ratio", "1:1"),
                       "coded_width": p.get("coded_width"), "coded_height": p.get("coded_height")},
            "clip": {"start_s": c.start_s, "end_s": c.end_s, "n_frames": cc.n_frames, "fps": cfg.fps,
                     "width": cfg.size, "height": cfg.size, "audio_rate": cfg.audio_rate,
                     "audio_samples": cc.audio_samples, "audio_shift_s": audio_shift_s, "track_id": c.track_id,
                     "shot_index": c.shot_index},
            "crop": {"x0": c.crop_x0, "y0": c.crop_y0, "size": c.crop_size, "scale": c.crop_scale,
                     "face_size_px": c.face_size_px, "padded": c.padded, "active_picture": c.active_picture,
                     "pad_frac": c.pad_frac},
            "models": dict(payload.get("models", {}), landmarks=self.face_model.name, syncnet=self.sync_weights,
                           **({"pose_landmarks": self.landmarks3d.name} if self.landmarks3d is not None else {}),
                           **({"score_boxes": self.box_detector.name} if self.box_detector is not None else {}),
                           **({"identity": self.identity.name} if self.identity is not None else {}),
                           **({"learned_iqa": self.iqa_model.model_id} if self.iqa_model is not None else {})),
            "members": list(records.REQUIRED_MEMBERS),
            "scores": dict(sc, max_faces=c.max_faces),
            "score_details": detail,
        }


def _scores_row(row: dict, c: CandidateClip, key: str, sc: dict, status: str, stage: str | None,
                reason: str | None, *, fps: float) -> dict:
    return records.scores_row(scores=sc, key=key, video_id=row["video_id"], clip_index=c.clip_index, uri=row["uri"],
                              source=row["source"], track_id=c.track_id, start_s=c.start_s, n_frames=c.n_frames,
                              fps=fps, status=status, reject_stage=stage, reject_reason=reason,
                              features_computed=False)


class FeatureStage:
    """VAE latents, wav2vec2 features, DWPose face keypoints and motion variances of kept clips.

    A Ray Data ``map_batches`` actor (models loaded once per actor, on the GPU when the actor
    was given one); rows that are not kept clips pass through.
    """

    name = "features"

    def __init__(self, config: CurateConfig):
        from .features.extractor import FeatureExtractor

        f = config.features
        self.config = config
        self.extractor = FeatureExtractor(config.profile, config.model_dir, device=f.device, batch_size=f.batch_size,
                                          dtype=f.dtype, motion_window=f.motion_window, vae_store_std=f.vae_store_std,
                                          motion_score_threshold=f.motion_score_threshold,
                                          motion_min_valid_frac=f.motion_min_valid_frac, vae_model=f.vae_model,
                                          tf32=f.tf32)

    def __call__(self, batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [self._one(r) if r["kind"] == "clip" else r for r in rows]
        return {k: [r[k] for r in out] for k in batch}

    def _one(self, row: dict) -> dict:
        from .features.extractor import FeatureExtractor
        from .media import read_clip

        t0 = time.perf_counter()
        meta = json.loads(row["payload"])
        try:
            frames, _, _ = read_clip(bytes(row["mp4"]))
            audio = load_npy(bytes(row["audio16k"]))
            feats = self.extractor(frames, audio)
            members = FeatureExtractor.members(feats)
        except Exception as e:  # noqa: BLE001
            rej = _crash_reject(row, self.name, e)
            payload = json.loads(rej["payload"])
            # a feature failure is the machine's (GPU memory, a model bug): retried by the next run
            payload.update(clip_index=row["clip_index"], key=meta["key"], retryable=True,
                           duration_s=meta["clip"]["n_frames"] / meta["clip"]["fps"])
            payload["scores"] = records.scores_row(
                scores=meta["scores"], key=meta["key"], video_id=row["video_id"], clip_index=row["clip_index"],
                uri=row["uri"], source=row["source"], track_id=meta["clip"]["track_id"],
                start_s=meta["clip"]["start_s"], n_frames=meta["clip"]["n_frames"], fps=meta["clip"]["fps"],
                status="rejected", reject_stage=self.name, reject_reason=payload["reason"], features_computed=False)
            rej["payload"], rej["clip_index"] = dumps(payload), row["clip_index"]
            return rej
        meta["models"].update(feats["model_ids"])
        meta["features"] = feats["meta"]
        motion = feats["motion"]  # raw px^2 in columns 0-1; NaN = window without enough valid keypoints
        for col, name in ((0, "head_motion_var_mean"), (1, "expression_var_mean")):
            if np.isfinite(motion[:, col]).any():
                meta["scores"][name] = float(np.nanmean(motion[:, col]))
        meta["members"] = sorted(set(meta["members"]) | set(members))
        meta.setdefault("timings", {})[self.name] = time.perf_counter() - t0
        out = dict(row)
        out["payload"] = dumps(meta)
        out["latent"], out["audio_feat"] = members["latent.npy"], members["audio.npy"]
        out["kps"], out["motion"] = members["kps.npy"], members["motion.npy"]
        return out


# The stage list, in order: cheap filters first, expensive features only for survivors.
def default_stages(config: CurateConfig) -> list[dict]:
    """Stage class and how Ray runs it: ``actor`` stages load their models once per actor."""
    stages = [
        {"cls": DetectTrackStage, "kind": "map", "actor": True, "pool": config.ray.detect_actors,  # probe + detect
         "num_cpus": config.ray.detect_num_cpus or config.ray.cpus_per_task},
        {"cls": CropScoreStage, "kind": "flat_map", "actor": True, "pool": config.score.actors,
         "num_gpus": config.score.num_gpus, "num_cpus": config.score.num_cpus or config.ray.cpus_per_task},
    ]
    if config.features.enabled:
        f = config.features
        stages.append({"cls": FeatureStage, "kind": "map_batches", "actor": True, "pool": f.actors,
                       "batch_size": 1, "num_gpus": f.num_gpus, "num_cpus": f.num_cpus})
    return stages
