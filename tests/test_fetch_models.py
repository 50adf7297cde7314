"""jobs/fetch_models.py against a real HTTP server on 127.0.0.1 serving files made here."""
import functools
import hashlib
import http.server
import importlib.util
import json
import re
import threading
from pathlib import Path

import pytest

from pipeline.models.registry import FULL_MODELS, LOCK_FILE, ModelFile, ModelSpec, require_file, require_model

ROOT = Path(__file__).resolve().parents[1]


def _load_job():
    spec = importlib.util.spec_from_file_location("fetch_models_job", ROOT / "jobs" / "fetch_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fetch_job = _load_job()


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture()
def server(tmp_path):
    """(served directory, base URL, list of request paths)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = type("H", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}", handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def _publish(served: Path, rel: str, data: bytes) -> str:
    p = served / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _registry(base: str, pinned: str, pinned_size: int | None = None) -> dict:
    return {
        "pinned": ModelSpec("pinned", "test/pinned", (ModelFile("pinned/w.safetensors", f"{base}/up/w.safetensors",
                                                                sha256=pinned, size=pinned_size),)),
        "tofu": ModelSpec("tofu", "test/tofu", (ModelFile("t.onnx", f"{base}/up/t.onnx"),)),
    }


def _leftovers(d: Path):
    return [p for p in d.rglob("*") if ".part" in p.name or ".tmp" in p.name]


def test_download_verify_skip_and_tofu(tmp_path, server):
    served, base, requests = server
    w = b"weights" * 1000
    digest = _publish(served, "up/w.safetensors", w)
    tofu_digest = _publish(served, "up/t.onnx", b"onnx-bytes")
    models = tmp_path / "models"
    reg = _registry(base, digest, len(w))

    assert fetch_job.main(["--profile", "full", "--dir", str(models)], registry=reg) == 0
    assert (models / "pinned/w.safetensors").read_bytes() == w
    assert (models / "t.onnx").read_bytes() == b"onnx-bytes"
    lock = json.loads((models / LOCK_FILE).read_text())
    assert lock["t.onnx"]["sha256"] == tofu_digest  # trust on first use: recorded
    assert lock["pinned/w.safetensors"]["sha256"] == digest
    assert len(requests) == 2 and not _leftovers(models)

    # second run: both present with the right checksum -> no request at all
    assert fetch_job.main(["--dir", str(models)], registry=reg) == 0
    assert len(requests) == 2

    # the upstream TOFU file changes: a fresh download no longer matches the recorded hash
    (models / "t.onnx").unlink()
    _publish(served, "up/t.onnx", b"tampered")
    assert fetch_job.main(["--dir", str(models)], registry=reg) == 1
    assert not (models / "t.onnx").exists() and not _leftovers(models)


def test_checksum_mismatch_is_an_error_and_installs_nothing(tmp_path, server, capsys):
    served, base, _ = server
    _publish(served, "up/w.safetensors", b"not the weights")
    _publish(served, "up/t.onnx", b"x")
    models = tmp_path / "models"
    rc = fetch_job.main(["--dir", str(models)], registry=_registry(base, "0" * 64))
    assert rc == 1
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and "pinned/w.safetensors" in err
    assert not (models / "pinned/w.safetensors").exists()
    assert (models / "t.onnx").exists()  # the other file is still fetched
    assert not _leftovers(models)


def test_corrupt_local_file_is_replaced(tmp_path, server):
    served, base, requests = server
    digest = _publish(served, "up/w.safetensors", b"good")
    _publish(served, "up/t.onnx", b"x")
    models = tmp_path / "models"
    (models / "pinned").mkdir(parents=True)
    (models / "pinned/w.safetensors").write_bytes(b"bad!")
    assert fetch_job.main(["--dir", str(models), "--only", "pinned"], registry=_registry(base, digest)) == 0
    assert (models / "pinned/w.safetensors").read_bytes() == b"good"
    assert requests == ["/up/w.safetensors"]


def test_base_url_mirror_and_http_errors(tmp_path, server, capsys):
    served, base, requests = server
    digest = _publish(served, "mirror/pinned/w.safetensors", b"mirrored")
    models = tmp_path / "models"
    reg = _registry("http://upstream.invalid", digest)
    assert fetch_job.main(["--dir", str(models), "--only", "pinned", "--base-url", f"{base}/mirror"], registry=reg) == 0
    assert requests == ["/mirror/pinned/w.safetensors"]
    assert fetch_job.main(["--dir", str(models), "--only", "tofu", "--base-url", f"{base}/mirror"], registry=reg) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert fetch_job.main(["--dir", str(models), "--only", "nope"], registry=reg) == 1


def test_registry_entries_are_well_formed():
    assert {"sd-vae", "wav2vec2", "dwpose", "scrfd", "syncnet"} <= set(FULL_MODELS)
    paths = [f.path for m in FULL_MODELS.values() for f in m.files]
    assert len(paths) == len(set(paths))
    for m in FULL_MODELS.values():
        for f in m.files:
            assert not f.path.startswith("/") and ".." not in f.path
            assert f.url.startswith("https://")
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256)
    assert FULL_MODELS["dwpose"].files[0].url.endswith("yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx")


def test_require_file_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dw-ll_ucoco_384\.onnx.*fetch_models"):
        require_model(tmp_path, "dwpose")
    with pytest.raises(FileNotFoundError, match="no model_dir"):
        require_file(None, "x.onnx")
    (tmp_path / "dw-ll_ucoco_384.onnx").write_bytes(b"x")
    assert require_model(tmp_path, "dwpose") == tmp_path / "dw-ll_ucoco_384.onnx"
