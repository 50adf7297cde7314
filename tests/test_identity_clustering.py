"""Identity clustering (pipeline/identity.py, jobs/identities.py) on embeddings with a known structure:
50 identities with 1..40 clips each, every clip at a known cosine from its identity's centre, plus
singletons; the threshold graph's components must be exactly the identities, on the exact (IndexFlatIP range
search) and the ANN (HNSW) path alike."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipeline import identity

ROOT = Path(__file__).resolve().parents[1]
D = 512


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _at_cosine(rng, centre, cos):
    """A unit vector at exactly cosine ``cos`` from the unit vector ``centre``, in a random direction."""
    u = rng.standard_normal(centre.shape)
    u = _unit(u - (u @ centre) * centre)
    return cos * centre + np.sqrt(1 - cos ** 2) * u


def known_structure(seed=0, n_identities=50, n_singletons=30, clip_cos=0.8):
    """(embeddings [N, 512] float32 in shuffled order, true identity per row). Two clips of one identity are
    at cosine ~clip_cos^2 = 0.64 (> 0.45); clips of different identities near 0 (random 512-d directions)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 41, n_identities)
    counts[:3] = (40, 1, 2)
    centres = _unit(rng.standard_normal((n_identities + n_singletons, D)))
    rows, truth = [], []
    for i, c in enumerate(counts):
        for _ in range(c):
            rows.append(_at_cosine(rng, centres[i], clip_cos))
            truth.append(i)
    for j in range(n_singletons):
        rows.append(centres[n_identities + j])
        truth.append(n_identities + j)
    perm = rng.permutation(len(rows))
    return np.asarray(rows, np.float32)[perm], np.asarray(truth)[perm]


def same_partition(a, b) -> bool:
    """True when the two labelings group the rows identically (labels may differ)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.fixture(scope="module")
def data():
    return known_structure()


def test_exact_recovers_the_identities(data):
    x, truth = data
    ids, facts = identity.cluster_identities(x, threshold=0.45, method="exact")
    assert facts["method"] == "exact" and facts["n_identities"] == len(set(truth)) == 80
    assert same_partition(ids, truth)
    # sizes per row equal the true identity sizes
    np.testing.assert_array_equal(identity.cluster_sizes(ids), np.bincount(truth)[truth])
    # the margin is real: within-identity pairs ~0.64, across identities < 0.3
    xs = _unit(x.astype(np.float64))
    sims = xs @ xs.T
    same = truth[:, None] == truth[None, :]
    np.fill_diagonal(same, False)
    assert sims[same].min() > 0.5 and sims[~same & ~np.eye(len(x), dtype=bool)].max() < 0.3


def test_hnsw_equals_exact(data):
    x, truth = data
    exact, _ = identity.cluster_identities(x, threshold=0.45, method="exact")
    ann, facts = identity.cluster_identities(x, threshold=0.45, method="hnsw", k=16)
    assert facts["method"] == "hnsw"
    np.testing.assert_array_equal(ann, exact)  # same components, same numbering (by first row)
    # auto switches to HNSW above exact_max and still gives the same answer
    auto, facts = identity.cluster_identities(x, threshold=0.45, exact_max=100)
    assert facts["method"] == "hnsw"
    np.testing.assert_array_equal(auto, exact)


def test_identity_larger_than_k_stays_one(data):
    """An identity of 150 clips with k = 8 neighbours per clip: still one component on the HNSW path."""
    rng = np.random.default_rng(3)
    centre = _unit(rng.standard_normal(D))
    x = np.stack([_at_cosine(rng, centre, 0.8) for _ in range(150)] +
                 [_unit(rng.standard_normal(D)) for _ in range(20)]).astype(np.float32)
    ids, facts = identity.cluster_identities(x, threshold=0.45, method="hnsw", k=8)
    assert len(set(ids[:150].tolist())) == 1 and facts["n_identities"] == 21


@pytest.mark.parametrize("method", ["exact", "hnsw"])
def test_threshold_is_inclusive_and_chains(method):
    """Links at cosine >= threshold join clips, also through a chain (single linkage); 0.44 does not link."""
    rng = np.random.default_rng(1)
    a = _unit(rng.standard_normal(D))
    b = _at_cosine(rng, a, 0.5)  # a-b linked at 0.45
    # c at exactly 0.45 from b and far from a: joins a through b
    u = rng.standard_normal(D)
    u -= (u @ a) * a + (u @ _unit(b - (b @ a) * a)) * _unit(b - (b @ a) * a)
    c = 0.45 * b + np.sqrt(1 - 0.45 ** 2) * _unit(u)
    d = _at_cosine(rng, a, 0.44)  # below the threshold from a, far from b and c
    x = np.stack([a, b, c, d]).astype(np.float32)
    sims = _unit(x.astype(np.float64)) @ _unit(x.astype(np.float64)).T
    assert sims[0, 2] < 0.45 and sims[1, 3] < 0.45 and sims[2, 3] < 0.45
    ids, _ = identity.cluster_identities(x.astype(np.float32), threshold=np.float32(sims[1, 2]) - 1e-7, method=method)
    assert ids.tolist() == [0, 0, 0, 1]
    ids, _ = identity.cluster_identities(x, threshold=0.6, method=method)
    assert ids.tolist() == [0, 1, 2, 3]
    # inclusive: an exactly representable cosine of 0.5 links at threshold 0.5, not just above it
    x = np.array([[1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [0, 0, 0, 1]], np.float32)
    assert identity.cluster_identities(x, threshold=0.5, method=method)[0].tolist() == [0, 0, 0]
    assert identity.cluster_identities(x, threshold=0.5000001, method=method)[0].tolist() == [0, 1, 2]


def test_bad_inputs():
    with pytest.raises(ValueError, match="threshold"):
        identity.cluster_identities(np.eye(3, dtype=np.float32), threshold=1.5)
    with pytest.raises(ValueError, match="zeros"):
        identity.cluster_identities(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="method"):
        identity.cluster_identities(np.eye(3, dtype=np.float32), method="kmeans")


# ---- identities.parquet from a curated output's tables -----------------------------------------------------


def _fake_output(root: Path, x: np.ndarray, missing: int = 2, rejected: int = 3, model="insightface:w600k_r50.onnx"):
    """manifest.parquet + scores.parquet of an output whose kept clips carry the embeddings ``x`` (fp16, as the
    pipeline stores them), ``missing`` kept clips without an embedding and ``rejected`` rejected clips."""
    n = len(x)
    keys = [f"vid{i:05d}_0000" for i in range(n + missing + rejected)]
    kept = keys[:n + missing]
    manifest = [{"key": k, "video_id": k[:8], "clip_index": 0} for k in kept]
    pq.write_table(schemas.conform_table(manifest, schemas.MANIFEST_SCHEMA), root / "manifest.parquet")
    emb = [list(map(float, v.astype(np.float16))) for v in x] + [None] * missing + \
          [list(map(float, v.astype(np.float16))) for v in x[:rejected]]
    scores = [{"key": k, "status": "kept" if k in kept else "rejected", "identity_embedding": e,
               "identity_model": model if e is not None else None} for k, e in zip(keys, emb)]
    pq.write_table(schemas.conform_table(scores, schemas.SCORES_SCHEMA), root / "scores.parquet")
    return keys, kept


def test_identities_parquet_written_and_readable(tmp_path, data):
    x, truth = data
    keys, kept = _fake_output(tmp_path, x)
    facts = identity.build_identities(tmp_path, threshold=0.45)
    table, meta = identity.read_identities(tmp_path)
    assert table.schema.remove_metadata().equals(schemas.IDENTITIES_SCHEMA)
    assert table.column_names == ["key", "identity_id", "cluster_size", "identity_model"]
    assert table["key"].to_pylist() == sorted(kept)  # every kept clip once, rejected clips not at all
    assert meta["threshold"] == 0.45 and meta["identity_model"] == "insightface:w600k_r50.onnx"
    assert meta["facts"]["n_without_embedding"] == 2 and meta["facts"]["method"] == "exact"
    rows = {r["key"]: r for r in table.to_pylist()}
    got = np.array([rows[k]["identity_id"] for k in kept[:len(x)]])
    assert same_partition(got, truth)  # fp16 storage does not change the identities
    assert [rows[k]["cluster_size"] for k in kept[len(x):]] == [1, 1]  # no embedding: an identity of its own
    assert facts["n_identities"] == 80 + 2 == len(set(table["identity_id"].to_pylist()))
    ids = table["identity_id"].to_numpy()
    assert ids.min() == 0 and ids.max() == facts["n_identities"] - 1
    first_seen = list(dict.fromkeys(ids.tolist()))  # rows are sorted by key: ids numbered by smallest key
    assert first_seen == sorted(first_seen)
    sizes = np.bincount(ids)
    assert table["cluster_size"].to_numpy().tolist() == sizes[ids].tolist()
    assert not list(tmp_path.glob(".identities.parquet.tmp*"))  # written through a temp file + rename


def test_mixed_models_are_refused(tmp_path, data):
    x, _ = data
    _fake_output(tmp_path, x[:4], missing=0, rejected=0)
    t = pq.read_table(tmp_path / "scores.parquet")
    models = t["identity_model"].to_pylist()
    models[0] = "smoke-random-arcface"
    t = t.set_column(t.column_names.index("identity_model"), "identity_model", pa.array(models, pa.string()))
    pq.write_table(t, tmp_path / "scores.parquet")
    with pytest.raises(identity.IdentityError, match="different models"):
        identity.build_identities(tmp_path)


def test_cli(tmp_path, data):
    x, truth = data
    _fake_output(tmp_path, x[:200], missing=1, rejected=0)
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "identities.py"), str(tmp_path), "--method", "hnsw"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "201 kept clips" in r.stdout and "hnsw" in r.stdout
    table, meta = identity.read_identities(tmp_path)
    assert table.num_rows == 201 and meta["facts"]["method"] == "hnsw"
    assert meta["facts"]["n_identities"] == len(set(truth[:200].tolist())) + 1
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "identities.py"), str(tmp_path / "nowhere")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "nowhere" in bad.stderr
    (tmp_path / "scores.parquet").unlink()
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "identities.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "scores.parquet is missing" in bad.stderr
