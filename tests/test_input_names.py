"""Inputs that are bad before any decoding, output names that cannot escape, and the per-input
time limit (issue 12: names, listings, transport, permissions, timeouts).

One curation job (module fixture, a subprocess, features off) covers: hostile file names that
must still give kept clips, a symlink loop, a dangling and a self-looping symlink, a directory
named like a video, .txt and .parquet lists with duplicates, blank entries and missing files,
http inputs from a local server that answer 404, 500, a good file under a traversal-looking
name, and one that stalls mid-file longer than the whole test (a "timed out" reject, the job
does not wait for it). Unit tests cover what needs no job: read permission as an unprivileged
user, the watchdog on a call blocked in the kernel, the http read timeout.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipeline.demo import make_talking_head
from pipeline.inputs import expand_inputs, video_id_for
from pipeline.media import MediaError, check_input, input_deadline, probe, run_with_deadline, stuck_threads

ROOT = Path(__file__).resolve().parents[1]
STALL_S = 3600  # far longer than the whole test: the job must not wait for it

# Local names a kept clip must survive: leading dash, spaces, quotes, unicode, newline, tab,
# an ANSI escape, fsspec's chain separator, and a name near the 255-byte limit.
SCRIPT_NAME = "<script>alert(1)</script>&amp;.mp4"  # a missing list entry: shown in the report's rejects
HOSTILE_NAMES = ["-dash 'single' \"double\" ünï話" + "L" * 200 + ".mp4", "new\nline\ttab\x1b[31m::chain.mp4"]


class _Server:
    """127.0.0.1 http server: /good/* serves an mp4 (with byte ranges, as fsspec reads),
    /404/*, /500/* answer that status, /stall/* sends its headers and part of the mp4, then
    waits (until the test ends)."""

    def __init__(self, mp4: bytes):
        self.mp4, self.release = mp4, threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _range(self):
                m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if not m:
                    return 0, len(server.mp4) - 1, False
                end = int(m.group(2)) if m.group(2) else len(server.mp4) - 1
                return int(m.group(1)), min(end, len(server.mp4) - 1), True

            def _status_only(self, code):
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                if self.path.startswith(("/good/", "/stall/")):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.mp4)))
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()
                else:
                    self._status_only(int(self.path.split("/")[1]))

            def do_GET(self):
                if not self.path.startswith(("/good/", "/stall/")):
                    return self._status_only(int(self.path.split("/")[1]))
                start, end, ranged = self._range()
                body = server.mp4[start:end + 1]
                self.send_response(206 if ranged else 200)
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(server.mp4)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path.startswith("/stall/"):
                    self.wfile.write(body[: len(body) // 4])
                    self.wfile.flush()
                    server.release.wait(STALL_S)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("names-media")
    return make_talking_head(root / "talk.mp4", duration_s=2.6, seed=3)


@pytest.fixture(scope="module")
def server(media):
    s = _Server(media.read_bytes())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def job(tmp_path_factory, media, server):
    root = tmp_path_factory.mktemp("names-job")
    inp = root / "in"
    inp.mkdir()
    for name in HOSTILE_NAMES:
        (inp / name).write_bytes(media.read_bytes())
    (inp / "sub").mkdir()
    os.symlink("..", inp / "sub" / "up")  # a directory symlink back to its parent: a loop
    os.symlink("self.mp4", inp / "self.mp4")  # resolves to itself (ELOOP)
    os.symlink("nowhere.mp4", inp / "dangling.mp4")
    (inp / "clip.mp4").mkdir()  # a directory named like a video, empty
    (root / "elsewhere.mov").mkdir()  # ... and one named in a list
    good_http = f"{server.url}/good/..%2F..%2F%2Ftmp%2Fescape%00x.mp4"
    lst = root / "list.txt"
    lst.write_text("\n".join([
        "# a comment", str(inp / HOSTILE_NAMES[0]), "", str(inp / HOSTILE_NAMES[0]), "   ",
        str(root / "missing.mp4"), str(root / SCRIPT_NAME), str(root / "elsewhere.mov"), f"{server.url}/404/gone.mp4",
        f"{server.url}/500/broken.mp4", f"{server.url}/stall/slow.mp4", good_http, ""]) + "\n")
    pq.write_table(pa.table({"uri": [str(root / "missing.mp4"), None, "", str(root / "also-missing.mp4"),
                                     str(root / "also-missing.mp4")]}), root / "list.parquet")
    out = root / "out"
    cfg = root / "cfg.yaml"
    # A small floor so the stalled probe times out in seconds; a large per-second allowance so the
    # good inputs' detect and crop (2.6 s of video) are never near their limit on a loaded machine;
    # a read timeout longer than the floor so the watchdog, not the socket, ends the stall.
    cfg.write_text("features:\n  enabled: false\nprobe:\n  input_timeout_s: 8\n  input_timeout_per_video_s: 100\n"
                   "  read_timeout_s: 120\n")
    cmd = [sys.executable, "jobs/curate.py", "--input", str(inp), str(lst), str(root / "list.parquet"),
           "--output", str(out), "--config", str(cfg)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    (root / "curate.stderr").write_text(r.stderr)  # kept with the pytest temp dir for a failing run
    return {"root": root, "inp": inp, "out": out, "proc": r, "good_http": good_http, "server": server}


def _videos(out: Path) -> dict[str, dict]:
    return {v["uri"]: v for v in pq.read_table(out / "videos.parquet").to_pylist()}


@pytest.mark.long  # the shared job: ~40 s idle, 80 s on a loaded machine
def test_job_exits_0_and_accounts_for_every_input(job):
    r, out, inp, root, url = job["proc"], job["out"], job["inp"], job["root"], job["server"].url
    assert r.returncode == 0, r.stderr[-4000:]
    videos = _videos(out)
    reasons = {uri: (v["status"], v["reason"]) for uri, v in videos.items()}
    expected = {
        **{str(inp / n): ("kept", None) for n in HOSTILE_NAMES},
        job["good_http"]: ("kept", None),
        str(inp / "sub" / "up"): ("rejected", "symlink loop"),
        str(inp / "self.mp4"): ("rejected", "symlink loop"),
        str(inp / "dangling.mp4"): ("rejected", "file not found"),
        str(inp / "clip.mp4"): ("rejected", "not a file"),
        str(root / "elsewhere.mov"): ("rejected", "not a file"),
        str(root / "missing.mp4"): ("rejected", "file not found"),
        str(root / "also-missing.mp4"): ("rejected", "file not found"),
        str(root / SCRIPT_NAME): ("rejected", "file not found"),
        f"{url}/404/gone.mp4": ("rejected", "HTTP 404"),
        f"{url}/500/broken.mp4": ("rejected", "HTTP 500"),
        f"{url}/stall/slow.mp4": ("rejected", "timed out"),
    }
    assert reasons == expected
    rejects = {r["uri"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist() if r["clip_index"] == -1}
    assert set(rejects) == {u for u, (s, _) in expected.items() if s == "rejected"}
    for uri, rej in rejects.items():  # the detail names the input
        assert uri in rej["detail"], rej
    assert "directory above it" in rejects[str(inp / "sub" / "up")]["detail"]
    assert "nowhere.mp4" in rejects[str(inp / "dangling.mp4")]["detail"]
    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["inputs"] == len(expected) and summary["inputs_kept"] == 3
    assert summary["inputs_rejected_by_reason"] == {"HTTP 404": 1, "HTTP 500": 1, "file not found": 4,
                                                    "not a file": 2, "symlink loop": 2, "timed out": 1}
    # list.txt: a duplicate line and an entry already found in the directory; list.parquet: a
    # duplicate and an entry already in list.txt. Blank: 3 lines of list.txt, 2 cells of the parquet.
    assert summary["input_duplicates"] == 4 and summary["input_blank_entries"] == 5


@pytest.mark.long  # the shared job: ~40 s idle, 80 s on a loaded machine
def test_a_stalled_input_does_not_hold_the_job(job):
    """The stall lasts STALL_S (an hour): the job finished, so it did not wait for it; the
    watchdog named what it abandoned."""
    r = job["proc"]
    assert r.returncode == 0
    rej = [x for x in pq.read_table(job["out"] / "rejects.parquet").to_pylist() if x["reason"] == "timed out"]
    assert len(rej) == 1 and rej[0]["stage"] == "probe" and "per-input limit of 8 s" in rej[0]["detail"]
    assert "did not finish" in rej[0]["detail"]  # the watchdog ended it: the read was blocked, no check could run
    assert not job["server"].release.is_set()  # still stalling while we check


@pytest.mark.long  # the shared job: ~40 s idle, 80 s on a loaded machine
def test_output_names_stay_inside_the_output_and_keys_are_valid(job):
    """Also after the jobs that rewrite or add files to an output (refilter, identities, stats)."""
    out = Path(os.path.realpath(job["out"]))
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import identities
        import refilter
        import stats
    finally:
        sys.path.pop(0)
    cfg = job["root"] / "refilter.yaml"
    cfg.write_text("filters:\n  sharpness_min: 10.0\n")
    assert refilter.main([str(out), "--config", str(cfg)]) == 0
    assert identities.main([str(out)]) == 0
    assert stats.main([str(out), "--thumbs", "2"]) == 0
    page = (out / "report" / "index.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;amp;.mp4" in page
    n_files = 0
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            assert not p.is_symlink(), p
            assert os.path.realpath(p).startswith(str(out) + os.sep), p
            n_files += 1
    assert n_files > 5
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) >= 3
    all_keys = [m["key"] for m in manifest] + [
        r["key"] for r in pq.read_table(out / "rejects.parquet").to_pylist() if r["key"]]
    for key in all_keys:
        assert schemas.SAMPLE_KEY_PATTERN.match(key) and len(key) <= 80, key
    for m in manifest:
        assert m["key"].startswith(video_id_for(m["uri"]))
        assert (out / m["shard"]).resolve().is_relative_to(out)
        with tarfile.open(out / m["shard"]) as tar:
            for member in tar.getmembers():
                assert member.isfile() and "/" not in member.name and not member.name.startswith(".."), member.name


@pytest.mark.parametrize("uri", [
    "../../x.mp4", "/etc/passwd", "http://h/a%2F..%2F..%2Fb.mp4", "s3://b/..%2F%2Fetc%2Fshadow.mkv",
    "/in/" + "é" * 200 + ".mp4", "/in/\x01\x02\x7f\x1b[0m.mp4", "/in/....mp4", "/in/-.mp4", "", "/", "http://h/?q=/../x",
])
def test_video_ids_of_hostile_uris_are_plain_bounded_keys(uri):
    vid = video_id_for(uri)
    assert schemas.SAMPLE_KEY_PATTERN.match(vid) and len(vid) <= 65 and not vid.startswith("-")
    from pipeline.shards import check_key
    from pipeline.stages import sample_key

    check_key(sample_key(vid, 9999))


def test_listing_does_not_follow_a_symlink_loop(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "x.mp4").write_bytes(b"x")
    os.symlink(tmp_path / "d", tmp_path / "d" / "a" / "loop")
    names = [Path(i.uri).relative_to(tmp_path / "d").as_posix() for i in expand_inputs([str(tmp_path / "d")])]
    assert names == ["a/loop", "a/x.mp4"]
    with pytest.raises(MediaError, match="symlink loop"):
        check_input(str(tmp_path / "d" / "a" / "loop"))


def test_fifo_is_not_a_file_and_is_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.mp4")  # opening it would block until a writer came
    with pytest.raises(MediaError, match="not a file") as e:
        check_input(str(tmp_path / "pipe.mp4"))
    assert "FIFO" in str(e.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_unreadable_file_and_directory_are_permission_denied_rejects(media):
    """As root every file is readable, so expansion and the probe stage run in a forked child as
    nobody (uid 65534), where the kernel really refuses: a file without read permission and a
    directory that cannot be listed (fsspec's walk would omit it) both become rejects rows."""
    from pipeline.config import load_config
    from pipeline.stages import ProbeStage, new_row

    d = Path(tempfile.mkdtemp(prefix="perm-"))
    try:
        d.chmod(0o755)
        (d / "locked").mkdir(mode=0o700)
        (d / "locked" / "hidden.mp4").write_bytes(media.read_bytes())
        f = d / "secret.mp4"
        f.write_bytes(media.read_bytes())
        f.chmod(0o200)  # write-only: no read permission for anyone but root
        (d / "open.mp4").write_bytes(media.read_bytes())
        stage = ProbeStage(load_config(None))
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop root, expand and probe, report
            try:
                os.close(rfd)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                result = {}
                for item in expand_inputs([str(d)]):
                    out = stage(new_row(item.video_id, item.uri, item.source, "video", {}))
                    result[Path(item.uri).name] = [out["kind"], json.loads(out["payload"]).get("reason"),
                                                   json.loads(out["payload"]).get("detail")]
                os.write(wfd, json.dumps(result).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            data = r.read()
        os.waitpid(pid, 0)
        result = json.loads(data)
        assert {k: v[:2] for k, v in result.items()} == {
            "locked": ["reject", "permission denied"], "secret.mp4": ["reject", "permission denied"],
            "open.mp4": ["video", None]}
        assert str(f) in result["secret.mp4"][2] and "-w-------" in result["secret.mp4"][2]
        assert "cannot list" in result["locked"][2]
        row = new_row(video_id_for(str(f)), str(f), "t", "video", {})
        assert stage(row)["kind"] == "video"  # as root the same file probes fine
    finally:
        shutil.rmtree(d)


def test_watchdog_abandons_a_call_blocked_in_the_kernel(tmp_path):
    """A call that never returns (an open() of a FIFO without a writer blocks in the kernel, as
    a hung native decoder would) becomes a "timed out" MediaError; the thread is counted as
    stuck until it is released."""
    fifo = tmp_path / "hang"
    os.mkfifo(fifo)
    before = stuck_threads()
    with pytest.raises(MediaError) as e:
        run_with_deadline(lambda: open(fifo, "rb").read(), seconds=0.5, uri=str(fifo), what="probe")
    assert e.value.reason == "timed out" and str(fifo) in str(e.value)
    assert stuck_threads() == before + 1
    with open(fifo, "wb"):  # a writer: the stuck open returns, reads EOF, the thread ends
        pass
    for t in threading.enumerate():
        if t.name.startswith("deadline probe") and str(fifo) in t.name:
            t.join(10)
    assert stuck_threads() == before
    # a call that returns in time gives its value; its exception is raised as is
    assert run_with_deadline(lambda: 42, seconds=5, uri="u", what="x") == 42
    with pytest.raises(ZeroDivisionError):
        run_with_deadline(lambda: 1 / 0, seconds=5, uri="u", what="x")


def test_http_read_timeout_and_status_reasons(server):
    """Remote opens carry aiohttp read timeouts: a stalled body fails after read_timeout_s, not
    after aiohttp's 5-minute default or never; 404 and 500 get their own reasons."""
    with input_deadline(60, read_timeout_s=1.0):
        with pytest.raises(MediaError) as e:
            probe(f"{server.url}/stall/unit.mp4")
    assert e.value.reason == "timed out", e.value
    for code in (404, 500):
        with pytest.raises(MediaError) as e:
            probe(f"{server.url}/{code}/x.mp4")
        assert e.value.reason == f"HTTP {code}", e.value
    assert probe(f"{server.url}/good/x.mp4").duration_s > 2.5


def test_s3_inputs_open_with_read_timeouts(media, monkeypatch):
    """s3 opens carry botocore connect/read timeouts (probe.read_timeout_s) and still read (moto
    server on 127.0.0.1); a missing object is "file not found"."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    boto3 = pytest.importorskip("boto3")
    from pipeline.media import _remote_options

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        for k, v in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_ENDPOINT_URL=endpoint,
                         AWS_DEFAULT_REGION="us-east-1").items():
            monkeypatch.setenv(k, v)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="raw-videos")
        client.put_object(Bucket="raw-videos", Key="a b.mp4", Body=media.read_bytes())
        with input_deadline(60, read_timeout_s=7.0):
            assert _remote_options("s3://raw-videos/a b.mp4") == {
                "config_kwargs": {"connect_timeout": 7.0, "read_timeout": 7.0}}
            assert probe("s3://raw-videos/a b.mp4").duration_s > 2.5
            with pytest.raises(MediaError) as e:
                probe("s3://raw-videos/none.mp4")
        assert e.value.reason == "file not found" and "none.mp4" in str(e.value)
    finally:
        server.stop()


def test_mid_decode_failures_get_transport_reasons_but_local_faults_stay_retryable():
    """A network failure after the probe (the server errs or stalls while frames are read) is the
    input's: a final reject with its reason. A local OSError (the actor's temp disk is full) is
    not: it stays an "internal error", which the next run retries."""
    import errno

    import aiohttp

    from pipeline.bookkeeper import _is_retryable
    from pipeline.stages import _crash_reject, new_row

    def reason(uri, exc):
        return json.loads(_crash_reject(new_row("v", uri, "s", "video", {}), "detect", exc)["payload"])["reason"]

    url = "http://127.0.0.1:9/x.mp4"
    try:
        raise FileNotFoundError(url) from aiohttp.ClientResponseError(None, (), status=503, message="Unavailable")
    except FileNotFoundError as e:
        assert reason(url, e) == "HTTP 503"
    assert reason(url, aiohttp.ServerTimeoutError("Timeout on reading data from socket")) == "timed out"
    assert reason(url, TimeoutError()) == "timed out"
    full = OSError(errno.ENOSPC, "No space left on device")
    assert reason(url, full) == reason("/in/a.mp4", full) == "internal error"
    assert _is_retryable({"reason": "internal error"}) and not _is_retryable({"reason": "timed out"})
    assert _is_retryable({"reason": "HTTP 503"}) and not _is_retryable({"reason": "HTTP 404"})


def test_every_decode_loop_checks_the_deadline(media):
    """Past the deadline, probe, frame decoding (plain and tolerant) and audio decoding stop with
    "timed out" at their next packet; outside a deadline the same calls run to the end."""
    from pipeline.media import DecodeLog, decode_audio_track, iter_frames

    calls = {"probe": lambda: probe(str(media)), "frames": lambda: list(iter_frames(str(media))),
             "tolerant frames": lambda: list(iter_frames(str(media), damage=DecodeLog())),
             "audio": lambda: decode_audio_track(str(media))}
    for name, call in calls.items():
        with input_deadline(-1.0):
            with pytest.raises(MediaError) as e:
                call()
        assert e.value.reason == "timed out", name
    assert len(calls["frames"]()) == 65 and len(calls["audio"]().samples) > 2.5 * 16000


def test_detection_past_its_limit_is_a_timed_out_reject(media):
    """The detect stage's own limit (max(floor, per-second x duration)) ends a detection that
    runs too long: a "timed out" reject of stage detect, not a stuck actor."""
    from pipeline.config import load_config
    from pipeline.stages import DetectTrackStage, ProbeStage, new_row

    tight = load_config(None, **{"probe.input_timeout_s": 0.001, "probe.input_timeout_per_video_s": 0.0})
    stage = DetectTrackStage(tight)
    stage.probe = ProbeStage(load_config(None))  # probe under the default limit; detection under the tight one
    out = stage(new_row("v", str(media), "s", "video", {}))
    payload = json.loads(out["payload"])
    assert out["kind"] == "reject" and payload["stage"] == "detect" and payload["reason"] == "timed out", payload
    assert str(media) in payload["detail"]
