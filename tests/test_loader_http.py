"""Reading over plain HTTP (a static file server on 127.0.0.1) gives the same samples as local."""
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from loader_fixtures import loader_config, make_dataset
from loopy_model.data import StreamingLoader, StreamingWindowDataset

pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_matches_local(tmp_path):
    root = make_dataset(tmp_path / "ds", [4, 6, 2], frames=(12, 40))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        remote = StreamingWindowDataset(loader_config(uri, global_batch_size=4, where="sync_conf >= 0",
                                                      cache_dir=str(tmp_path / "cache"), verify_sha256=True), 0, 1)
        local = StreamingWindowDataset(loader_config(root, global_batch_size=4, where="sync_conf >= 0"), 0, 1)
        assert remote.fingerprint == local.fingerprint
        for a, b in zip(StreamingLoader(local), StreamingLoader(remote), strict=True):
            assert a["keys"] == b["keys"] and torch.equal(a["latents"], b["latents"])
    finally:
        server.shutdown()
