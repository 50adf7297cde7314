"""The media bad-input corpus (tests/bad_media.py) through ONE curation job, and the
decompression-bomb caps (probe.max_frame_pixels, probe.max_frames) with bounded memory.

Every input ends exactly once in videos.parquet, kept or rejected with the reason its kind
expects; rotated inputs come out upright; run.json counts the rejects by reason.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REAL_DIR, read_samples

from bad_media import (write_corpus, write_frame_count_bomb, write_growing_bomb, write_pixel_bomb,
                       write_understated_count)
from pipeline.media import DecodeLimits, MediaError, iter_frames, read_clip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_media")
    inputs = base / "in"
    kinds, source = write_corpus(inputs, REAL_DIR if REAL_DIR.exists() else None)
    out = base / "out"
    cfg = base / "cfg.yaml"
    cfg.write_text("features:\n  enabled: false\n")  # the corpus is about decoding; features are tested elsewhere
    cmd = [sys.executable, "jobs/curate.py", "--input", str(inputs), "--output", str(out), "--config", str(cfg)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    videos = pq.read_table(out / "videos.parquet").to_pylist() if (out / "videos.parquet").exists() else []
    rejects = pq.read_table(out / "rejects.parquet").to_pylist() if (out / "rejects.parquet").exists() else []
    return {"rc": r.returncode, "stderr": r.stderr, "inputs": inputs, "out": out, "kinds": kinds, "source": source,
            "videos": {Path(v["uri"]).name: v for v in videos}, "video_rows": videos,
            "rejects": {Path(x["uri"]).name: x for x in rejects if x["clip_index"] == -1}}


@pytest.mark.long
def test_job_exits_zero_and_lists_every_input_once(corpus_run):
    assert corpus_run["rc"] == 0, corpus_run["stderr"][-3000:]
    names = Counter(Path(v["uri"]).name for v in corpus_run["video_rows"])
    assert names == Counter(p.name for p in corpus_run["inputs"].iterdir())
    assert set(names) == set(corpus_run["kinds"])


@pytest.mark.long
def test_every_kind_has_its_expected_outcome(corpus_run):
    manifest = pq.read_table(corpus_run["out"] / "manifest.parquet").to_pylist()
    kept_ids = Counter(m["video_id"] for m in manifest)
    wrong = []
    for name, kind in sorted(corpus_run["kinds"].items()):
        v = corpus_run["videos"][name]
        if kind.expect == "kept":
            if v["status"] != "kept" or kept_ids[v["video_id"]] < 1:
                wrong.append(f"{name}: expected kept, got {v['status']} ({v['stage']}: {v['reason']})")
            continue
        if (v["status"], v["reason"]) != ("rejected", kind.reason):
            wrong.append(f"{name}: expected rejected '{kind.reason}', got {v['status']} ({v['stage']}: {v['reason']})")
            continue
        detail = corpus_run["rejects"][name]["detail"]
        assert str(corpus_run["inputs"] / name) in detail, f"{name}: the reject detail does not name the file: {detail}"
        wrong += [f"{name}: '{word}' not in the reject detail: {detail}" for word in kind.detail_has if word not in detail]
    assert not wrong, "\n".join(wrong)
    assert not [n for n, v in corpus_run["videos"].items() if v["reason"] == "internal error"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-9))


@pytest.mark.long
def test_rotated_inputs_come_out_upright(corpus_run):
    """The 512 crop of each rotated input matches the crop of the same source stored upright
    (reference_h264.mp4), and matches it better upright than turned any other way."""
    _, samples = read_samples(corpus_run["out"])
    manifest = {m["video_id"]: m for m in pq.read_table(corpus_run["out"] / "manifest.parquet").to_pylist()}

    def first_clip(name: str):
        vid = corpus_run["videos"][name]["video_id"]
        key = manifest[vid]["key"]
        frames, _, _ = read_clip(samples[key]["video.mp4"])
        return frames, json.loads(samples[key]["meta.json"])

    ref, ref_meta = first_clip("reference_h264.mp4")
    for degrees in (90, 180, 270):
        frames, meta = first_clip(f"rotate_{degrees}.mp4")
        assert (meta["source"]["width"], meta["source"]["height"]) == (320, 256), meta["source"]
        assert meta["source"]["rotation"] == (360 - degrees) % 360  # counter-clockwise turn applied
        n = min(len(frames), len(ref))
        shift = int(round((meta["clip"]["start_s"] - ref_meta["clip"]["start_s"]) * 25))
        pairs = [(frames[i], ref[i + shift]) for i in range(0, n, 10) if 0 <= i + shift < len(ref)]
        upright = np.mean([_psnr(a, b) for a, b in pairs])
        turned = [np.mean([_psnr(np.rot90(a, k), b) for a, b in pairs]) for k in (1, 2, 3)]
        # measured: 22.7-26.3 dB upright (crop boxes a pixel or two apart), ~11 dB turned any other way
        assert upright > 20.0, f"rotate_{degrees}: crop differs from the upright reference ({upright:.1f} dB)"
        assert upright > max(turned) + 8.0, f"rotate_{degrees}: upright {upright:.1f} dB, turned {turned}"


@pytest.mark.long
def test_run_summary_counts_the_corpus(corpus_run):
    summary = json.loads((corpus_run["out"] / "run.json").read_text())["summary"]
    kinds = corpus_run["kinds"]
    assert summary["inputs"] == len(kinds)
    assert summary["inputs_kept"] == sum(k.expect == "kept" for k in kinds.values())
    assert summary["inputs_rejected"] == sum(k.expect == "rejected" for k in kinds.values())
    assert summary["inputs_rejected_by_reason"] == dict(Counter(k.reason for k in kinds.values() if k.expect == "rejected"))


# ---- decompression bombs: refused before decoding, and with bounded memory

_PEAK_RSS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from pipeline.media import MediaError, iter_frames, probe
    result = {{}}
    try:
        {call}
        result["outcome"] = "no error"
    except MediaError as e:
        result["outcome"], result["detail"] = e.reason, str(e)
    # VmHWM: this process's peak resident memory (getrusage's ru_maxrss keeps the parent's peak across exec)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    result["max_rss_mb"] = int(hwm.split()[1]) / 1024
    print(json.dumps(result))
""")


def _in_child(call: str) -> dict:
    """Run ``call`` in a fresh interpreter; its outcome and peak resident memory."""
    code = _PEAK_RSS.format(root=str(ROOT), call=call)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_pixel_bomb_is_refused_by_probe_without_allocating_it(tmp_path):
    bomb = write_pixel_bomb(tmp_path / "bomb.ivf")
    assert bomb.stat().st_size < 1000
    # The bomb is real: FFmpeg's own trial decode in av.open, uncapped, allocates the 16000x16000 picture.
    uncapped = _in_child(f"import av; av.open({str(bomb)!r}).close()")
    assert uncapped["max_rss_mb"] > 380, uncapped
    capped = _in_child(f"probe({str(bomb)!r})")
    assert capped["outcome"] == "frame too large", capped
    assert "16000x16000" in capped["detail"] and "40,000,000" in capped["detail"]
    assert capped["max_rss_mb"] < 150, capped  # measured 75 MB (71 MB to import pipeline.media)
    assert capped["max_rss_mb"] < uncapped["max_rss_mb"] - 250


def test_frame_count_bomb_is_refused_from_its_header(tmp_path):
    bomb = write_frame_count_bomb(tmp_path / "frames.ivf")
    result = _in_child(f"probe({str(bomb)!r})")
    assert result["outcome"] == "too many frames", result
    assert "4,000,000,000" in result["detail"] and "3,000,000" in result["detail"]


def test_frame_growing_past_the_cap_midstream_is_not_allocated(tmp_path):
    """Honest header and first key frame (64x64), a later key frame of 16000x16000: the capped
    decoder refuses that frame (a decode error, or a damaged range when decoding tolerantly)."""
    bomb = write_growing_bomb(tmp_path / "grow.ivf")
    strict = _in_child(f"list(iter_frames({str(bomb)!r}))")
    assert strict["outcome"] == "decode error", strict
    assert strict["max_rss_mb"] < 150, strict
    from pipeline.media import DecodeLog

    log = DecodeLog()
    frames = list(iter_frames(str(bomb), damage=log))
    assert 0 < len(frames) < 8 and log.damaged, (len(frames), log)
    assert all(img.shape == (64, 64, 3) for _, img in frames)


def test_decoding_stops_at_the_frame_cap_and_size_cap(tmp_path):
    from pipeline.demo import make_talking_head

    clip = str(make_talking_head(tmp_path / "t.mp4", duration_s=1.0, size=96))
    assert len(list(iter_frames(clip, limits=DecodeLimits(max_frames=25)))) == 25
    with pytest.raises(MediaError, match="too many frames") as e:  # from the header, before decoding
        list(iter_frames(clip, limits=DecodeLimits(max_frames=10)))
    assert "declares 25 frames" in str(e.value) and "probe.max_frames = 10" in str(e.value)
    liar = str(write_understated_count(tmp_path / "liar.ivf", frames=12, declared=2))
    assert len(list(iter_frames(liar))) == 12
    with pytest.raises(MediaError, match="too many frames") as e:  # the header passes; decoding counts
        list(iter_frames(liar, limits=DecodeLimits(max_frames=5)))
    assert "decoding reached 6 frames" in str(e.value)
    with pytest.raises(MediaError, match="frame too large") as e:
        list(iter_frames(clip, limits=DecodeLimits(max_frame_pixels=64 * 64)))
    assert "96x96" in str(e.value) and "probe.max_frame_pixels = 4,096" in str(e.value)
