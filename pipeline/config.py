"""Typed configuration of the curation job: every default lives here, once.

A YAML file overrides any field (nested sections as mappings). Unknown or invalid fields are
errors raised before any work starts (pydantic ``extra="forbid"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Profile = Literal["smoke", "full"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ProbeConfig(_Section):
    min_duration_s: float = Field(2.0, gt=0, description="inputs shorter than this are rejected")
    require_audio: bool = True
    max_vfr_probe_packets: int = Field(2000, ge=10, description="packets read to measure frame-interval variability")
    # Per-input time limit: a hang detector, not a speed rule (a false timeout loses a good video), so generous.
    # Each stage call on one input (probe; detect; crop+score) may take max(input_timeout_s,
    # input_timeout_per_video_s x duration): the floor covers short inputs on a loaded node (model warm-up,
    # a slow disk), the per-second part long ones (CPU detect+crop+score runs at a few times real time).
    # Past it the input is a "timed out" reject (docs/pipeline.md, "Time limits").
    input_timeout_s: float = Field(300.0, gt=0, description="per-input, per-stage time limit floor (s); also probe's limit")
    input_timeout_per_video_s: float = Field(10.0, ge=0, description="...or this many seconds per second of video")
    read_timeout_s: float = Field(60.0, gt=0, description="a remote (http) read or connect that gets no data for this long fails")
    # Decompression-bomb caps (media.DecodeLimits): checked on the container's declared picture size and frame
    # count before any frame is decoded, then by FFmpeg's decoders (max_pixels) and while decoding. 40 MP takes
    # DCI 8K (8192x4320 = 35.4 MP) with room, and bounds one decoded rgb24 frame to 120 MB; 16K (15360x8640) and
    # up are refused. 3,000,000 frames is 33 h at 25 fps or 14 h at 60 fps, longer than any real recording we take.
    max_frame_pixels: int = Field(40_000_000, ge=64 * 64, description="larger pictures are rejected (frame too large)")
    max_frames: int = Field(3_000_000, ge=1, description="streams with more frames are rejected (too many frames)")
    # A picture this small holds no usable face (filters.face_size_px_min is 128 px; the output is 512 px): rejected
    # at probe, before a face detector is run on it and finds noise.
    min_side_px: int = Field(64, ge=1, description="inputs whose displayed width or height is smaller are rejected")

    def decode_limits(self):
        from .media import DecodeLimits

        return DecodeLimits(max_frame_pixels=self.max_frame_pixels, max_frames=self.max_frames)


class DetectConfig(_Section):
    backend: Literal["auto", "mediapipe", "scrfd"] = Field(
        "auto", description="auto = mediapipe in smoke, scrfd (insightface) in full")
    detect_fps: float = Field(5.0, gt=0, le=60, description="face detection rate; boxes are interpolated between")
    min_confidence: float = Field(0.5, ge=0, le=1)
    max_side: int = Field(960, ge=128, description="frames are downscaled to this longest side for detection")
    scrfd_model: str = "det_10g.onnx"
    scrfd_input_size: int = 640

    @model_validator(mode="before")
    @classmethod
    def _removed_landmarks(cls, data):
        """``detect.landmarks`` is gone: tracking and segmenting use boxes only, and no stage read the
        landmarks it ran FaceMesh for (a quarter of the smoke detect stage's CPU, docs/benchmarks.md,
        issue 13). ``false`` asked for what now always happens; ``true`` cannot be honoured, so it says where
        landmarks come from instead of running a model whose output nobody reads."""
        if isinstance(data, dict) and "landmarks" in data:
            data = dict(data)
            if data.pop("landmarks"):
                raise ValueError("detect.landmarks was removed: the detect stage runs no landmark model (nothing "
                                 "read its landmarks); the scores' landmarks are measured on the output frames "
                                 "(score.landmarks_every, score.landmarks_on_box). Delete the key")
        return data


class TrackConfig(_Section):
    iou_threshold: float = Field(0.3, gt=0, lt=1, description="min IoU to link a detection to a track")
    max_gap_s: float = Field(0.6, ge=0, description="a track survives missed detections for this long")
    # PySceneDetect detectors on the analysis frames (pipeline/shots.py; comparison in docs/pipeline.md "Shots"):
    # AdaptiveDetector finds hard cuts (also between two shots of one person), HistogramDetector fades and dissolves.
    shot_detectors: dict[Literal["content", "adaptive", "histogram", "hash", "threshold", "hsv"], float] = Field(
        default_factory=lambda: {"adaptive": 3.0, "histogram": 0.05}, min_length=1,
        description="shot detector -> its threshold; a frame starts a new shot if any detector cuts there")
    min_shot_frames: int = Field(15, ge=1, description="a detector reports no cut within this many frames of its last (PySceneDetect min_scene_len)")
    smooth_window_s: float = Field(0.52, ge=0, description="median filter on box centres/sizes (syncnet_python uses 13 frames at 25 fps)")


class SegmentConfig(_Section):
    min_clip_s: float = Field(2.0, gt=0)
    max_clip_s: float = Field(30.0, gt=0)
    crop_scale: float = Field(2.0, ge=1.0, description="crop side = crop_scale x face box side (face covers ~1/crop_scale of the width)")
    min_face_px: float = Field(0.0, ge=0, description="candidate tracks with a smaller median face are rejected (0 = off)")

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_clip_s < self.min_clip_s:
            raise ValueError(f"max_clip_s ({self.max_clip_s}) < min_clip_s ({self.min_clip_s})")
        return self


class OutputConfig(_Section):
    # Fixed by the data contract (DESIGN: 512x512, 25 fps, 16 kHz mono); present so they show in run.json.
    size: Literal[512] = 512
    fps: Literal[25] = 25
    audio_rate: Literal[16000] = 16000
    crf: int = Field(18, ge=0, le=51)
    # x264 preset of the output clips, chosen by measurement (docs/benchmarks.md, issue 13): at crf 18
    # ultrafast costs 1.7 ms of CPU per 512x512 frame against veryfast's 4.2-4.9, with the same or
    # better PSNR (40.7 vs 40.2 dB); its files are ~2.5x larger (~10 KiB per frame), still a third of
    # the frame's latent member, and training decodes them again anyway.
    preset: str = "ultrafast"
    audio_bitrate: int = Field(96_000, ge=16_000)


class FilterConfig(_Section):
    """Thresholds on the per-clip scores (pipeline/filters.py). Every score is stored whether or
    not a rule uses it, so `jobs/refilter.py` can change these later without recomputing.
    A threshold of None switches its rule off."""
    # LatentSync preprocess/sync_av.py: keep Sync-C >= 3 and |offset| <= 6, then shift the audio.
    sync_conf_min: float | None = 3.0
    sync_offset_abs_max: int | None = 6
    fix_offset: bool = Field(True, description="shift the audio by the measured offset when it is within the limit")
    # Speech: digital silence and music-only audio are the common failures (docs/scoring.md).
    speech_ratio_min: float | None = 0.2
    loudness_dbfs_min: float | None = -50.0
    # Mouth activity (face sizes/s of inner-lip opening change): a static face over a voice.
    mouth_activity_min: float | None = 0.25
    # Pose (degrees), applied to the clip's 95th percentile of |angle| (scores *_abs_p95; the max is
    # recorded as *_abs_max). No paper fixes plain limits; TalkVid's orientation score >= 70 on
    # average allows ~54 deg RMS. We keep near-frontal talking heads, as Loopy/Hallo training data is.
    yaw_abs_max: float | None = 40.0
    pitch_abs_max: float | None = 30.0
    roll_abs_max: float | None = 30.0
    # Head movement: max distance of the face centre from its median, in face sizes.
    head_translation_max: float | None = 0.6
    # Completeness: share of frames whose head box (face x 1.2) and landmarks are in the frame
    # (TalkVid completeness requires all frames; we allow a few missed landmark fits).
    complete_frac_min: float | None = 0.95
    # Padding: share of the 512 crop's area outside the active picture (beyond the coded frame or
    # on a burned-in bar), shown as a flat border in the clip (docs/scoring.md, "Picture geometry").
    pad_frac_max: float | None = 0.4
    # Face size: median face box side in source pixels (the crop upscales smaller faces).
    face_size_px_min: float | None = 128.0
    # Technical quality (pipeline/scoring/quality.py; defaults from the real clips, docs/scoring.md
    # "Quality"): face sharpness (Laplacian variance at a 128 px face), source bits per pixel per
    # frame, 8x8 blockiness B/A on the source grid, shares of clipped face pixels.
    sharpness_min: float | None = 20.0
    bpp_min: float | None = 0.008
    blockiness_max: float | None = 1.5
    shadow_clip_frac_max: float | None = 0.25
    highlight_clip_frac_max: float | None = 0.25
    # learned quality (score.learned_iqa, off by default): no default threshold, set one from its scores
    learned_iqa_min: float | None = None
    # Several faces: always flagged (other_faces); reject only when this is true.
    single_face_required: bool = False
    # Near-duplicates (jobs/dedup.py, docs/dedup.md): when duplicates.parquet exists, keep only the
    # best-ranked member of each duplicate group that passes the other rules; false brings them back.
    dedup: bool = True


class DedupConfig(_Section):
    """Near-duplicate detection (jobs/dedup.py; definitions and thresholds: docs/dedup.md)."""
    audio_ber_max: float = Field(0.35, gt=0, lt=0.5, description="Haitsma-Kalker: same audio when the bit error rate "
                                 "over the aligned overlap is at most this (their block threshold)")
    min_overlap_s: float = Field(1.5, gt=0, description="aligned audio overlap needed (Haitsma-Kalker's block is "
                                 "256 sub-fingerprints, 2.97 s; our shortest clips, segment.min_clip_s = 2 s, "
                                 "hold ~140, so 1.5 s = 130 sub-fingerprints, 4160 bits)")
    min_overlap_frac: float = Field(0.5, gt=0, le=1, description="...and at least this share of the shorter clip")
    phash_max_bits: float = Field(10.0, ge=0, le=32, description="visual agreement: mean nearest-frame phash "
                                  "distance (either orientation) at most this many of 64 bits")
    visual_only_phash_max_bits: float = Field(4.0, ge=0, le=32, description="a match without the audio (re-dubbed) "
                                              "needs this close a phash AND the identity agreement")
    identity_cos_min: float = Field(0.5, ge=-1, le=1, description="identity agreement: cosine of identity_embedding")
    winnow_window: int = Field(16, ge=1, description="audio lookup keys: one minimum-hash sub-fingerprint per this "
                               "many (winnowing), so a clip emits ~2/(w+1) of its sub-fingerprints")
    phash_bands: int = Field(8, ge=1, le=64, description="LSH bands over each 64-bit frame hash")
    phash_band_bits: int = Field(28, ge=8, le=48, description="bits sampled per band: hashes d bits apart share a "
                                 "band with probability ~(1-d/64)^bits, unrelated ones with ~2^-bits")
    max_bucket: int = Field(64, ge=2, description="buckets with more clips are skipped as uninformative (silence, "
                            "a static studio shot): candidate pairs per bucket stay <= max_bucket^2/2")
    rank_by: list[str] = Field(["sharpness", "face_size_px", "sync_conf", "duration_s"],
                               description="best member of a group: highest value of the first of these scores "
                                           "columns present (None ranks last), then the next; ties by key")


class ScoreConfig(_Section):
    syncnet_model: str = "syncnet_v2.model"
    # full profile 68x3 landmarks; another file name (registered with fetch_models.py --register) for own weights
    landmarks3d_model: str = "1k3d68.onnx"
    syncnet_batch_size: int = Field(20, ge=1)
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs per crop+score actor (SyncNet)")
    actors: int = Field(1, ge=1, description="max crop+score actors")
    num_cpus: float | None = Field(None, gt=0, description="CPUs per crop+score actor (None: ray.cpus_per_task)")
    # ArcFace identity embedding per scored clip (scores identity_embedding; docs/identity.md)
    identity: bool = Field(True, description="embed each clip's face with ArcFace (insightface w600k_r50 in full, "
                                             "a random stand-in in smoke) for jobs/identities.py")
    identity_frames: int = Field(5, ge=1, le=100, description="evenly spaced output frames embedded and averaged")
    arcface_model: str = "w600k_r50.onnx"
    learned_iqa: bool = Field(False, description="score the 512 crops with pyiqa's CNNIQA from a local weights "
                                                 "file (pipeline/scoring/learned_iqa.py); never downloaded")
    learned_iqa_model: str = Field("CNNIQA_koniq10k-e6f14c91.pth", description="file in model_dir (pyiqa's layout, "
                                   "torch or safetensors)")
    # FaceMesh on the 512 output frames is ~80% of the per-frame face work of the crop & score stage
    # (docs/benchmarks.md, issue 13, "Landmarks per output frame"): these trade landmark accuracy for CPU.
    landmarks_every: int = Field(1, ge=1, le=25, description="FaceMesh on every k-th output frame (and the last); "
                                 "the frames between get the linear interpolation of its landmarks: mouth_activity reads "
                                 "lower (up to 0.11 at 2, 0.22 at 3 on the real clips), pose moves < 1 degree; boxes, "
                                 "face counts and identity frames do not move")
    landmarks_on_box: bool = Field(False, description="FaceMesh's landmark model on the region of BlazeFace's box of "
                                   "the frame, without the FaceMesh solution's second face detection on the crop")


class FeaturesConfig(_Section):
    """Training features of kept clips (GPU actor pool in production, CPU in smoke/CI)."""
    enabled: bool = True
    device: str = Field("auto", description="auto = cuda when the actor has a GPU, else cpu")
    dtype: str = Field("float32", description="VAE encode precision: float32 (auto = float32; audit item 4: bf16 "
                                              "autocast is far above fp16 storage rounding, docs/features.md); "
                                              "float16/bfloat16 autocast on CUDA only. wav2vec2 is always fp32")
    # PyTorch's own default runs float32 convolutions on CUDA in TF32; here it is a choice, recorded in
    # meta (features.vae_tf32). Measured on an H200: 4.0x strict fp32's frames/s, latent mean within
    # 2.1% of its std of strict fp32 (pipeline/features/precision.py, docs/benchmarks.md).
    tf32: bool = Field(True, description="float32 VAE encode on CUDA with TF32 convolutions (false: strict fp32)")
    batch_size: int = Field(16, ge=1, description="frames per VAE / DWPose batch")
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs per feature actor; fractions share a GPU")
    num_cpus: float = Field(1.0, gt=0)
    actors: int = Field(1, ge=1, description="max feature actors (the pool scales between 1 and this)")
    motion_window: int = Field(12, ge=2, description="Loopy 3.5: frames per head/expression variance window")
    # sd-vae/ is the registry's (pinned sha256); another name = one's own VAE, registered with fetch_models.py --register
    vae_model: str = Field("sd-vae", description="VAE in model_dir: a diffusers directory or one .safetensors file")
    vae_store_std: bool = Field(False, description="latent.npy also stores the posterior std (channels 4..7, "
                                                   "[T,8,64,64]); default: the mean only, [T,4,64,64]")
    motion_score_threshold: float | None = Field(0.3, ge=0, le=1, description="DWPose score below which a keypoint "
                                                 "does not count in the motion variances (DWPose's own 0.3); None: all")
    motion_min_valid_frac: float = Field(0.5, gt=0, le=1, description="share of a window's frames (per point) and "
                                         "of the 37 points needed for a motion value; else NaN")


class WriteConfig(_Section):
    shard_max_bytes: int = Field(512 * 1024 * 1024, ge=64 * 1024, description="a shard is closed before it would exceed this")
    dataset_name: str = "talking-heads"
    # Shards are written on the Ray workers, each writer its own shards (names unique per run and
    # writer), straight to the output store; the driver sees small records only (docs/pipeline.md).
    writers: int | None = Field(None, ge=1, description="concurrent shard writers (None: one per Ray node)")
    # The single-writer lock of an object-store output is a lease (a lock object created if absent,
    # renewed every lease/4): a killed run's successor takes it over once it has not been renewed
    # for this long. A local output uses flock, which the kernel releases when the run dies.
    lock_lease_s: float = Field(120.0, ge=1, description="lease of an object-store output's lock (s)")
    # With one writer per node (writers None), the driver looks for nodes that joined the cluster
    # this often and starts their writers (writer.NodeWriters).
    node_poll_s: float = Field(10.0, gt=0, le=600, description="seconds between looks for nodes that joined (writers None)")


class RayConfig(_Section):
    address: str | None = Field(None, description="None: RAY_ADDRESS or an embedded local Ray")
    num_cpus: int | None = Field(None, description="CPUs of an embedded Ray (None = all)")
    detect_actors: int = Field(1, ge=1, description="actor-pool size of the face detection stage (per pool max)")
    detect_num_cpus: float | None = Field(None, gt=0, description="CPUs per detection actor (None: cpus_per_task); "
                                          "also its FFmpeg decoder threads (rounded down, at least 1)")
    cpus_per_task: float = Field(1.0, gt=0)
    # Ray Data's autoscaler grows an actor pool from one actor only while inputs queue in front of it,
    # and on a small node it may never add the second (docs/benchmarks.md): a full pool from the start
    # uses every core at once, and on a cluster puts a pool's actors on several nodes (Ray Data spreads them).
    full_pools: bool = Field(False, description="start each actor pool at its max size instead of one actor")
    # Ray Data dispatches inputs to a pool's actors as they come up (DataContext.wait_for_min_actors_s
    # -1): the first actor up takes the first inputs, and on a cluster their samples all land on its
    # node. With full_pools, each pool waits this long for all its actors before any input is sent
    # (then fails: the cluster lacks the resources for the whole pool) instead of running on a part of it.
    full_pools_wait_s: int = Field(600, ge=1, description="with full_pools: the longest wait for a pool's "
                                                              "actors before its first input")
    object_store_memory: int | None = None
    # Ray Data ships a stage's output rows in blocks of up to this size: the crop stage's rows of one
    # input (every clip's mp4 and audio) are held in its actor, and then in a writer task, one block
    # at a time, so this bounds what a long input costs there (Ray Data's default, 128 MiB, let a
    # 5-minute input's block take ~100 MB more than a 20-second input's; docs/benchmarks.md).
    max_block_mb: int = Field(16, ge=1, description="target size of Ray Data's blocks (MiB)")
    # glibc's mmap threshold in the detect and crop+score actors (malloc.tune_malloc says why): fixed,
    # frame-sized buffers go back to the system when freed and a long input's actor memory stays
    # flat, at ~+25% of the crop+score stage's CPU (page faults); None: glibc's own, which rises.
    malloc_mmap_threshold_kb: int | None = Field(None, ge=0, description="fixed glibc mmap threshold (KiB) in the "
                                                                          "stage actors; None: glibc's dynamic one")
    # The inputs go to Ray in consecutive datasets of at most this many (one input per block in
    # each): Ray Data's driver-side state of a dataset (~11 KB per block, made up front) is freed
    # with it, so it no longer grows with the run. Each dataset starts its actor pools anew: ~5 s
    # of idle workers between datasets on 2 cores, < 2% of a dataset of 10,000 inputs even when
    # every input is a zero-byte file (docs/benchmarks.md, bookkeeping section).
    inputs_per_dataset: int = Field(10_000, ge=1, description="inputs per Ray dataset (bounds the driver's memory)")


class CurateConfig(_Section):
    profile: Profile = "smoke"
    model_dir: str | None = Field(None, description="directory with the full-profile weights")
    probe: ProbeConfig = ProbeConfig()
    detect: DetectConfig = DetectConfig()
    track: TrackConfig = TrackConfig()
    segment: SegmentConfig = SegmentConfig()
    output: OutputConfig = OutputConfig()
    score: ScoreConfig = ScoreConfig()
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    features: FeaturesConfig = FeaturesConfig()
    write: WriteConfig = WriteConfig()
    ray: RayConfig = RayConfig()
    # fsspec options of an object-store output and inputs (endpoint, region, profile, ...), e.g.
    # {"client_kwargs": {"endpoint_url": ...}}; credentials belong in the environment
    # (AWS_ACCESS_KEY_ID, ...). Excluded from dumps: never in run.json or the config fingerprint.
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @property
    def detector_backend(self) -> str:
        if self.detect.backend != "auto":
            return self.detect.backend
        return "mediapipe" if self.profile == "smoke" else "scrfd"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and field."""


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, **overrides) -> CurateConfig:
    """Defaults <- YAML file <- keyword overrides (dotted keys allowed: ``{"segment.min_clip_s": 3}``)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(loaded).__name__}")
        data = loaded
    nested: dict = {}
    for key, value in overrides.items():
        if value is None:
            continue
        cur = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
    data = _deep_merge(data, nested)
    try:
        return CurateConfig.model_validate(data)
    except ValidationError as e:
        where = f" in {path}" if path is not None else ""
        lines = [f"invalid configuration{where}:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
