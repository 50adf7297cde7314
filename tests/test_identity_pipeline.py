"""Identity embeddings through the pipeline (smoke profile, real clips): every kept clip is aligned on its 5
FaceMesh keypoints on evenly spaced frames, embedded (the smoke ArcFace stand-in: plumbing only, no accuracy
claimed), averaged and stored in scores.parquet; meta.json names the model but does not repeat the vector;
jobs/identities.py clusters the output. The stored vector is re-derived from the shipped video.mp4."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import real_path
from derived_clips import load_real, write
from pipeline.config import load_config
from pipeline.inputs import expand_inputs
from pipeline.runner import run_curation

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 3.3
pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("identity_in")
    frames, audio = load_real(real_path("wda_aoc_000.mp4"), SECONDS)
    write(d / "aoc.mp4", frames, audio)
    (d / "aoc_reupload.mp4").write_bytes((d / "aoc.mp4").read_bytes())  # the same clip under another id
    frames, audio = load_real(real_path("edtalk_obama.mp4"), SECONDS)
    write(d / "obama.mp4", frames, audio)
    out = tmp_path_factory.mktemp("identity_out")
    run_curation(expand_inputs([str(d)]), out, load_config(None, **{"features.enabled": False}), progress_every_s=60)
    return out


def _shard_members(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, member = m.name.split(".", 1)
                samples.setdefault(key, {})[member] = tf.extractfile(m).read()
    return samples


def test_every_kept_clip_is_embedded_and_stored(identity_run):
    from pipeline.faces.arcface import SMOKE_MODEL_ID

    scores = pq.read_table(identity_run / "scores.parquet")
    assert str(scores.schema.field("identity_embedding").type) == "list<element: halffloat>"
    kept = [r for r in scores.to_pylist() if r["status"] == "kept"]
    manifest = pq.read_table(identity_run / "manifest.parquet")["key"].to_pylist()
    assert sorted(r["key"] for r in kept) == sorted(manifest) and len(manifest) >= 3
    for r in kept:
        e = np.asarray(r["identity_embedding"], np.float32)
        assert e.shape == (512,) and np.isfinite(e).all(), r["key"]
        assert abs(float(np.linalg.norm(e)) - 1.0) < 2e-3, r["key"]  # L2-normalised, then fp16
        assert np.array_equal(e, e.astype(np.float16).astype(np.float32))
        assert r["identity_model"] == SMOKE_MODEL_ID


def test_meta_json_names_the_model_without_the_vector(identity_run):
    samples = _shard_members(identity_run)
    assert samples
    for key, members in samples.items():
        meta = json.loads(members["meta.json"])
        assert "identity_embedding" not in meta["scores"], key
        assert meta["scores"]["identity_model"] == meta["models"]["identity"] == "smoke-random-arcface"
        frames = meta["score_details"]["identity"]["frames"]
        n = meta["clip"]["n_frames"]
        assert len(frames) == 5 and frames[0] == 0 and frames[-1] <= n - 1, (key, frames)


def test_stored_vector_is_rederived_from_the_shipped_video(identity_run):
    """Align + embed the frames meta.json lists, decoded from video.mp4 (H.264 at crf 18 after the pipeline
    embedded the frames it encoded): the same vector up to compression noise."""
    from pipeline.faces.arcface import ArcFace, clip_embedding
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector
    from pipeline.media import read_clip

    stored = {r["key"]: np.asarray(r["identity_embedding"], np.float32)
              for r in pq.read_table(identity_run / "scores.parquet").to_pylist() if r["status"] == "kept"}
    model, detector = ArcFace.smoke(), MediaPipeFaceDetector(landmarks=True, ranges="short")
    sims = []
    for key, members in _shard_members(identity_run).items():
        meta = json.loads(members["meta.json"])
        frames, _, _ = read_clip(members["video.mp4"])
        crops = []
        for i in meta["score_details"]["identity"]["frames"]:
            faces = detector.detect(frames[i])
            face = min(faces, key=lambda f: (f.center[0] - 256) ** 2 + (f.center[1] - 256) ** 2)
            crops.append(model.align(frames[i], face.kps5))
        sims.append(float(clip_embedding(model.embed(crops)) @ stored[key]))
    assert min(sims) > 0.99, sims


def test_identities_job_on_the_curated_output(identity_run):
    from pipeline.identity import read_identities

    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "identities.py"), str(identity_run)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    table, meta = read_identities(identity_run)
    rows = table.to_pylist()
    manifest = pq.read_table(identity_run / "manifest.parquet")["key"].to_pylist()
    assert sorted(x["key"] for x in rows) == sorted(manifest)
    assert meta["identity_model"] == "smoke-random-arcface" and meta["threshold"] == 0.45
    # the re-upload is the same frames: identical embeddings, so the same identity (this holds for any model)
    by_video: dict[str, set] = {}
    for x in rows:
        by_video.setdefault(x["key"].rsplit("_", 1)[0], set()).add(x["identity_id"])
    aoc = [v for k, v in by_video.items() if k.startswith("aoc") and "reupload" not in k]
    reup = [v for k, v in by_video.items() if "reupload" in k]
    assert aoc and reup and aoc[0] == reup[0], by_video
    assert all(x["cluster_size"] == sum(y["identity_id"] == x["identity_id"] for y in rows) for x in rows)


def test_full_profile_aligns_on_scrfd_kps5(tmp_path):
    """In `full` the 5 keypoints come from the profile's detector (SCRFD, here a stand-in with SCRFD's signature
    planting known keypoints), not FaceMesh; frames are evenly spaced and the stored vector is their mean."""
    import av

    from pipeline.clip_scores import ClipObserver
    from pipeline.faces.arcface import ArcFace, clip_embedding
    from pipeline.faces.mediapipe_backend import MediaPipeFaceDetector
    from pipeline.faces.scrfd import ScrfdDetector
    from pipeline.segment import CandidateClip
    from test_scrfd import KPS, FakeScrfd
    from test_scrfd import export as export_scrfd

    scrfd = ScrfdDetector(export_scrfd(FakeScrfd(), tmp_path / "scrfd_standin.onnx"))  # det_10g.onnx is pinned
    with av.open(str(real_path("wda_aoc_000.mp4"))) as c:  # 512 x 512: the crop stage's frames
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(21), c.decode(video=0))]
    clip = CandidateClip(clip_index=0, track_id=0, shot_index=0, start_s=0.0, n_frames=21, crop_x0=0.0, crop_y0=0.0,
                         crop_size=512.0, crop_scale=2.0, face_size_px=200.0, padded=False, max_faces=1)
    model = ArcFace.smoke()
    obs = ClipObserver(clip, MediaPipeFaceDetector(landmarks=True, ranges="short"), 224, box_detector=scrfd,
                       identity=model, identity_frames=5)
    for f in frames:
        obs.observe(f)
    scores, detail = obs._identity_scores()
    assert detail["frames"] == [0, 5, 10, 15, 20]
    kps = KPS / (640 / 512)  # the stand-in's planted keypoints in 512-frame pixels (letterbox scale 1.25)
    expected = clip_embedding(model.embed([model.align(frames[i], kps) for i in detail["frames"]]))
    got = np.asarray(scores["identity_embedding"], np.float32)
    np.testing.assert_allclose(got, expected.astype(np.float16).astype(np.float32), atol=0)
    facemesh = clip_embedding(model.embed([model.align(frames[i], obs.landmarks[i][[468, 473, 1, 61, 291], :2])
                                           for i in detail["frames"]]))
    assert float(facemesh @ got) < 0.9999  # FaceMesh's points would give another vector


def test_report_shows_identity_counts(identity_run, tmp_path):
    from pipeline.identity import build_identities
    from pipeline.report import build_report, validate_stats

    facts = build_identities(identity_run)
    stats = build_report(identity_run, out=tmp_path / "report", kept_thumbs=1, reject_reasons=1, per_reason=1)
    validate_stats(json.loads((tmp_path / "report" / "stats.json").read_text()))
    ident = stats["identities"]
    assert ident["present"] and ident["n_clips"] == facts["n_clips"] and ident["n_identities"] == facts["n_identities"]
    assert sum(b["clips"] for b in ident["histogram"]) == ident["n_clips"]
    assert sum(b["identities"] for b in ident["histogram"]) == ident["n_identities"]
    assert ident["threshold"] == 0.45 and ident["kept_not_in_file"] == 0 == ident["in_file_not_kept"]
    html = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Identities</h2>" in html and "Clips per identity" in html
    assert "## Identities" in (tmp_path / "report" / "report.md").read_text()
