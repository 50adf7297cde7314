"""Identities across a whole curated dataset: the kept clips' ArcFace embeddings (scores.parquet
``identity_embedding``) clustered by a cosine-similarity threshold graph and its connected components.

Two clips are *linked* when the cosine similarity of their embeddings is at least ``threshold``; an identity
is a connected component of that graph (single linkage: a chain of links joins two clips). Neighbours come
from faiss (``faiss-cpu``):

* ``exact`` (default below ``EXACT_MAX_CLIPS`` clips): ``IndexFlatIP.range_search`` returns every pair above
  the threshold, so the components are the exact components of the threshold graph;
* ``hnsw`` (above it): an ``IndexHNSWFlat`` (inner product) finds each clip's ``k`` nearest neighbours and the
  links among them at or above the threshold are kept. Similarities are exact for the pairs it returns, so it
  never links clips the exact graph does not; it can miss a link (a pair that is not among the k nearest of
  either end, or that the HNSW search does not reach), which can only split a component, never merge two.

The components are connected with ``scipy.sparse.csgraph.connected_components``. Identity ids are numbered
0.. by each identity's smallest sample key, so the same clips and links give the same ids whichever path ran.

Default threshold 0.45: insightface 2.1's own same-person decision for its ArcFace embeddings
(``insightface/app/person/config.py`` ``face_similarity_threshold = .45``; its evaluation GUI decides "Same
Person" at ``DEFAULT_THRESHOLD = 0.4`` in ``gui/core/constants.py``). The IJB-C protocol that insightface's
model zoo reports (TAR at FAR = 1e-4, 1e-5) fixes no threshold; the one that gives a chosen FAR depends on
the model and is measured on labelled pairs. docs/identity.md says what is and is not claimed.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas

DEFAULT_THRESHOLD = 0.45
EXACT_MAX_CLIPS = 50_000  # IndexFlatIP range search is O(N^2 D): ~1.3e12 multiply-adds at 50k clips
HNSW_NEIGHBOURS = 64  # k of the ANN path
HNSW_M = 16  # HNSW graph degree
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
RANGE_BATCH = 4096  # query rows per range_search call (bounds the result buffers)
METHODS = ("auto", "exact", "hnsw")


def normalised_embeddings(embeddings) -> np.ndarray:
    """[N, D] float32, C-contiguous, rows L2-normalised (fp16 storage rounding moves the norm slightly)."""
    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"expected embeddings [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} embedding(s) are all zeros")
    return np.ascontiguousarray(x / norms)


def exact_links(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j), i != j, with cosine >= threshold: faiss IndexFlatIP range search in batches.
    faiss keeps inner products strictly above the radius, so the radius is the float just below."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    rows, cols = [], []
    for start in range(0, len(x), RANGE_BATCH):
        lims, sims, ids = index.range_search(x[start:start + RANGE_BATCH], radius)
        counts = np.diff(lims).astype(np.int64)
        q = np.repeat(np.arange(start, start + len(counts)), counts)
        keep = (ids != q) & (sims >= threshold)
        rows.append(q[keep])
        cols.append(ids[keep].astype(np.int64))
    return np.concatenate(rows), np.concatenate(cols)


def hnsw_links(x: np.ndarray, threshold: float, k: int = HNSW_NEIGHBOURS, m: int = HNSW_M,
               ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH
               ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) among each clip's k approximate nearest neighbours (faiss HNSW, inner product) whose
    cosine is >= threshold."""
    import faiss

    index = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(x)
    index.hnsw.efSearch = max(ef_search, k)
    kk = min(k + 1, len(x))  # the clip itself is usually its own first neighbour
    sims, ids = index.search(x, kk)
    q = np.repeat(np.arange(len(x)), kk)
    sims, ids = sims.reshape(-1), ids.reshape(-1)
    keep = (ids >= 0) & (ids != q) & (sims >= threshold)
    return q[keep], ids[keep].astype(np.int64)


def components(n: int, rows: np.ndarray, cols: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Connected components of the undirected graph with these links: int64 ids numbered 0.. in the order in
    which ``order`` (default 0..n-1) first meets each component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    order = np.arange(n) if order is None else np.asarray(order)
    seen = labels[order]
    comps, first_pos = np.unique(seen, return_index=True)  # each component's first position in `order`
    remap = np.empty(len(comps), np.int64)
    remap[comps[np.argsort(first_pos)]] = np.arange(len(comps))
    return remap[labels]


def choose_method(n: int, method: str = "auto", exact_max: int = EXACT_MAX_CLIPS) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return ("exact" if n <= exact_max else "hnsw") if method == "auto" else method


def cluster_identities(embeddings, threshold: float = DEFAULT_THRESHOLD, method: str = "auto",
                       order: np.ndarray | None = None, k: int = HNSW_NEIGHBOURS,
                       exact_max: int = EXACT_MAX_CLIPS) -> tuple[np.ndarray, dict]:
    """(identity id per row [N] int64, facts). Ids are numbered by first appearance in ``order`` (e.g. the rows
    sorted by sample key). facts: method, threshold, n_clips, n_identities, n_links, largest."""
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    x = normalised_embeddings(embeddings) if len(embeddings) else np.zeros((0, 1), np.float32)
    n = len(x)
    used = choose_method(n, method, exact_max)
    if n == 0:
        return np.zeros(0, np.int64), {"method": used, "threshold": float(threshold), "n_clips": 0,
                                       "n_identities": 0, "n_links": 0, "largest": 0}
    rows, cols = exact_links(x, threshold) if used == "exact" else hnsw_links(x, threshold, k=k)
    ids = components(n, rows, cols, order)
    sizes = np.bincount(ids)
    n_links = len(np.unique(np.minimum(rows, cols) * n + np.maximum(rows, cols)))  # undirected pairs
    return ids, {"method": used, "threshold": float(threshold), "n_clips": int(n), "n_identities": int(len(sizes)),
                 "n_links": int(n_links), "largest": int(sizes.max())}


def cluster_sizes(ids: np.ndarray) -> np.ndarray:
    """Size of each row's identity [N] int32."""
    ids = np.asarray(ids, np.int64)
    return np.bincount(ids)[ids].astype(np.int32) if len(ids) else np.zeros(0, np.int32)


# ---- identities.parquet of a curated output (jobs/identities.py) -----------------------------------------

IDENTITIES_FILE = "identities.parquet"


class IdentityError(ValueError):
    """The output cannot be clustered (missing table, mixed embedding models, malformed embeddings)."""


def _kept_keys(root) -> list[str]:
    path = root / "manifest.parquet"
    if not path.is_file():
        raise IdentityError(f"{path} is missing: {root} is not a finished curation output")
    return pq.read_table(path, columns=["key"])["key"].to_pylist()


def read_kept_embeddings(root) -> tuple[list[str], np.ndarray, np.ndarray, str | None]:
    """(kept keys sorted, [N, 512] float32 embeddings (zeros where missing), has-embedding mask [N], model id)
    from manifest.parquet (the kept set, as refilter and dedup leave it) and scores.parquet (the embeddings)."""
    root = Path(root)
    keys = sorted(set(_kept_keys(root)))
    path = root / "scores.parquet"
    if not path.is_file():
        raise IdentityError(f"{path} is missing: this output has no stored scores (identity embeddings)")
    names = pq.ParquetFile(path).schema_arrow.names
    if "identity_embedding" not in names:
        raise IdentityError(f"{path} has no identity_embedding column: curated before identity embeddings "
                            "(score.identity); re-run the curation to compute them")
    t = pq.read_table(path, columns=["key", "status", "identity_embedding", "identity_model"])
    t = t.filter(pc.is_in(t["key"], value_set=pa.array(keys, pa.string())))
    t = t.filter(pc.fill_null(pc.equal(t["status"], "kept"), False))
    have = t.filter(pc.is_valid(t["identity_embedding"]))
    models = sorted(set(m for m in have["identity_model"].to_pylist() if m is not None))
    if len(models) > 1:
        raise IdentityError(f"{path}: kept clips were embedded by different models {models}: embeddings of "
                            "different models are not comparable; re-curate with one model")
    emb_col = have["identity_embedding"].combine_chunks()
    lengths = pc.list_value_length(emb_col).to_numpy(zero_copy_only=False)
    from pipeline.faces.arcface import EMBEDDING_DIM

    if len(lengths) and not (lengths == EMBEDDING_DIM).all():
        bad = have["key"][int(np.flatnonzero(lengths != EMBEDDING_DIM)[0])].as_py()
        raise IdentityError(f"{path}: identity_embedding of {bad} has {lengths[lengths != EMBEDDING_DIM][0]} values, "
                            f"expected {EMBEDDING_DIM}")
    flat = pc.list_flatten(emb_col).to_numpy(zero_copy_only=False).astype(np.float32)
    vectors = flat.reshape(len(lengths), EMBEDDING_DIM)
    pos = {k: i for i, k in enumerate(keys)}
    out = np.zeros((len(keys), EMBEDDING_DIM), np.float32)
    mask = np.zeros(len(keys), bool)
    for k, v in zip(have["key"].to_pylist(), vectors):
        out[pos[k]] = v
        mask[pos[k]] = True
    return keys, out, mask, (models[0] if models else None)


def build_identities(root, threshold: float = DEFAULT_THRESHOLD, method: str = "auto", k: int = HNSW_NEIGHBOURS,
                     exact_max: int = EXACT_MAX_CLIPS) -> dict:
    """Cluster the kept clips of the output at ``root`` and write ``root/identities.parquet`` atomically
    (schemas.IDENTITIES_SCHEMA). A kept clip without an embedding (no face with keypoints on the sampled
    frames) is an identity of its own. Returns the facts also stored in the file metadata."""
    from pipeline.shards import atomic_write_bytes

    root = Path(root)
    keys, vectors, mask, model = read_kept_embeddings(root)
    idx = np.flatnonzero(mask)
    ids_emb, facts = cluster_identities(vectors[idx], threshold, method, k=k, exact_max=exact_max)
    ids = np.empty(len(keys), np.int64)
    ids[idx] = ids_emb
    # clips without an embedding: one identity each; ids stay numbered by smallest key over all kept clips
    ids[~mask] = facts["n_identities"] + np.arange(int((~mask).sum()))
    if len(keys):
        ids = _renumber_by_first(ids)
    sizes = cluster_sizes(ids)
    facts.update(n_clips=len(keys), n_identities=int(len(np.unique(ids))), n_without_embedding=int((~mask).sum()),
                 identity_model=model, largest=int(sizes.max()) if len(sizes) else 0)
    table = pa.table({"key": pa.array(keys, pa.string()), "identity_id": pa.array(ids, pa.int64()),
                      "cluster_size": pa.array(sizes, pa.int32()),
                      "identity_model": pa.array([model] * len(keys), pa.string())},
                     schema=schemas.IDENTITIES_SCHEMA)
    meta = {"identity_model": model or "", "threshold": repr(float(threshold)), "facts": json.dumps(facts),
            "schema_version": schemas.SCHEMA_VERSION}
    table = table.replace_schema_metadata({k: v.encode() for k, v in meta.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(root / IDENTITIES_FILE, buf.getvalue())
    return facts


def _renumber_by_first(ids: np.ndarray) -> np.ndarray:
    """Ids 0.. in order of first appearance (rows are sorted by key: numbered by each identity's smallest key)."""
    uniq, first = np.unique(ids, return_index=True)
    remap = np.empty(int(uniq.max()) + 1, np.int64)
    remap[uniq[np.argsort(first)]] = np.arange(len(uniq))
    return remap[ids]


def read_identities(root) -> tuple[pa.Table, dict]:
    """(identities table, its metadata with threshold as float and facts as a dict)."""
    path = Path(root) / IDENTITIES_FILE
    table = pq.read_table(path)
    raw = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    meta = {"identity_model": raw.get("identity_model") or None,
            "threshold": float(raw["threshold"]) if "threshold" in raw else None,
            "facts": json.loads(raw.get("facts", "{}"))}
    return table, meta
