"""The versioned data contract between the curation job, the stats report and the trainer.

Everything a reader may rely on is declared here: the sample members of a shard, the JSON
Schema of ``meta.json``, the layout of ``index.json`` and the Arrow schemas of the parquet
tables. Every output records ``SCHEMA_VERSION``; readers refuse versions they do not know.
The rows of the tables and the member lists are built by the constructors of
``schemas/records.py``, checked against these schemas.

Version rules: the major number changes when a reader written for the old version would
misread the new data (renamed/removed member or column, changed dtype or units); the minor
number changes when members or columns are only added.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = "2.1"
# 2.1 only adds scores columns (quality, identity, duplicate signatures) and the identities /
# duplicates tables: a 2.0 output reads the same, its missing scores skipped by refilter.
SUPPORTED_SCHEMA_VERSIONS = ("2.0", "2.1")

# What each major version changed for readers, so a refusal can say why (docs/loader.md).
MAJOR_CHANGES = {
    "2.0": "latent.npy holds the posterior mean only ([T,4,64,64]; [T,8,64,64] mean+std with "
           "features.vae_store_std), encoded in fp32; motion.npy has 4 columns (raw px^2 and "
           "face-size-normalised, DWPose-score gated, NaN where not measurable) instead of 2",
}


def version_refusal(version, where: str) -> str | None:
    """None when ``version`` is readable here, else a message naming ``where`` (an index or shard),
    its version, the supported versions and what changed."""
    if version in SUPPORTED_SCHEMA_VERSIONS:
        return None
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = None
    supported = ", ".join(SUPPORTED_SCHEMA_VERSIONS)
    newest = max(int(v.split(".")[0]) for v in SUPPORTED_SCHEMA_VERSIONS)
    if major is not None and major < newest:
        changes = "; ".join(f"{v}: {c}" for v, c in MAJOR_CHANGES.items() if int(v.split(".")[0]) > major)
        return (f"{where} has schema version {version!r}, older than this reader understands (supported: "
                f"{supported}). Changed since: {changes}. Re-run the curation features stage to rewrite it.")
    return (f"{where} has schema version {version!r}, which this reader does not know (supported: {supported}). "
            "Upgrade the code or re-curate.")

# Sample keys name tar members ("{key}.{member}"); webdataset splits the key at the first dot,
# so keys may not contain one. Format: "{video_id}_{clip:04d}".
SAMPLE_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")

INDEX_KIND = "wids-shard-index-v1"  # index.json is a superset of the wids shard index
SHARD_NAME_FORMAT = "shard-{:06d}.tar"
SHARD_DIR = "shards"


@dataclass(frozen=True)
class Member:
    name: str  # the tar member suffix after "{key}."
    required: bool
    dtype: str | None  # numpy dtype for .npy members
    shape: str  # symbolic shape, T = number of 25 fps frames of the clip
    description: str


# The members of one sample. Members produced by later stages are optional in this version:
# a shard states which ones it carries in meta.json["members"].
MEMBERS: dict[str, Member] = {
    m.name: m
    for m in [
        Member("video.mp4", True, None, "",
               "the 512x512 25 fps H.264 crop with its 16 kHz mono AAC audio; time 0 = first frame"),
        Member("meta.json", True, None, "", "sample metadata, see meta.schema.json"),
        Member("latent.npy", False, "float16", "[T,C,64,64]",
               "SD VAE posterior mean of every frame, unscaled, encoded in fp32: C = 4 (default), or C = 8 "
               "with the posterior std in channels 4..7 (features.vae_store_std; meta features.latent_layout)"),
        Member("audio.npy", False, "float16", "[T,L,D]",
               "wav2vec2 hidden states in fp32 (L = transformer layers + 1: index 0 = feature projection + "
               "positional conv; meta features.audio_layers / audio_layer0_included), 50 Hz rows averaged in "
               "pairs to one row per frame (meta features.audio_resampling)"),
        Member("kps.npy", False, "float32", "[T,68,3]",
               "DWPose face keypoints (whole-body indices 23..90) x, y in 512-crop pixels and score"),
        Member("motion.npy", False, "float32", "[T-W+1,4]",
               "per window start (Loopy 3.5, W=12): head-motion and expression variance in px^2, then both "
               "divided by the clip's face size^2 (columns MOTION_COLUMNS); DWPose-score gated, NaN where "
               "a window has too few valid keypoints"),
    ]
}

# Columns of motion.npy; the trainer reads the normalised ones.
MOTION_COLUMNS = ("head_var_px2", "expression_var_px2", "head_var_norm", "expression_var_norm")

PROFILES = ("smoke", "full")


@lru_cache(maxsize=None)
def meta_json_schema() -> dict:
    return json.loads((Path(__file__).with_name("meta.schema.json")).read_text())


@lru_cache(maxsize=None)
def index_json_schema() -> dict:
    return json.loads((Path(__file__).with_name("index.schema.json")).read_text())


@lru_cache(maxsize=None)
def _validator(name: str):
    """One checked validator per schema: jsonschema.validate checks the schema itself against its
    metaschema on every call (~0.1 s), which at one call per kept clip was the driver's main cost."""
    import jsonschema

    schema = {"meta": meta_json_schema, "index": index_json_schema}[name]()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _validate(name: str, instance: dict) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(instance))  # what jsonschema.validate raises
    if error is not None:
        raise error


def validate_meta(meta: dict) -> None:
    """Raise jsonschema.ValidationError when ``meta`` breaks the contract."""
    _validate("meta", meta)


def validate_index(index: dict) -> None:
    _validate("index", index)


# ---- parquet tables ---------------------------------------------------------------------

# One row per kept clip (= per sample in the shards).
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("video_id", pa.string()),
    ("clip_index", pa.int32()),
    ("uri", pa.string()),
    ("source", pa.string()),
    ("shard", pa.string()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("duration_s", pa.float64()),
    ("n_frames", pa.int32()),
    ("track_id", pa.int32()),
    ("crop_x0", pa.float64()),
    ("crop_y0", pa.float64()),
    ("crop_size", pa.float64()),
    ("face_size_px", pa.float64()),
    ("sample_bytes", pa.int64()),
    ("profile", pa.string()),
])

# One row per rejected video (clip_index = -1) or rejected candidate clip (clip_index >= 0).
REJECTS_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("video_id", pa.string()),
    ("clip_index", pa.int32()),
    ("key", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("rule", pa.string()),
    ("value", pa.float64()),
    ("threshold", pa.float64()),
    ("detail", pa.string()),
    ("duration_s", pa.float64()),
    ("source", pa.string()),
])

# One row per input file: its single outcome (every input appears exactly once).
VIDEOS_SCHEMA = pa.schema([
    ("uri", pa.string()), ("video_id", pa.string()), ("source", pa.string()),
    ("status", pa.string()),  # "kept" (>= 1 clip in the manifest) or "rejected"
    ("stage", pa.string()), ("reason", pa.string()),
    ("n_candidates", pa.int32()), ("n_kept", pa.int32()), ("n_rejected_clips", pa.int32()),
    ("duration_s", pa.float64()),
    ("timings", pa.string()),  # JSON: stage -> seconds spent on this input
    # JSON: {"audio_spans_s": [[start, end], ...] | null, "damaged": [{"stream", "start_s", "end_s"}], ...}
    # where the source has sound and which ranges bad packets cost (null when not analysed)
    ("coverage", pa.string()),
])

# One row per scored candidate clip, kept or not: every score, so thresholds can change later
# (jobs/refilter.py) without decoding video or running a model. Score columns are null when the
# stage that computes them did not run for the clip (e.g. rejected earlier).
SCORES_SCHEMA = pa.schema([
    ("key", pa.string()), ("video_id", pa.string()), ("clip_index", pa.int32()), ("uri", pa.string()),
    ("source", pa.string()), ("track_id", pa.int32()), ("start_s", pa.float64()), ("duration_s", pa.float64()),
    ("status", pa.string()),  # "kept" | "rejected"
    ("reject_stage", pa.string()), ("reject_reason", pa.string()),
    ("features_computed", pa.bool_()),  # false: refilter cannot admit it without a rerun
    # lip sync (joonson/syncnet_python definitions)
    ("sync_conf", pa.float64()), ("sync_dist", pa.float64()), ("sync_offset", pa.int32()),
    ("sync_conf_frame_mean", pa.float64()), ("sync_conf_frame_p10", pa.float64()),
    ("sync_weights", pa.string()),  # "syncnet_v2" or "smoke-random": smoke scores are not filtered on
    ("audio_shift_s", pa.float64()),
    # speech
    ("speech_ratio", pa.float64()), ("loudness_dbfs", pa.float64()), ("mouth_activity", pa.float64()),
    # head pose (degrees) and movement
    ("yaw_mean", pa.float64()), ("pitch_mean", pa.float64()), ("roll_mean", pa.float64()),
    ("yaw_abs_max", pa.float64()), ("pitch_abs_max", pa.float64()), ("roll_abs_max", pa.float64()),
    # 95th percentile of |angle| over the clip: what the pose rules use (the max stays recorded)
    ("yaw_abs_p95", pa.float64()), ("pitch_abs_p95", pa.float64()), ("roll_abs_p95", pa.float64()),
    ("yaw_range", pa.float64()), ("pitch_range", pa.float64()), ("roll_range", pa.float64()),
    ("head_translation", pa.float64()), ("head_scale_change", pa.float64()),
    # completeness and faces
    ("complete_frac", pa.float64()), ("face_size_px", pa.float64()), ("n_faces_max", pa.int32()),
    ("pad_frac", pa.float64()),  # share of the crop outside the active picture (pipeline/geometry.py)
    ("other_faces", pa.bool_()),
    # Loopy 3.5 motion statistics (features stage)
    ("head_motion_var_mean", pa.float64()), ("expression_var_mean", pa.float64()),
    # face identity (docs/identity.md): ArcFace embedding of the clip, 512 fp16 values, L2-normalised mean of
    # the L2-normalised embeddings of a few evenly spaced frames; null when not computed
    ("identity_embedding", pa.list_(pa.float16())), ("identity_model", pa.string()),
    # technical quality (pipeline/scoring/quality.py): Laplacian variance of the face at 128 px,
    # 8x8 blockiness (B/A) and Wang-Sheikh-Bovik JPEG quality on the source grid, source video
    # bits per pixel per frame, shares of clipped face pixels (luma <= 5, >= 250)
    ("sharpness", pa.float64()), ("blockiness", pa.float64()), ("wsb_quality", pa.float64()),
    ("bpp", pa.float64()), ("shadow_clip_frac", pa.float64()), ("highlight_clip_frac", pa.float64()),
    ("learned_iqa", pa.float64()),  # optional learned model (score.learned_iqa; null when off)
    # near-duplicate signatures (pipeline/scoring/fingerprint.py, docs/dedup.md): imagehash phash of
    # 5 evenly spaced output frames and of the same frames mirrored (64 bits as int64), and the
    # Haitsma-Kalker audio fingerprint (base64 of little-endian uint32 sub-fingerprints, 11.6 ms each)
    ("phash", pa.list_(pa.int64())), ("phash_mirrored", pa.list_(pa.int64())),
    ("audio_fingerprint", pa.string()),
    # jobs/dedup.py: the kept clip this one duplicates (null: none); refilter re-decides it from
    # duplicates.parquet and filters.dedup
    ("duplicate_of", pa.string()),
])
# Scores columns kept out of meta.json's "scores" (too wide to repeat in every sample): scores.parquet only.
# The identity embedding (~7 KB as JSON) and the near-duplicate signatures (~14 KB for a 30 s clip)
# are read from scores.parquet by jobs/identities.py and jobs/dedup.py, never from a sample.
SCORES_ONLY_COLUMNS = ("identity_embedding", "phash", "phash_mirrored", "audio_fingerprint")

# identities.parquet at the output root (jobs/identities.py): one row per kept clip, its identity cluster.
# File metadata (bytes keys): identity_model, threshold, method, n_clips, n_identities, ...
IDENTITIES_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("identity_id", pa.int64()),  # 0..n_identities-1, numbered by each identity's smallest key
    ("cluster_size", pa.int32()),  # kept clips of that identity in this file
    ("identity_model", pa.string()),  # the embedding model (scores identity_model)
])

TABLE_SCHEMAS = {"manifest.parquet": MANIFEST_SCHEMA, "rejects.parquet": REJECTS_SCHEMA,
                 "videos.parquet": VIDEOS_SCHEMA, "scores.parquet": SCORES_SCHEMA,
                 "identities.parquet": IDENTITIES_SCHEMA}


def conform_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema``'s columns; missing fields become nulls."""
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.table(columns, schema=schema)


def check_table(table: pa.Table, schema: pa.Schema) -> None:
    """Raise ValueError when ``table`` lacks a column of ``schema`` or has another type."""
    for f in schema:
        if f.name not in table.column_names:
            raise ValueError(f"missing column {f.name!r}")
        got = table.schema.field(f.name).type
        if got != f.type:
            raise ValueError(f"column {f.name!r} has type {got}, expected {f.type}")
