"""`jobs/curate.py --dry-run` checks what a run needs and writes nothing; `--limit N` takes the first N inputs."""
from __future__ import annotations

import fcntl
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import jobs.curate as curate
from pipeline.config import load_config
from pipeline.journal import Journal, config_fingerprint


def _inputs(tmp_path: Path, n: int) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(n):
        (d / f"talk_{i}.mp4").write_bytes(b"not decoded by a dry run %d" % i)
    return d


def _run(capsys, *argv) -> tuple[int, str]:
    rc = curate.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_dry_run_counts_inputs_and_writes_nothing(tmp_path, capsys):
    d = _inputs(tmp_path, 3)
    out = tmp_path / "new" / "out"
    rc, text = _run(capsys, "--input", str(d), "--output", str(out), "--dry-run")
    assert rc == 0, text
    assert "inputs: 3 (0 already finished in the output, 3 to process)" in text
    assert f"ok    read access ({d})" in text and "ok    output writable" in text
    assert "ok    weights: none needed (profile smoke" in text
    assert not (tmp_path / "new").exists(), "a dry run created the output"


def test_limit_takes_the_first_inputs(tmp_path, capsys):
    d = _inputs(tmp_path, 5)
    rc, text = _run(capsys, "--input", str(d), "--output", str(tmp_path / "out"), "--dry-run", "--limit", "2")
    assert rc == 0, text
    assert "--limit 2: the first 2 of 5 inputs" in text and "inputs: 2 (" in text
    rc, text = _run(capsys, "--input", str(d), "--output", str(tmp_path / "out"), "--limit", "0")
    assert rc == 2 and "give a positive number" in text


def test_dry_run_reports_missing_weights(tmp_path, capsys):
    d = _inputs(tmp_path, 1)
    rc, text = _run(capsys, "--input", str(d), "--output", str(tmp_path / "out"), "--dry-run",
                    "--profile", "full", "--model-dir", str(tmp_path / "no-models"))
    assert rc == 2
    assert "FAIL  weights: the full profile cannot start" in text and "missing model file" in text


def test_dry_run_reports_an_unreadable_source(tmp_path, capsys):
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    served = tmp_path / "served"
    served.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        listing = tmp_path / "list.txt"
        listing.write_text(f"http://127.0.0.1:{server.server_address[1]}/gone.mp4\n")
        rc, text = _run(capsys, "--input", str(listing), "--output", str(tmp_path / "out"), "--dry-run")
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 2
    assert f"FAIL  read access ({listing}): http://127.0.0.1:" in text and "gone.mp4" in text


def test_dry_run_of_an_existing_output(tmp_path, capsys):
    d = _inputs(tmp_path, 3)
    out = tmp_path / "out"
    journal = Journal(out)
    cfg = load_config(None).model_dump(mode="json")
    journal.check_config(config_fingerprint(cfg), cfg)
    done = str(d / "talk_0.mp4")
    journal.record_videos([{"video": {"uri": done}, "rejects": [], "scores": [], "retryable": False}])
    (journal.dir / "lock").touch()  # as a finished run leaves it
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    rc, text = _run(capsys, "--input", str(d), "--output", str(out), "--dry-run")
    assert rc == 0, text
    assert "inputs: 3 (1 already finished in the output, 2 to process)" in text
    assert "ok    configuration: matches" in text and "ok    output lock" in text

    with open(journal.dir / "lock", "w") as held:  # another run holds the output
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, text = _run(capsys, "--input", str(d), "--output", str(out), "--dry-run")
    assert rc == 2 and "FAIL  output lock" in text and "being written by another run" in text

    rc, text = _run(capsys, "--input", str(d), "--output", str(out), "--dry-run", "--config",
                    str(_yaml(tmp_path, "segment:\n  min_clip_s: 3.0\n")))
    assert rc == 2 and "FAIL  configuration: differs" in text
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, "a dry run wrote into the output"


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("argv", [["--demo", "--dry-run"]])
def test_demo_and_dry_run_exclude_each_other(tmp_path, capsys, argv):
    rc, text = _run(capsys, *argv, "--output", str(tmp_path / "out"))
    assert rc == 2 and "use one" in text
