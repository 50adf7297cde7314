"""Near-duplicate groups across a whole curation output, on Ray Data (docs/dedup.md).

Signals, all read from scores.parquet (no video is decoded): the Haitsma-Kalker audio fingerprint,
the perceptual hashes of a few frames (as stored and mirrored), and, when the column exists, the
identity embedding. Two clips are duplicates when

- their audio is the same (bit error rate <= ``audio_ber_max`` over an aligned overlap of at least
  ~3 s and half the shorter clip) AND their pictures agree (phash within ``phash_max_bits``, either
  orientation) or their identities agree (cosine >= ``identity_cos_min``); or
- without the audio (re-dubbed), their pictures are near-identical (``visual_only_phash_max_bits``)
  AND their identities agree: with no identity column a visual match alone is never enough (two
  clips of one static studio shot look alike while saying different things).

Candidate pairs never come from all pairs: each clip emits bucket keys (winnowed sub-fingerprint
values, the lookup of Haitsma & Kalker section 4.3, and LSH bands of every frame hash), the keys are
grouped (a shuffle), and only clips sharing a bucket become candidates; buckets larger than
``max_bucket`` are skipped. Candidates meet their signatures through two more groupbys (a join
expressed as shuffles), are verified in parallel, and the verified edges are joined into groups
with union-find on the driver (edges are few: only duplicates).
"""
from __future__ import annotations

import functools
import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import DedupConfig
from .scoring import fingerprint as fp

DUPLICATES_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("group_id", pa.string()),  # the group's best-ranked member at dedup time
    ("group_size", pa.int32()),
    ("rank", pa.int32()),  # 0 = best quality in the group (DedupConfig.rank_by)
    ("duplicate_of", pa.string()),  # null for the best member
    ("evidence", pa.string()),  # JSON: the verified edges of this clip, with each signal's distance
])

CLIPS_PER_PARTITION = 5000
SIGNATURE_COLUMNS = ("phash", "phash_mirrored", "audio_fingerprint", "identity_embedding")
AUDIO, VISUAL = 0, 1  # bucket kinds
_MIX = np.uint64(0x9E3779B1)  # Knuth's multiplicative hash: winnowing picks minima of a mixed value


def present_filter(table: pa.Table) -> np.ndarray:
    """Rows of scores.parquet whose clip is in a shard: kept, or dropped later by refilter/dedup."""
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    stage = np.asarray(table.column("reject_stage").to_pylist(), dtype=object)
    return (status == "kept") | np.isin(stage, ["refilter", "dedup"])


# ---- bucket keys ------------------------------------------------------------------------

def winnow(subfps: np.ndarray, window: int) -> np.ndarray:
    """Positions chosen by winnowing (Schleimer, Wilkerson & Aiken 2003): in every window of
    ``window`` consecutive sub-fingerprints, the one with the smallest mixed value (rightmost on
    ties). The same audio picks the same positions, so two copies share keys without either
    emitting all of its sub-fingerprints (density ~2/(window+1))."""
    n = len(subfps)
    if n == 0:
        return np.zeros(0, np.int64)
    h = (subfps.astype(np.uint64) * _MIX) & np.uint64(0xFFFFFFFF)
    if n <= window:
        return np.array([n - 1 - int(np.argmin(h[::-1]))])
    win = np.lib.stride_tricks.sliding_window_view(h, window)
    rightmost = window - 1 - np.argmin(win[:, ::-1], axis=1)
    return np.unique(np.arange(len(win)) + rightmost)


@functools.lru_cache(maxsize=8)
def _band_bits(bands: int, bits: int, seed: int = 0) -> np.ndarray:
    """Fixed random bit positions of each LSH band: [bands, bits] indices into the 64-bit hash."""
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(64, bits, replace=False)) for _ in range(bands)])


def phash_band_keys(hashes, bands: int, bits: int) -> set[int]:
    """LSH bucket ids of 64-bit frame hashes (bit sampling for Hamming distance, Indyk & Motwani
    1998): band b's sampled bits, tagged with b. Two hashes d bits apart share band b with
    probability ~(1 - d/64)^bits; unrelated hashes with ~2^-bits."""
    if not len(hashes):
        return set()
    u = np.asarray(hashes, np.int64).view(np.uint64)
    allbits = (u[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)  # [n, 64]
    idx = _band_bits(bands, bits)
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    values = (allbits[:, idx] * weights).sum(-1)  # [n, bands]
    tags = (np.uint64(VISUAL) << np.uint64(56)) | (np.arange(bands, dtype=np.uint64) << np.uint64(48))
    return {int(v) for v in (values | tags).ravel()}


def bucket_keys(row: dict, cfg: DedupConfig) -> list[tuple[int, int]]:
    """(bucket id, audio position or -1) for one clip."""
    out = []
    subfps = fp.decode_fingerprint(row.get("audio_fingerprint"))
    for pos in winnow(subfps, cfg.winnow_window):
        out.append((int(subfps[pos]), int(pos)))  # AUDIO kind = 0 in the top bits
    hashes = list(row.get("phash") or []) + list(row.get("phash_mirrored") or [])
    for b in phash_band_keys(hashes, cfg.phash_bands, cfg.phash_band_bits):
        out.append((b, -1))
    return out


def _emit_bucket_rows(batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    buckets, keys, positions = [], [], []
    for row in batch.to_pylist():
        for b, pos in bucket_keys(row, cfg):
            buckets.append(b)
            keys.append(row["key"])
            positions.append(pos)
    return pa.table({"bucket": pa.array(buckets, pa.int64()), "key": pa.array(keys, pa.string()),
                     "pos": pa.array(positions, pa.int32())})


def pairs_of_bucket(keys: list[str], positions: list[int],
                    max_bucket: int) -> tuple[list[tuple[str, str, int | None]], int]:
    """Candidate pairs (a < b, audio offset hint or None) of one bucket, and the comparisons counted."""
    if len(keys) < 2:
        return [], 0
    by_key: dict[str, list[int]] = defaultdict(list)
    for k, p in zip(keys, positions):
        by_key[k].append(p)
    members = sorted(by_key)
    if len(members) < 2 or len(members) > max_bucket:
        return [], 0
    out = []
    for i, a in enumerate(members):
        for b in members[i + 1:]:
            pa_, pb = by_key[a][0], by_key[b][0]
            out.append((a, b, None if pa_ < 0 or pb < 0 else pa_ - pb))  # b[i] ~ a[i + offset]
    return out, len(out)


def _group_to_pairs(group: pa.Table, max_bucket: int) -> pa.Table:
    pairs, _ = pairs_of_bucket(group.column("key").to_pylist(), group.column("pos").to_pylist(), max_bucket)
    return pa.table({"pair": pa.array([f"{a}\t{b}" for a, b, _ in pairs], pa.string()),
                     "offset": pa.array([o for _, _, o in pairs], pa.int32())})


def _merge_hints(group: pa.Table) -> pa.Table:
    """One row per candidate pair: its distinct audio offset hints (at most 16, most voted first)."""
    offsets = [o for o in group.column("offset").to_pylist() if o is not None]
    votes: dict[int, int] = defaultdict(int)
    for o in offsets:
        votes[o] += 1
    hints = sorted(votes, key=lambda o: (-votes[o], o))[:16]
    a, b = group.column("pair")[0].as_py().split("\t")
    return pa.table({"pair": [f"{a}\t{b}"], "a": [a], "b": [b], "hints": [json.dumps(hints)]})


# ---- verification -----------------------------------------------------------------------

def _identity(row: dict) -> np.ndarray | None:
    v = row.get("identity_embedding")
    if v is None or len(v) == 0:
        return None
    e = np.asarray(v, np.float32)
    n = float(np.linalg.norm(e))
    return e / n if n > 0 else None


def verify_pair(a: dict, b: dict, hints: list[int], cfg: DedupConfig) -> dict:
    """Every signal's distance for one candidate pair and the decision (module docstring)."""
    fa, fb = fp.decode_fingerprint(a.get("audio_fingerprint")), fp.decode_fingerprint(b.get("audio_fingerprint"))
    block = int(round(cfg.min_overlap_s * fp.RATE / fp.HK_HOP))
    need = max(block, int(cfg.min_overlap_frac * min(len(fa), len(fb))))
    if hints:  # Haitsma-Kalker: verify at the alignments the lookup found (one hop either side)
        offsets = {h + d for h in hints for d in (-1, 0, 1)}
    else:  # found by its pictures only: search every alignment (few pairs get here)
        offsets = range(need - len(fb), len(fa) - need + 1)
    ber, off, overlap = fp.best_alignment(fa, fb, offsets, min_overlap=need)
    bits, mirrored = fp.phash_distance(list(a.get("phash") or []), list(b.get("phash") or []),
                                       list(b.get("phash_mirrored") or []))
    ia, ib = _identity(a), _identity(b)
    cos = None if ia is None or ib is None else float(ia @ ib)
    audio_ok = overlap > 0 and ber <= cfg.audio_ber_max
    visual_ok = bits <= cfg.phash_max_bits
    identity_ok = cos is not None and cos >= cfg.identity_cos_min
    duplicate = (audio_ok and (visual_ok or identity_ok)) or (bits <= cfg.visual_only_phash_max_bits and identity_ok)
    signals = [name for name, ok in (("audio", audio_ok), ("phash", visual_ok), ("identity", identity_ok)) if ok]
    return {"a": a["key"], "b": b["key"], "duplicate": bool(duplicate), "signals": signals,
            "audio_ber": round(ber, 4) if overlap else None,
            "audio_offset_s": round(off * fp.HK_HOP / fp.RATE, 4) if overlap else None,
            "audio_overlap_s": round(overlap * fp.HK_HOP / fp.RATE, 3),
            "phash_bits": None if not np.isfinite(bits) else round(bits, 2), "phash_mirrored": mirrored,
            "identity_cos": None if cos is None else round(cos, 4)}


def _signature_blob(row: dict) -> str:
    ident = row.get("identity_embedding")
    return json.dumps({"key": row["key"], "phash": row.get("phash"), "phash_mirrored": row.get("phash_mirrored"),
                       "audio_fingerprint": row.get("audio_fingerprint"),
                       "identity_embedding": None if ident is None else [float(x) for x in ident]})


def _attach_signature(group: pa.Table) -> pa.Table:
    """Join step 1 (grouped by clip key): every candidate-pair row of this clip gets its signature."""
    rows = group.to_pylist()
    sig = next((r["blob"] for r in rows if r["side"] == "sig"), None)
    out = [{"pair": r["pair"], "side": r["side"], "blob": sig, "hints": r["hints"]}
           for r in rows if r["side"] != "sig" and sig is not None]
    return pa.Table.from_pylist(out, schema=_JOIN_SCHEMA)


def _verify_group(group: pa.Table, cfg_json: str) -> pa.Table:
    """Join step 2 (grouped by pair): both sides present -> verify."""
    cfg = DedupConfig.model_validate_json(cfg_json)
    rows = {r["side"]: r for r in group.to_pylist()}
    if "a" not in rows or "b" not in rows:
        return pa.Table.from_pylist([], schema=_EDGE_SCHEMA)
    res = verify_pair(json.loads(rows["a"]["blob"]), json.loads(rows["b"]["blob"]), json.loads(rows["a"]["hints"]), cfg)
    return pa.Table.from_pylist([{"a": res["a"], "b": res["b"], "duplicate": res["duplicate"],
                                  "evidence": json.dumps(res)}], schema=_EDGE_SCHEMA)


_JOIN_SCHEMA = pa.schema([("pair", pa.string()), ("side", pa.string()), ("blob", pa.string()), ("hints", pa.string())])
_EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("duplicate", pa.bool_()), ("evidence", pa.string())])


def find_duplicate_edges(signatures: pa.Table, cfg: DedupConfig, *, stats: dict | None = None) -> list[dict]:
    """Verified candidate pairs (each a ``verify_pair`` dict) of the clips in ``signatures``, on Ray Data."""
    import ray.data

    sig_cols = [c for c in ("key",) + SIGNATURE_COLUMNS if c in signatures.column_names]
    ds = ray.data.from_arrow(signatures.select(sig_cols))
    # shuffle partitions grow with the data (Ray's default of 200 only costs time on small outputs)
    parts = max(1, min(200, signatures.num_rows // CLIPS_PER_PARTITION))
    buckets = ds.map_batches(_emit_bucket_rows, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=256)
    pairs = buckets.groupby("bucket", num_partitions=parts).map_groups(
        _group_to_pairs, fn_kwargs={"max_bucket": cfg.max_bucket}, batch_format="pyarrow")
    candidates = pairs.groupby("pair", num_partitions=parts).map_groups(_merge_hints, batch_format="pyarrow")
    candidates = candidates.materialize()
    n_candidates = candidates.count()
    if stats is not None:
        stats["candidate_pairs"] = n_candidates
        stats["clips"] = signatures.num_rows
    if n_candidates == 0:
        return []

    def sides(batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [{"k": r[s], "pair": r["pair"], "side": s, "blob": None, "hints": r["hints"]} for r in rows for s in "ab"]
        return pa.Table.from_pylist(out, schema=_KEYED_SCHEMA)

    def sig_rows(batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [{"k": r["key"], "pair": None, "side": "sig", "blob": _signature_blob(r), "hints": None} for r in rows]
        return pa.Table.from_pylist(out, schema=_KEYED_SCHEMA)

    keyed = candidates.map_batches(sides, batch_format="pyarrow").union(
        ds.map_batches(sig_rows, batch_format="pyarrow"))
    attached = keyed.groupby("k", num_partitions=parts).map_groups(_attach_signature, batch_format="pyarrow")
    edges = attached.groupby("pair", num_partitions=parts).map_groups(
        _verify_group, fn_kwargs={"cfg_json": cfg.model_dump_json()}, batch_format="pyarrow")
    return [json.loads(r["evidence"]) for r in edges.iter_rows()]


_KEYED_SCHEMA = pa.schema([("k", pa.string()), ("pair", pa.string()), ("side", pa.string()), ("blob", pa.string()),
                           ("hints", pa.string())])


# ---- groups -----------------------------------------------------------------------------

def union_find_groups(edges: list[dict]) -> list[list[str]]:
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in edges:
        if e["duplicate"]:
            ra, rb = find(e["a"]), find(e["b"])
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = defaultdict(list)
    for k in list(parent):
        groups[find(k)].append(k)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def rank_key(row: dict, rank_by: list[str]) -> tuple:
    """Sort key, best first: for each column of ``rank_by`` present, the value (descending; a
    missing value ranks last), then the sample key."""
    out = []
    for col in rank_by:
        v = row.get(col)
        ok = isinstance(v, (int, float)) and not (isinstance(v, float) and np.isnan(v))
        out += [0 if ok else 1, -float(v) if ok else 0.0]
    return tuple(out) + (row["key"],)


def duplicate_rows(groups: list[list[str]], edges: list[dict], scores: dict[str, dict],
                   rank_by: list[str]) -> list[dict]:
    """duplicates.parquet rows: every member of every group, ranked."""
    evidence: dict[str, list[dict]] = defaultdict(list)
    for e in edges:
        if e["duplicate"]:
            evidence[e["a"]].append(e)
            evidence[e["b"]].append(e)
    rows = []
    for g in groups:
        ranked = sorted(g, key=lambda k: rank_key(scores.get(k, {"key": k}), rank_by))
        best = ranked[0]
        for r, k in enumerate(ranked):
            rows.append({"key": k, "group_id": best, "group_size": len(g), "rank": r,
                         "duplicate_of": None if r == 0 else best, "evidence": json.dumps(evidence[k])})
    return sorted(rows, key=lambda r: (r["group_id"], r["rank"]))


def read_duplicates(root) -> list[dict]:
    """The rows of duplicates.parquet of the output at ``root`` (a path, URL or OutputStore); [] when
    jobs/dedup.py never ran on it."""
    from schemas import check_table

    from .store import OutputStore, open_store

    store = root if isinstance(root, OutputStore) else open_store(root)
    if not store.exists("duplicates.parquet"):
        return []
    table = pq.read_table(pa.BufferReader(store.read_bytes("duplicates.parquet")))
    try:
        check_table(table, DUPLICATES_SCHEMA)
    except ValueError as e:
        raise ValueError(f"{store.uri('duplicates.parquet')}: {e}") from None
    return table.to_pylist()


def select_kept(duplicates: list[dict], passing: set[str]) -> dict[str, str]:
    """Clip -> the clip it duplicates, given the clips that pass every other rule: in each group the
    best-ranked passing member is kept (if the group's best fails a rule later, the next stands in)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in duplicates:
        groups[r["group_id"]].append(r)
    out = {}
    for members in groups.values():
        alive = sorted((m for m in members if m["key"] in passing), key=lambda m: m["rank"])
        for m in alive[1:]:
            out[m["key"]] = alive[0]["key"]
    return out


def run_dedup(root, cfg: DedupConfig) -> dict:
    """Find the groups of the output at ``root`` (a path, URL or OutputStore) and write
    duplicates.parquet (whole or not at all, through the store)."""
    from .finalize import write_table
    from .store import OutputStore, open_store

    store = root if isinstance(root, OutputStore) else open_store(root)
    path = store.uri("scores.parquet")
    if not store.exists("scores.parquet"):
        raise FileNotFoundError(f"{path} is missing: dedup reads the stored signatures of a finished curation")
    table = pq.read_table(pa.BufferReader(store.read_bytes("scores.parquet")))
    missing = [c for c in ("phash", "audio_fingerprint") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} column: curate with this version to store the signatures")
    table = table.filter(pa.array(present_filter(table)))
    have = np.array([bool(a) or bool(p) for a, p in zip(table.column("audio_fingerprint").to_pylist(),
                                                       table.column("phash").to_pylist())], bool)
    table = table.filter(pa.array(have))
    stats: dict = {}
    edges = find_duplicate_edges(table, cfg, stats=stats) if table.num_rows > 1 else []
    groups = union_find_groups(edges)
    rank_cols = [c for c in cfg.rank_by if c in table.column_names]
    scores = {r["key"]: r for r in table.select(["key"] + [c for c in rank_cols if c != "key"]).to_pylist()}
    rows = duplicate_rows(groups, edges, scores, rank_cols)
    write_table(store, "duplicates.parquet", rows, DUPLICATES_SCHEMA)
    return {"clips": table.num_rows, "candidate_pairs": stats.get("candidate_pairs", 0),
            "verified_duplicate_pairs": sum(e["duplicate"] for e in edges), "groups": len(groups),
            "duplicates": sum(len(g) - 1 for g in groups), "rank_by": rank_cols,
            "identity": "identity_embedding" in table.column_names}


def filters_in_effect(store):
    """The thresholds the output in ``store`` was last filtered with: a refilter's, else the curation's."""
    from .config import FilterConfig
    from .finalize import saved_filters

    saved = saved_filters(store)
    if saved is not None:
        return saved
    if not store.exists("run.json"):
        raise FileNotFoundError(f"{store.uri('run.json')} is missing: {store.uri('')} is not a finished curation output")
    return FilterConfig(**json.loads(store.read_bytes("run.json"))["config"]["filters"])


def dedup_output(root, config) -> dict:
    """jobs/dedup.py: groups -> duplicates.parquet, then the output's filters with dedup on (under
    the output's lock, so no curation or refilter writes it meanwhile). ``root`` is a directory or
    an object-store URL (credentials from the environment or ``config.storage_options``). Ray must
    be up (the entry point starts or joins it)."""
    from .finalize import apply_filters, save_filters
    from .journal import Journal
    from .store import open_store

    store = open_store(root, config.storage_options)
    if not store.exists("index.json"):
        raise FileNotFoundError(f"{store.uri('index.json')} is missing: not a finished curation output")
    journal = Journal(store)
    with journal.lock(config.write.lock_lease_s):
        filters = filters_in_effect(store).model_copy(update={"dedup": True})
        found = run_dedup(store, config.dedup)
        applied = apply_filters(store, filters, journal=journal)
        # a later curation into this output re-applies these filters, dedup included (finalize.py)
        save_filters(store, filters)
    return {"found": found, "refilter": applied}
