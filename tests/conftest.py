"""Shared fixtures. Real clips are read from ../shared/data/real (tests skip when absent)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_DIR = Path(os.environ.get("REAL_DATA_DIR", ROOT.parent / "shared" / "data" / "real"))

KEEP_CLIPS = ["wda_aoc_000.mp4", "retalking_face1_vfr30.mp4", "retalking_face2.mp4", "edtalk_obama.mp4"]
VFR_MARKERS_S = (1.0, 2.6, 4.2)


def real_path(name: str) -> Path:
    p = REAL_DIR / name
    if not p.exists():
        pytest.skip(f"real test clip {p} is absent")
    return p


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # address="local": a new instance, never the cluster another process last started here
        # (ray.init's default attaches to it: /tmp/ray/ray_current_cluster)
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024 * 1024,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


def read_samples(out: Path) -> tuple[dict, dict[str, dict[str, bytes]]]:
    """(index.json, key -> {member: bytes}) of a curation output, read from its shards."""
    import json
    import tarfile

    index = json.loads((out / "index.json").read_text())
    samples: dict[str, dict] = {}
    for entry in index["shardlist"]:
        with tarfile.open(out / entry["url"]) as tar:
            for m in tar.getmembers():
                key, member = m.name.split(".", 1)
                samples.setdefault(key, {})[member] = tar.extractfile(m).read()
    return index, samples


def make_truncated_faststart(path: Path) -> Path:
    """An MP4 whose index is at the front but whose data stops a third of the way in."""
    from pipeline.media import encode_clip

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (100, 64, 64, 3), dtype=np.uint8)
    data = encode_clip(frames, np.zeros(100 * 640, np.float32))
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.fixture(scope="session")
def real_inputs(tmp_path_factory) -> Path:
    """The real clips plus the bad inputs a crawl always contains, and a VFR timing-marker clip."""
    if not REAL_DIR.exists():
        pytest.skip(f"{REAL_DIR} is absent")
    from pipeline.demo import make_talking_head

    d = tmp_path_factory.mktemp("real_inputs")
    for p in sorted(REAL_DIR.iterdir()):
        if p.suffix in (".mp4", ".wav"):
            (d / p.name).symlink_to(p)
    (d / "notes.txt").write_text("this is not a video\n")
    (d / "truncated_moov_missing.mp4").write_bytes((REAL_DIR / "retalking_face2.mp4").read_bytes()[:300_000])
    make_truncated_faststart(d / "truncated_faststart.mp4")
    make_talking_head(d / "synthetic_vfr_markers.mp4", duration_s=5.4, fps=30, vfr=True, markers_s=VFR_MARKERS_S,
                      audio_rate=48000, seed=3)
    return d


@pytest.fixture(scope="session")
def real_run(real_inputs, tmp_path_factory, ray_local):
    """One smoke-profile curation of the real inputs, shared by the checks that read it."""
    from pipeline.config import load_config
    from pipeline.inputs import expand_inputs
    from pipeline.runner import run_curation

    out = tmp_path_factory.mktemp("real_out")
    items = expand_inputs([str(real_inputs)])
    # Training features are checked on short synthetic clips (test_features_pipeline.py); on 2 CPU
    # cores the smoke VAE runs ~6 frames/s, too slow for the ~70 s of real video here.
    config = load_config(None, **{"write.shard_max_bytes": 3 * 1024 * 1024, "features.enabled": False})
    summary = run_curation(items, out, config, progress_every_s=30)
    return {"out": out, "items": items, "summary": summary, "config": config, "inputs": real_inputs}


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 API on 127.0.0.1 with a bucket "out" (tests/moto_s3.py), for the whole session."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    from moto_s3 import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty output store: a local directory, then a prefix of the S3 API on loopback."""
    from pipeline.store import open_store

    if request.param == "local":
        return open_store(tmp_path / "out")
    from moto_s3 import s3_options

    endpoint = request.getfixturevalue("s3_endpoint")
    return open_store(f"s3://out/{request.node.name.replace('[', '-').rstrip(']')}", s3_options(endpoint))
