"""Config validation and input expansion: bad settings fail before any work starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.inputs import InputError, expand_inputs, video_id_for

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_yaml_override(tmp_path):
    cfg = load_config()
    assert cfg.profile == "smoke" and cfg.output.size == 512 and cfg.output.fps == 25
    assert cfg.detector_backend == "mediapipe"
    f = tmp_path / "c.yaml"
    f.write_text("profile: full\nsegment:\n  min_clip_s: 3.5\ndetect:\n  detect_fps: 10\n")
    cfg = load_config(f)
    assert cfg.profile == "full" and cfg.segment.min_clip_s == 3.5 and cfg.detect.detect_fps == 10
    assert cfg.detector_backend == "scrfd"
    assert cfg.segment.max_clip_s == 30.0  # untouched fields keep their defaults
    assert load_config(f, **{"segment.min_clip_s": 4.0}).segment.min_clip_s == 4.0


@pytest.mark.parametrize("text, needle", [
    ("segmnt:\n  min_clip_s: 3\n", "segmnt"),                       # unknown section
    ("segment:\n  min_clip: 3\n", "segment.min_clip"),              # unknown field
    ("segment:\n  min_clip_s: -1\n", "segment.min_clip_s"),         # invalid value
    ("output:\n  fps: 30\n", "output.fps"),                         # contract-fixed field
    ("segment:\n  min_clip_s: 10\n  max_clip_s: 5\n", "max_clip_s"),  # cross-field rule
    ("- a\n- b\n", "mapping"),
    ("profile: [\n", "not valid YAML"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value)
    if "YAML" not in needle and "mapping" not in needle:
        assert str(f) in str(e.value)


def test_removed_detect_landmarks_key(tmp_path):
    """detect.landmarks is gone (the detect stage finds boxes only): ``false`` asked for what now always
    happens and still loads; ``true`` is an error that says the key was removed and where landmarks come from."""
    f = tmp_path / "c.yaml"
    f.write_text("detect:\n  landmarks: false\n  detect_fps: 10\n")
    cfg = load_config(f)
    assert cfg.detect.detect_fps == 10 and "landmarks" not in cfg.detect.model_dump()
    f.write_text("detect:\n  landmarks: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "detect.landmarks was removed" in str(e.value) and "score.landmarks_every" in str(e.value)
    assert str(f) in str(e.value)


def test_cli_rejects_bad_config_before_work(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("crop_sacle: 2\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "curate.py"), "--input", str(tmp_path),
                        "--output", str(out), "--config", str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "crop_sacle" in r.stderr and str(f) in r.stderr
    assert not out.exists()


def test_expand_dirs_globs_txt_parquet(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sub").mkdir()
    for p in ["a/x.mp4", "a/sub/y.mov", "a/.hidden.mp4", "a/notes.txt", "b.mp4"]:
        (tmp_path / p).write_bytes(b"0")
    items = expand_inputs([str(tmp_path / "a")])
    names = sorted(Path(i.uri).name for i in items)
    assert names == ["notes.txt", "x.mp4", "y.mov"]  # every file is an input; hidden ones are not
    assert all(i.source == str(tmp_path / "a") for i in items)
    assert [Path(i.uri).name for i in expand_inputs([str(tmp_path / "*.mp4")])] == ["b.mp4"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{tmp_path / 'b.mp4'}\ns3://bucket/raw/c.mp4\n\n")
    assert [i.uri for i in expand_inputs([str(lst)])] == [str(tmp_path / "b.mp4"), "s3://bucket/raw/c.mp4"]
    pq.write_table(pa.table({"uri": ["gs://b/1.mp4", "gs://b/2.mp4"], "source": ["yt", "podcast"]}),
                   tmp_path / "in.parquet")
    items = expand_inputs([str(tmp_path / "in.parquet")])
    assert [(i.uri, i.source) for i in items] == [("gs://b/1.mp4", "yt"), ("gs://b/2.mp4", "podcast")]
    # the same input given twice counts once
    assert len(expand_inputs([str(tmp_path / "b.mp4"), str(tmp_path / "*.mp4")])) == 1


def test_glob_over_directories_and_literal_brackets(tmp_path):
    for p in ["chan1/a.mp4", "chan2/sub/b.mp4", "top.mp4", "talk [1080p].mp4"]:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"0")
    names = sorted(Path(i.uri).name for i in expand_inputs([str(tmp_path / "*")]))
    assert names == ["a.mp4", "b.mp4", "talk [1080p].mp4", "top.mp4"]  # matched directories are searched
    literal = expand_inputs([str(tmp_path / "talk [1080p].mp4")])  # an existing name is not a pattern
    assert [Path(i.uri).name for i in literal] == ["talk [1080p].mp4"]


def test_expand_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "missing")])
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.avi")])
    # an empty uri cell is a blank entry, skipped and counted like an empty line of a .txt list
    pq.write_table(pa.table({"uri": ["a.mp4", None, " "]}), tmp_path / "nulls.parquet")
    stats: dict = {}
    assert [Path(i.uri).name for i in expand_inputs([str(tmp_path / "nulls.parquet")], stats)] == ["a.mp4"]
    assert stats == {"duplicates": 0, "blank_entries": 2}
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match="no 'uri' column"):
        expand_inputs([str(tmp_path / "p.parquet")])


def test_video_ids_are_safe_and_distinct():
    a, b = video_id_for("/data/a/clip 1.mp4"), video_id_for("/data/b/clip 1.mp4")
    assert a != b and a.startswith("clip-1-")
    import schemas

    assert schemas.SAMPLE_KEY_PATTERN.match(video_id_for("s3://x/ü.weird.name.mkv"))


def test_fsspec_uri_goes_through_the_same_media_path(tmp_path):
    """A non-local URI (fsspec memory://) is listed, probed and decoded by the same code."""
    import fsspec

    from pipeline.demo import make_talking_head
    from pipeline.media import decode_audio, iter_frames, probe

    local = make_talking_head(tmp_path / "t.mp4", duration_s=2.0)
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/raw/t.mp4", local.read_bytes())
    items = expand_inputs(["memory://bucket/raw"])
    assert len(items) == 1 and items[0].uri.startswith("memory://") and items[0].uri.endswith("/bucket/raw/t.mp4")
    facts = probe(items[0].uri)
    assert facts.width == 640 and abs(facts.duration_s - 2.0) < 0.1 and facts.size_bytes == local.stat().st_size
    assert sum(1 for _ in iter_frames(items[0].uri)) == 50
    audio, t0 = decode_audio(items[0].uri)
    assert abs(len(audio) / 16000 - 2.0) < 0.1


def test_a_rule_on_a_score_the_output_never_recorded_is_skipped_not_failed():
    """refilter of a schema 2.0 output (no quality scores): the sharpness rule cannot reject its
    clips, while a score that was recorded as unmeasurable (None) still fails its rule."""
    from pipeline.filters import evaluate, unstored_rules

    filters = load_config(None).filters
    old = {"loudness_dbfs": -20.0, "speech_ratio": 0.6, "face_size_px": 300.0, "complete_frac": 1.0,
           "pad_frac": 0.1, "yaw_abs_p95": 5.0, "pitch_abs_p95": 5.0, "roll_abs_p95": 5.0,
           "head_translation": 0.1, "mouth_activity": 0.5, "sync_weights": "smoke-random"}
    stored = set(old)
    assert "filters.sharpness_min" in [r["rule"] for r in evaluate(old, filters)]  # as if never measured
    assert evaluate(old, filters, stored) == []
    assert "filters.sharpness_min" in unstored_rules(filters, stored)
    measured_none = dict(old, sharpness=None)
    assert [r["rule"] for r in evaluate(measured_none, filters, stored | {"sharpness"})] == ["filters.sharpness_min"]
