"""Shard access: local files in place, remote shards through a bounded on-disk LRU cache.

- Local dataset (a directory): shards are read where they are, by byte range (``os.pread``).
- Remote dataset (any fsspec URI: s3://, gs://, http://): a shard is downloaded whole into
  ``cache_dir`` (like MosaicML streaming's local cache), then read by byte range. Downloads run
  in background threads ahead of use (prefetch), retry with exponential backoff, are checked
  against index.json's filesize (always) and sha256 (``verify``), and land by atomic rename.
  The cache is shared by all DataLoader workers of a node (a lock file per shard keeps two
  processes from fetching the same shard) and kept under ``cache_limit_bytes`` by evicting the
  least recently used shards. A shard evicted while a worker has it open stays readable
  through the open descriptor (POSIX unlink semantics).

Inside a shard, samples are located through the tar headers (member name -> data offset,
size), read once per shard. ``.npy`` members are read row by row: only the frames a training
window uses are read, never the whole clip.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import random
import tarfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .index import DatasetIndex, is_local, open_fs, shard_url_problem

log = logging.getLogger(__name__)


def retry(fn, *, retries: int, backoff_s: float, what: str):
    """Call ``fn`` up to ``retries + 1`` times, sleeping backoff * 2**i (+ jitter) between."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - object stores raise many kinds
            if attempt == retries:
                raise RuntimeError(f"{what}: failed after {retries + 1} attempts: {exc}") from exc
            delay = backoff_s * 2 ** attempt * (1 + 0.25 * random.random())
            log.warning("%s: %s; retry %d/%d in %.2fs", what, exc, attempt + 1, retries, delay)
            time.sleep(delay)


class NpyMember:
    """A ``.npy`` member inside an open shard: header parsed, rows read on demand."""

    def __init__(self, owner: "ShardFile", offset: int, size: int, name: str):
        self.owner = owner  # keeps the shard's descriptor open while this member is in use
        fd = owner.fd
        head = os.pread(fd, min(size, 4096), offset)
        buf = io.BytesIO(head)
        major, _ = np.lib.format.read_magic(buf)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = reader(buf)
        if fortran or self.dtype.hasobject:
            raise ValueError(f"{name}: only C-order, non-object .npy members are readable")
        self.fd, self.name = fd, name
        self.data_offset = offset + buf.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self.data_offset + self.shape[0] * self.row_bytes > offset + size:
            raise ValueError(f"{name}: truncated .npy member")
        self.bytes_read = buf.tell()

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, index) -> np.ndarray:
        """Rows ``index`` (any order, repeats allowed) -> [len(index), *shape[1:]]."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"{self.name}: rows {index.min()}..{index.max()} outside 0..{self.shape[0] - 1}")
        wanted = np.unique(index)
        out = np.empty((len(wanted),) + tuple(self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(wanted), -1).view(np.uint8)
        # coalesce consecutive rows into one read each
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(wanted)]])):
            n = (hi - lo) * self.row_bytes
            data = os.pread(self.fd, n, self.data_offset + int(wanted[lo]) * self.row_bytes)
            flat[lo:hi] = np.frombuffer(data, dtype=np.uint8).reshape(hi - lo, self.row_bytes)
            self.bytes_read += n
        return out[np.searchsorted(wanted, index)]


# Members a loader must never meet: formats that can carry pickles (code run on load). Our
# members (schemas.MEMBERS) are .npy (read with object dtype refused), .json and .mp4; other
# unknown members are never read, so they are ignored rather than refused.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".pt", ".ckpt", ".npz", ".joblib")


def hostile_member_problem(m: tarfile.TarInfo, file_size: int) -> str | None:
    """Why tar member ``m`` makes its shard unsafe or corrupt, else None (issue 12).

    The loader never extracts, but a shard with such members was not written by our pipeline
    (pipeline/shards.py writes flat regular files): refuse it whole rather than guess."""
    name = m.name
    if "\\" in name or "\0" in name:
        return "has a backslash or NUL in its name"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute name"
    if ".." in name.split("/"):
        return "has a '..' component in its name"
    if m.issym() or m.islnk():
        return f"is a {'symbolic' if m.issym() else 'hard'} link (to {m.linkname!r})"
    if m.isdev():
        return "is a device or fifo"
    if name.lower().endswith(PICKLE_SUFFIXES):
        return "is a pickle-capable format (.pkl/.pth/.pt/.ckpt/.npz...)"
    if m.isfile() and m.offset_data + m.size > file_size:
        return f"declares {m.size} bytes, past the end of the {file_size}-byte file"
    return None


class ShardFile:
    """An open shard: key -> {member: (data offset, size)} from its tar headers."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.members: dict[str, dict[str, tuple[int, int]]] = {}
        file_size = os.fstat(self.fd).st_size
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    problem = hostile_member_problem(m, file_size)
                    if problem:
                        raise ValueError(f"{path}: member {m.name!r} {problem}; refusing this shard")
                    if m.isfile():
                        key, _, member = m.name.partition(".")
                        self.members.setdefault(key, {})[member] = (m.offset_data, m.size)
        except tarfile.TarError as e:  # not a tar, or a damaged header: name the shard, not just tarfile's words
            raise ValueError(f"{path}: not a readable tar shard ({type(e).__name__}: {e})") from e
        self.keys = list(self.members)

    def npy(self, key: str, member: str) -> NpyMember:
        try:
            offset, size = self.members[key][member]
        except KeyError:
            raise KeyError(f"{self.path}: sample {key!r} has no member {member!r}") from None
        return NpyMember(self, offset, size, f"{os.path.basename(self.path)}:{key}.{member}")

    def __del__(self):  # closed by refcount, never under a thread still reading it
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)


class ShardStore:
    """Per-process access to the shards of one dataset (create it inside each worker)."""

    def __init__(self, index: DatasetIndex, *, cache_dir: str | None = None,
                 cache_limit_bytes: int = 64 << 30, verify: bool = False, retries: int = 4,
                 backoff_s: float = 0.5, download_threads: int = 2, max_open: int = 16):
        self.index, self.verify = index, verify
        self.retries, self.backoff_s = retries, backoff_s
        self.fs, self.root = open_fs(index.uri, index.storage_options)
        self.local = is_local(self.fs)
        self.cache_dir = None
        if not self.local:
            if cache_dir is None:
                raise ValueError(f"{index.uri} is remote: give cache_dir (a local directory for shards)")
            biggest = max((s.filesize for s in index.shards), default=0)
            if cache_limit_bytes < 2 * biggest:
                raise ValueError(f"cache_limit_bytes={cache_limit_bytes} is below two shards ({2 * biggest} bytes)")
            self.cache_dir = os.path.join(cache_dir, index.fingerprint(np.zeros(0))[:16])
            os.makedirs(self.cache_dir, exist_ok=True)
        self.cache_limit_bytes = cache_limit_bytes
        self._pool = ThreadPoolExecutor(download_threads, thread_name_prefix="shard-fetch")
        self._pending: dict[int, Future] = {}
        self._open: OrderedDict[int, ShardFile] = OrderedDict()
        self._lock = threading.Lock()
        self.max_open = max_open
        self.bytes_downloaded = 0
        self._verified: set[int] = set()

    # -- locating shard files
    def _local_path(self, shard: int) -> str:
        return os.path.join(self.root, self.index.shards[shard].url)

    def _cache_path(self, shard: int) -> str:
        url = self.index.shards[shard].url
        name = url.replace("/", "__")
        path = os.path.join(self.cache_dir, name)
        # DatasetIndex refused unsafe urls already; this guards the one place we write
        if shard_url_problem(url) or name in (".", "") or os.path.dirname(path) != self.cache_dir:
            raise ValueError(f"{self.index.uri}/index.json: shard url {url!r} does not name a file "
                             f"inside the cache directory {self.cache_dir}")
        return path

    def _check(self, shard: int, path: str, digest: str | None) -> None:
        entry = self.index.shards[shard]
        size = os.path.getsize(path)
        if size != entry.filesize:
            raise IOError(f"{entry.url}: {size} bytes, index.json says {entry.filesize}")
        if self.verify and digest is None and shard not in self._verified:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            digest = h.hexdigest()
        if digest is not None and digest != entry.sha256:
            raise IOError(f"{entry.url}: sha256 {digest[:12]}.. != index.json {entry.sha256[:12]}..")
        self._verified.add(shard)

    def _download(self, shard: int) -> str:
        path = self._cache_path(shard)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be fetching it right now
            if os.path.exists(path):
                os.utime(path)
                return path

            def fetch():
                tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
                h = hashlib.sha256() if self.verify else None
                try:
                    with self.fs.open(self.index.shard_uri(shard), "rb") as src, open(tmp, "wb") as dst:
                        while chunk := src.read(8 << 20):
                            dst.write(chunk)
                            if h is not None:
                                h.update(chunk)
                    self._check(shard, tmp, h.hexdigest() if h is not None else None)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)

            what = f"download {self.index.shards[shard].url}"
            retry(fetch, retries=self.retries, backoff_s=self.backoff_s, what=what)
            self.bytes_downloaded += self.index.shards[shard].filesize
        self._evict(keep=path)
        return path

    def _evict(self, keep: str) -> None:
        """Delete least recently used cached shards until the cache fits its byte limit."""
        files = []
        for name in os.listdir(self.cache_dir):
            p = os.path.join(self.cache_dir, name)
            if name.endswith(".tar") and p != keep:
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(f[1] for f in files) + os.path.getsize(keep)
        for _, size, p in sorted(files):
            if total <= self.cache_limit_bytes:
                break
            try:
                os.unlink(p)
                total -= size
            except FileNotFoundError:
                pass

    def _fetch(self, shard: int) -> str:
        if self.local:
            path = self._local_path(shard)
            self._check(shard, path, None)
            return path
        return self._download(shard)

    # -- public
    def prefetch(self, shard: int) -> None:
        """Start making ``shard`` readable in the background (no-op if open or pending)."""
        with self._lock:
            if shard not in self._open and shard not in self._pending:
                self._pending[shard] = self._pool.submit(self._fetch, shard)

    def open(self, shard: int) -> ShardFile:
        """The open shard, fetching it first if needed (blocks until readable)."""
        with self._lock:
            if shard in self._open:
                self._open.move_to_end(shard)
                return self._open[shard]
            future = self._pending.get(shard) or self._pool.submit(self._fetch, shard)
            self._pending[shard] = future
        path = future.result()
        with self._lock:
            self._pending.pop(shard, None)
            if shard not in self._open:
                self._open[shard] = ShardFile(path)  # the fd keeps it readable if evicted later
                if not self.local:
                    os.utime(path)
                while len(self._open) > self.max_open:
                    self._open.popitem(last=False)  # closed when its last reader drops it
            self._open.move_to_end(shard)
            return self._open[shard]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._open.clear()
            self._pending.clear()
