"""The output store behaves the same on a local directory and on an S3 API (moto on 127.0.0.1):
whole objects or none, create-if-absent, listing, deleting."""
from __future__ import annotations

import hashlib

import pytest

from pipeline.store import FsspecStore, LocalStore, open_store

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")


def test_open_store_picks_the_backend(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store(f"file://{tmp_path}").local_path("a/b") == tmp_path / "a" / "b"
    assert isinstance(open_store("memory://bucket/x"), FsspecStore)


def test_put_read_list_delete(store):
    store.put_bytes("a.json", b"{}")
    store.put_bytes("shards/s-1.tar", b"x" * 10)
    store.put_bytes("_journal/shards/000001.json", b"1")
    assert store.read_bytes("shards/s-1.tar") == b"x" * 10
    assert store.list() == ["_journal/shards/000001.json", "a.json", "shards/s-1.tar"]
    assert store.list("shards") == ["shards/s-1.tar"]
    assert store.list("nothing-here") == []
    assert store.exists("a.json") and not store.exists("b.json")
    store.put_bytes("a.json", b"[]")  # overwrite
    assert store.read_bytes("a.json") == b"[]"
    store.delete("a.json")
    store.delete("a.json")  # missing: not an error
    assert not store.exists("a.json")
    assert store.uri("shards/s-1.tar").endswith("/shards/s-1.tar")


def test_streaming_upload_is_whole_or_nothing(store):
    # 12 MB in 1 MB writes: s3fs uploads it in parts (multipart), visible only once committed.
    chunk = bytes(range(256)) * 4096
    with store.open_write("shards/big.tar") as up:
        for _ in range(12):
            up.write(chunk)
        assert not store.exists("shards/big.tar")
    assert up.size == 12 * len(chunk)
    assert up.sha256 == hashlib.sha256(chunk * 12).hexdigest()
    assert store.read_bytes("shards/big.tar") == chunk * 12

    with pytest.raises(RuntimeError):
        with store.open_write("shards/aborted.tar") as up:
            for _ in range(7):
                up.write(chunk)
            raise RuntimeError("writer died")
    assert not store.exists("shards/aborted.tar")
    assert store.list("shards") == ["shards/big.tar"]
    if store.is_local:  # no temp file left beside it
        assert sorted(p.name for p in store.local_path("shards").iterdir()) == ["big.tar"]


def test_put_if_absent_creates_once(store):
    assert store.put_if_absent("_journal/lock.json", b"first")
    assert not store.put_if_absent("_journal/lock.json", b"second")
    assert store.read_bytes("_journal/lock.json") == b"first"
    store.delete("_journal/lock.json")
    assert store.put_if_absent("_journal/lock.json", b"third")


@pytest.mark.parametrize("name", ["", "/abs", "../up", "a/../../b", "a//b", "a\\b"])
def test_names_stay_inside_the_output(tmp_path, name):
    with pytest.raises(ValueError, match="inside the output"):
        open_store(tmp_path).put_bytes(name, b"")
