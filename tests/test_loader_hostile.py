"""Hostile shards and indexes (issue 12): refused with the file and the problem named, nothing
read or written outside the dataset root / shard cache; a benign dataset still loads."""
import functools
import hashlib
import io
import json
import os
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from loader_fixtures import loader_config, make_dataset, take
from loopy_model.data import StreamingLoader, StreamingWindowDataset
from loopy_model.data.index import DatasetIndex
from loopy_model.data.store import ShardFile, ShardStore


def _rewrite_shard(root, hostile) -> str:
    """Rewrite shard 0 of ``root`` with its members plus ``hostile(tar)`` appended (raw bytes when
    ``hostile`` returns them, e.g. a header declaring a huge size); fix index.json's filesize and
    sha256 so only the tar content is hostile. Returns the shard path."""
    index = json.loads((root / "index.json").read_text())
    entry = index["shardlist"][0]
    path = root / entry["url"]
    buf = io.BytesIO()
    with tarfile.open(path, "r:") as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m))
        tail = hostile(dst)
        end = dst.offset
    data = buf.getvalue()
    if tail is not None:  # raw header(s) in place of the end-of-archive blocks
        data = data[:end] + tail
    path.write_bytes(data)
    entry["filesize"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (root / "index.json").write_text(json.dumps(index))
    return str(path)


def _add(name, data=b"x", **attrs):
    def hostile(tar):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        for k, v in attrs.items():
            setattr(info, k, v)
        tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return hostile


def _huge_member(tar):
    info = tarfile.TarInfo("vid000_0000.extra.npy")
    info.size = 1 << 40  # a terabyte declared, nothing behind it
    return info.tobuf(tarfile.GNU_FORMAT) + bytes(1024)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("clean"), [3, 2], frames=(12, 20))


def _copy(clean, tmp_path):
    import shutil
    return shutil.copytree(clean, tmp_path / "ds")


CASES = [
    ("absolute", _add("/etc/passwd"), "has an absolute name"),
    ("dotdot", _add("../../outside.npy"), "'..' component"),
    ("dotdot_inner", _add("vid000_0000/../../x.npy"), "'..' component"),
    ("backslash", _add("..\\evil.npy"), "backslash"),
    ("symlink", _add("vid000_0000.link.npy", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    ("hardlink", _add("vid000_0000.hard.npy", b"", type=tarfile.LNKTYPE, linkname="vid000_0000.latent.npy"),
     "hard link"),
    ("chardev", _add("vid000_0000.dev", b"", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "device or fifo"),
    ("fifo", _add("vid000_0000.fifo", b"", type=tarfile.FIFOTYPE), "device or fifo"),
    ("pickle", _add("vid000_0000.state.pkl", b"\x80\x04N."), "pickle-capable"),
    ("pth", _add("vid000_0000.weights.pth", b"PK\x03\x04"), "pickle-capable"),
    ("npz", _add("vid000_0000.extra.npz", b"PK\x03\x04"), "pickle-capable"),
    ("huge_size", _huge_member, "past the end"),
]


@pytest.mark.parametrize("name,hostile,problem", CASES, ids=[c[0] for c in CASES])
def test_hostile_member_refused(clean, tmp_path, name, hostile, problem):
    root = _copy(clean, tmp_path)
    shard = _rewrite_shard(root, hostile)
    with pytest.raises(ValueError) as err:
        ShardFile(shard)
    msg = str(err.value)
    assert shard in msg and problem in msg, msg
    # the member is named too (tar may normalise the name of special members, never drop it)
    assert "member '" in msg


def test_unknown_member_ignored(clean, tmp_path):
    """A non-pickle member the contract does not list is never read: the shard still opens."""
    root = _copy(clean, tmp_path)
    shard = _rewrite_shard(root, _add("vid000_0000.notes.txt", b"hello"))
    f = ShardFile(shard)
    assert f.members["vid000_0000"]["notes.txt"][1] == 5
    assert f.npy("vid000_0000", "latent.npy").shape[1:] == (4, 4, 4)


def test_object_npy_refused(clean, tmp_path):
    root = _copy(clean, tmp_path)
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    shard = _rewrite_shard(root, _add("vid000_0000.objs.npy", obj.getvalue()))
    with pytest.raises(ValueError, match=r"vid000_0000\.objs\.npy: only C-order, non-object"):
        ShardFile(shard).npy("vid000_0000", "objs.npy")


def test_not_a_tar_names_the_shard(clean, tmp_path):
    """A shard that is not a tar (an HTML error page saved under its name) is refused naming it."""
    root = _copy(clean, tmp_path)
    shard = root / json.loads((root / "index.json").read_text())["shardlist"][0]["url"]
    shard.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=rf"{shard}: not a readable tar shard"):
        ShardFile(str(shard))


@pytest.mark.parametrize("url,problem", [("/etc/passwd", "is absolute"), ("../other/shard.tar", "'..' component"),
                                         ("shards/../../x.tar", "'..' component"), ("s3://b/x.tar", "is absolute"),
                                         ("a\\..\\x.tar", "backslash"), ("", "empty")])
def test_hostile_index_url_refused(clean, tmp_path, url, problem):
    root = _copy(clean, tmp_path)
    index = json.loads((root / "index.json").read_text())
    index["shardlist"][1]["url"] = url
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        DatasetIndex.load(str(root))
    msg = str(err.value)
    assert f"{root}/index.json" in msg and repr(url) in msg and problem in msg, msg


def test_cache_path_refused_before_any_write(clean, tmp_path):
    """Even an index built in code (bypassing load) cannot make the store write outside its cache."""
    index = DatasetIndex.load(str(clean))
    remote = DatasetIndex("memory://hostile", index.raw)
    object.__setattr__(remote.shards[0], "url", "../../escaped.tar")
    store = ShardStore(remote, cache_dir=str(tmp_path / "cache"))
    try:
        before = set(os.listdir(tmp_path))
        with pytest.raises(ValueError, match=r"memory://hostile/index.json: shard url '\.\./\.\./escaped\.tar'"):
            store.open(0)
        assert set(os.listdir(tmp_path)) == before
        assert os.listdir(store.cache_dir) == []
    finally:
        store.close()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_remote_hostile_shard_reaches_user(clean, tmp_path):
    """Over HTTP, a hostile shard is refused in the reading thread and the error, naming the shard,
    reaches the training loop; only the cache directory is written to."""
    pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp")
    root = _copy(clean, tmp_path)
    shard = _rewrite_shard(root, _add("../../outside.npy"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = {p for p in tmp_path.rglob("*")}
    cache = tmp_path / "cache"
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        ds = StreamingWindowDataset(loader_config(uri, global_batch_size=5, cache_dir=str(cache)), 0, 1)
        with pytest.raises(ValueError) as err:
            take(StreamingLoader(ds), 1)
    finally:
        server.shutdown()
    msg = str(err.value)
    assert os.path.basename(shard) in msg and "'../../outside.npy'" in msg and "'..' component" in msg, msg
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(cache in p.parents or p == cache for p in written), written


def test_benign_dataset_loads(clean, tmp_path):
    root = _copy(clean, tmp_path)
    batches = take(StreamingLoader(StreamingWindowDataset(loader_config(root, global_batch_size=5), 0, 1)), 1)
    assert len(batches[0]["keys"]) == 5


def test_worker_refusal_names_the_shard(clean, tmp_path):
    """In a DataLoader worker process (as training runs it) the refusal still names shard and member."""
    root = _copy(clean, tmp_path)
    shard = _rewrite_shard(root, _add("vid000_0000.link.npy", b"", type=tarfile.SYMTYPE, linkname="/etc/shadow"))
    loader = StreamingLoader(StreamingWindowDataset(loader_config(root, global_batch_size=5), 0, 1), num_workers=1)
    with pytest.raises(ValueError) as err:
        take(loader, 1)
    msg = str(err.value)
    assert shard in msg and "'vid000_0000.link.npy' is a symbolic link" in msg, msg
