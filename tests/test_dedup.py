"""Near-duplicates (issue 15): signatures, candidate generation without all pairs, verification,
groups, and the whole path on real clips: curate -> jobs/dedup.py -> jobs/refilter.py undo."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import real_path
from derived_clips import load_real, mirror_crop_remux, reencode, write
from pipeline import dedup
from pipeline.config import DedupConfig
from pipeline.media import decode_audio, encode_clip, iter_frames, read_clip
from pipeline.scoring import fingerprint as fp

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 4.4


# ---- signatures ---------------------------------------------------------------------------

def _literal_subfingerprints(audio: np.ndarray) -> np.ndarray:
    """Haitsma & Kalker 2002 section 4.2 read literally, one frame at a time."""
    edges_hz = np.geomspace(300.0, 2000.0, 34)
    bins = np.round(edges_hz * fp.HK_FRAME / fp.RATE).astype(int)
    energies = []
    for start in range(0, len(audio) - fp.HK_FRAME + 1, fp.HK_HOP):
        spectrum = np.fft.rfft(audio[start:start + fp.HK_FRAME].astype(np.float64) * np.hanning(fp.HK_FRAME))
        power = np.abs(spectrum) ** 2
        energies.append([power[bins[m]:bins[m + 1]].sum() for m in range(33)])
    e = np.array(energies)
    out = []
    for n in range(1, len(e)):
        value = 0
        for m in range(32):
            if e[n, m] - e[n, m + 1] - (e[n - 1, m] - e[n - 1, m + 1]) > 0:
                value |= 1 << m
        out.append(value)
    return np.array(out, np.uint32)


def test_fingerprint_is_the_paper_formula():
    audio, _ = decode_audio(str(real_path("wda_aoc_000.mp4")))
    audio = audio[: 16000 * 2]
    ours, literal = fp.subfingerprints(audio), _literal_subfingerprints(audio)
    assert len(ours) == len(literal) == (len(audio) - fp.HK_FRAME) // fp.HK_HOP
    # float32 FFT vs float64: a difference within rounding may flip a bit that is ~0 either way
    assert fp.bit_errors(ours, literal).sum() / (32 * len(ours)) < 0.002
    assert np.array_equal(fp.decode_fingerprint(fp.encode_fingerprint(ours)), ours)


def test_fingerprint_survives_reencoding_and_tells_unrelated_audio_apart():
    audio, _ = decode_audio(str(real_path("wda_aoc_000.mp4")))
    audio = audio[: 16000 * 6]
    other, _ = decode_audio(str(real_path("edtalk_obama.mp4")))
    ref = fp.subfingerprints(audio)
    blank = np.zeros((150, 64, 64, 3), np.uint8)
    for bitrate, limit in ((96_000, 0.05), (32_000, 0.1)):
        _, again, _ = read_clip(encode_clip(blank, audio, audio_bitrate=bitrate))
        ber, off, n = fp.best_alignment(ref, fp.subfingerprints(again), range(-8, 9))
        assert ber < limit and off == 0 and n >= 256, (bitrate, ber, off)
    # another speaker: no offset comes near the 0.35 threshold
    ber, _, _ = fp.best_alignment(ref, fp.subfingerprints(other[: 16000 * 6]), range(-200, 201))
    assert ber > 0.42, ber


def test_phash_is_imagehash():
    import imagehash
    from PIL import Image

    frame = next(f for _, f in iter_frames(str(real_path("wda_aoc_000.mp4"))))
    assert f"{fp.phash64(frame) & (2**64 - 1):016x}" == str(imagehash.phash(Image.fromarray(frame)))
    h, hm = fp.phash_pair(frame)
    face = Image.fromarray(frame[102:410, 102:410])  # the central 60% of the 512 crop
    assert f"{h & (2**64 - 1):016x}" == str(imagehash.phash(face))
    assert f"{hm & (2**64 - 1):016x}" == str(imagehash.phash(face.transpose(Image.FLIP_LEFT_RIGHT)))
    assert fp.phash_frame_indices(110) == [11, 33, 55, 77, 99]
    assert fp.phash_frame_indices(3) == [0, 1, 2]


# ---- candidates at scale ------------------------------------------------------------------

def _synthetic_library(n: int, n_dups: int, seed: int = 0):
    """``n`` clips of random-walk audio fingerprints and random frame hashes, the first ``n_dups``
    copied (shifted by a few sub-fingerprints, 5% of bits flipped, frames re-hashed 3 bits off)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        subfps = rng.integers(0, 2**32, rng.integers(200, 400), dtype=np.uint32)
        hashes = rng.integers(-2**63, 2**63 - 1, 5, dtype=np.int64)
        rows.append({"key": f"c{i:05d}", "audio_fingerprint": fp.encode_fingerprint(subfps),
                     "phash": hashes.tolist(), "phash_mirrored": (hashes ^ 0x5555).tolist(), "_fp": subfps})
    for i in range(n_dups):
        src = rows[i]["_fp"]
        shift = int(rng.integers(1, 20))
        flips = (rng.random((len(src) - shift, 32)) < 0.05)
        copy = src[shift:] ^ (flips.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(1).astype(np.uint32)
        hashes = np.array(rows[i]["phash"], np.int64) ^ np.int64(0b10101)
        rows.append({"key": f"d{i:05d}", "audio_fingerprint": fp.encode_fingerprint(copy),
                     "phash": hashes.tolist(), "phash_mirrored": (hashes ^ 0x5555).tolist(), "_fp": copy})
    return rows


def test_candidate_generation_never_enumerates_all_pairs():
    cfg = DedupConfig()
    rows = _synthetic_library(10_000, 50)
    buckets: dict[int, list[tuple[str, int]]] = {}
    for r in rows:
        for b, pos in dedup.bucket_keys(r, cfg):
            buckets.setdefault(b, []).append((r["key"], pos))
    comparisons, candidates = 0, set()
    for members in buckets.values():
        pairs, n = dedup.pairs_of_bucket([k for k, _ in members], [p for _, p in members], cfg.max_bucket)
        comparisons += n
        candidates |= {(a, b) for a, b, _ in pairs}
    n = len(rows)
    assert comparisons < 1e-4 * n * (n - 1) / 2, comparisons  # all pairs would be ~5e7
    planted = {(f"c{i:05d}", f"d{i:05d}") for i in range(50)}
    assert planted <= candidates, planted - candidates
    assert len(candidates) < 1e-5 * n * (n - 1) / 2, len(candidates)  # chance band collisions: few


def _table(rows, extra=None) -> pa.Table:
    cols = {"key": [r["key"] for r in rows], "audio_fingerprint": [r["audio_fingerprint"] for r in rows],
            "phash": [r["phash"] for r in rows], "phash_mirrored": [r["phash_mirrored"] for r in rows]}
    return pa.table(dict(cols, **(extra or {})))


def test_ray_pipeline_finds_exactly_the_planted_groups(ray_local):
    rows = _synthetic_library(300, 12, seed=1)
    # the identity helper's column (list<halffloat>, 512, L2-normalised): each planted copy has its
    # original's person, every other clip a random one
    rng = np.random.default_rng(3)
    people = rng.normal(size=(len(rows), 512)).astype(np.float32)
    people[300:] = people[:12]
    people /= np.linalg.norm(people, axis=1, keepdims=True)
    identity = pa.array([p.astype(np.float16).tolist() for p in people], pa.list_(pa.float16()))
    # visual agreement of the planted copies is 3 bits; every other pair is ~32 bits apart
    stats = {}
    edges = dedup.find_duplicate_edges(_table(rows, {"identity_embedding": identity}), DedupConfig(), stats=stats)
    found = {(e["a"], e["b"]) for e in edges if e["duplicate"]}
    assert found == {(f"c{i:05d}", f"d{i:05d}") for i in range(12)}
    assert stats["candidate_pairs"] < 50
    e = next(e for e in edges if e["duplicate"])
    assert e["signals"] == ["audio", "phash", "identity"] and e["audio_ber"] < 0.1 and e["phash_bits"] == 3.0
    assert e["identity_cos"] > 0.999


def test_identity_embedding_is_used_when_present():
    """A re-dubbed copy (same pictures, other audio) is a duplicate only with identity agreement;
    same audio over another face (dubbing the other way) needs pictures or identity to agree."""
    cfg = DedupConfig()
    rng = np.random.default_rng(2)
    hashes = rng.integers(-2**63, 2**63 - 1, 5, dtype=np.int64).tolist()
    audio = rng.integers(0, 2**32, 400, dtype=np.uint32)
    person = rng.normal(size=512).astype(np.float16)
    stranger = rng.normal(size=512).astype(np.float16)
    a = {"key": "a", "phash": hashes, "phash_mirrored": hashes, "audio_fingerprint": fp.encode_fingerprint(audio)}
    redub = dict(a, key="b", audio_fingerprint=fp.encode_fingerprint(rng.integers(0, 2**32, 400, dtype=np.uint32)))
    assert not dedup.verify_pair(a, redub, [], cfg)["duplicate"]  # no identity column: never visual-only
    same = dedup.verify_pair(dict(a, identity_embedding=person), dict(redub, identity_embedding=person), [], cfg)
    assert same["duplicate"] and same["signals"] == ["phash", "identity"] and same["identity_cos"] > 0.99
    assert not dedup.verify_pair(dict(a, identity_embedding=person), dict(redub, identity_embedding=stranger), [],
                                 cfg)["duplicate"]
    other_face = {"key": "c", "phash": [~h for h in hashes], "phash_mirrored": [~h for h in hashes],
                  "audio_fingerprint": a["audio_fingerprint"]}
    assert not dedup.verify_pair(a, other_face, [0], cfg)["duplicate"]  # same sound, other picture
    framed = dedup.verify_pair(dict(a, identity_embedding=person), dict(other_face, identity_embedding=person),
                               [0], cfg)
    assert framed["duplicate"] and framed["signals"] == ["audio", "identity"]  # re-framed re-upload


def test_groups_rank_and_selection():
    edges = [{"a": "x", "b": "y", "duplicate": True}, {"a": "y", "b": "z", "duplicate": True},
             {"a": "p", "b": "q", "duplicate": False}]
    groups = dedup.union_find_groups(edges)
    assert groups == [["x", "y", "z"]]
    scores = {"x": {"key": "x", "face_size_px": 200.0, "sync_conf": 1.0},
              "y": {"key": "y", "face_size_px": 300.0, "sync_conf": None},
              "z": {"key": "z", "face_size_px": 300.0, "sync_conf": 2.0}}
    rows = dedup.duplicate_rows(groups, edges, scores, ["sharpness", "face_size_px", "sync_conf"])
    assert [(r["key"], r["rank"], r["duplicate_of"]) for r in rows] == [("z", 0, None), ("y", 1, "z"), ("x", 2, "z")]
    assert dedup.select_kept(rows, {"x", "y", "z"}) == {"y": "z", "x": "z"}
    # the best member fails another rule later: the next one stands in
    assert dedup.select_kept(rows, {"x", "y"}) == {"x": "y"}


# ---- the must-show case, end to end --------------------------------------------------------

@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory, ray_local):
    from pipeline.config import load_config
    from pipeline.inputs import expand_inputs
    from pipeline.runner import run_curation

    d = tmp_path_factory.mktemp("dup_inputs")
    # edtalk_obama leaves room around the head (pad_frac ~0.02), so a cropped copy still passes
    frames, audio = load_real(real_path("edtalk_obama.mp4"), SECONDS)
    write(d / "real.mp4", frames, audio)
    reencode(d / "real.mp4", d / "real_reencoded.mp4")
    mirror_crop_remux(d / "real.mp4", d / "real_mirrored_cropped.mkv")
    frames, audio = load_real(real_path("wda_aoc_000.mp4"), SECONDS)
    write(d / "unrelated.mp4", frames, audio)
    out = tmp_path_factory.mktemp("dup_out")
    run_curation(expand_inputs([str(d)]), out, load_config(None, **{"features.enabled": False}), progress_every_s=60)
    return out


def _stems(out: Path, table: str, key_filter=None) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for r in pq.read_table(out / table).to_pylist():
        if key_filter is None or key_filter(r):
            by.setdefault(Path(r["uri"]).stem, []).append(r)
    return by


def _job(*args, timeout=300) -> str:
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.realdata
@pytest.mark.slow
def test_real_clip_copies_form_one_group_and_refilter_undoes_it(dedup_run, tmp_path, ray_local):
    out = tmp_path / "copy"
    shutil.copytree(dedup_run, out)
    kept = _stems(out, "manifest.parquet")
    assert set(kept) == {"real", "real_reencoded", "real_mirrored_cropped", "unrelated"}, kept
    # the job joins the tests' Ray instead of starting its own (tens of seconds on 2 cores)
    stdout = _job(ROOT / "jobs" / "dedup.py", out, "--ray-address", ray_local.get_runtime_context().gcs_address)
    dups = pq.read_table(out / "duplicates.parquet").to_pylist()
    key_stem = {r["key"]: Path(r["uri"]).stem for r in pq.read_table(out / "scores.parquet").to_pylist()}
    groups: dict[str, set] = {}
    for r in dups:
        groups.setdefault(r["group_id"], set()).add(key_stem[r["key"]])
    assert list(groups.values()) == [{"real", "real_reencoded", "real_mirrored_cropped"}], (groups, stdout)
    best = next(r for r in dups if r["rank"] == 0)
    evidence = [e for r in dups for e in json.loads(r["evidence"])]
    assert all("audio" in e["signals"] and e["audio_ber"] <= 0.35 for e in evidence), evidence
    manifest = _stems(out, "manifest.parquet")
    assert set(manifest) == {key_stem[best["key"]], "unrelated"}
    rejects = _stems(out, "rejects.parquet", lambda r: r["stage"] == "dedup")
    assert sorted(rejects) == sorted({"real", "real_reencoded", "real_mirrored_cropped"} - {key_stem[best["key"]]})
    for rows in rejects.values():
        assert rows[0]["reason"] == f"duplicate of {best['key']}" and rows[0]["rule"] == "filters.dedup"
    scores = {r["key"]: r for r in pq.read_table(out / "scores.parquet").to_pylist()}
    assert {k for k, s in scores.items() if s["duplicate_of"]} == {r["key"] for r in dups if r["rank"] > 0}
    index = json.loads((out / "index.json").read_text())
    assert index["selection"]["nsamples"] == 2
    # the statistics report lists the group, best member first
    from pipeline.report import compute_stats, load_run, markdown, validate_stats

    stats = compute_stats(load_run(str(out)))
    dup = stats["duplicates"]
    assert (dup["groups"], dup["clips_in_groups"], dup["duplicates"], dup["size_histogram"]) == (1, 3, 2, {"3": 1})
    members = dup["listed"][0]["members"]
    assert [m["status"] for m in members] == ["kept", "rejected", "rejected"] and members[0]["key"] == best["key"]
    assert "## Duplicate groups" in markdown.render(stats)
    from pipeline.report import html

    assert best["key"] in html._duplicates(stats) and "Duplicate groups (1)" in html._duplicates(stats)
    stats.update(contact_sheet={"kept": [], "kept_notes": [], "rejected": []}, report_seconds={"total": 0.0})
    validate_stats(stats)
    # undo: the same rules with dedup off bring the duplicates back
    cfg = tmp_path / "nodedup.yaml"
    cfg.write_text("filters:\n  dedup: false\n")
    stdout = _job(ROOT / "jobs" / "refilter.py", out, "--config", cfg)
    assert set(_stems(out, "manifest.parquet")) == {"real", "real_reencoded", "real_mirrored_cropped", "unrelated"}
    assert len([line for line in stdout.splitlines() if line.startswith("  + ")]) == 2
    assert not _stems(out, "rejects.parquet", lambda r: r["stage"] == "dedup")
    # and dedup on again (the default) removes them again, from the stored groups alone
    cfg.write_text("filters:\n  dedup: true\n")
    _job(ROOT / "jobs" / "refilter.py", out, "--config", cfg)
    assert set(_stems(out, "manifest.parquet")) == {key_stem[best["key"]], "unrelated"}


@pytest.mark.realdata
def test_dedup_of_an_object_store_output_equals_the_local_one(dedup_run, tmp_path, s3_endpoint, ray_local):
    """jobs/dedup.py on an s3:// output (issue 14: outputs live in object storage): the same groups,
    the same manifest and rejects as on the same output in a local directory, under the output's lease."""
    from moto_s3 import s3_options

    from pipeline.config import load_config
    from pipeline.dedup import dedup_output
    from pipeline.store import open_store

    local = tmp_path / "local"
    shutil.copytree(dedup_run, local)
    url = "s3://out/dedup-output"
    remote = open_store(url, s3_options(s3_endpoint))
    for path in sorted(p for p in dedup_run.rglob("*") if p.is_file()):
        name = path.relative_to(dedup_run).as_posix()
        if not name.startswith("_journal/lock"):  # the flock file of a local output: no meaning on S3
            remote.put_bytes(name, path.read_bytes())
    config = load_config(None)
    config.storage_options = s3_options(s3_endpoint)
    found_local = dedup_output(local, config)
    found_s3 = dedup_output(url, config)
    assert found_s3["found"] == found_local["found"] and found_s3["found"]["groups"] == 1, found_s3
    untimed = [{k: v for k, v in found["refilter"].items() if k != "time"} for found in (found_s3, found_local)]
    assert untimed[0] == untimed[1] and untimed[0]["kept"] == 2, untimed

    def table(store, name):
        return pq.read_table(pa.BufferReader(store.read_bytes(name))).to_pylist()

    for name in ("duplicates.parquet", "manifest.parquet", "rejects.parquet"):
        assert table(remote, name) == table(open_store(local), name), name
    from pipeline.journal import Journal

    assert Journal(remote).holder() is None  # the lease was released
    assert json.loads(remote.read_bytes("_journal/refilter.json"))["filters"]["dedup"] is True
