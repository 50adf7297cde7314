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

Faults (issue 12, docs/loader.md "Faults"): a shard that is corrupt, missing or unavailable after
its retries (transient errors get ``retries``, not-found and corrupt bytes ``permanent_retries``)
raises a ``ShardUnreadable`` that the dataset turns into a skip; it is remembered per process.
Hostile shards raise a plain ValueError and are never retried or skipped.
"""
from __future__ import annotations

import contextlib
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


class ShardUnreadable(Exception):
    """A shard the loader skips rather than fails on (issue 12; docs/loader.md "Faults"): its clips
    are replaced in the epoch and the skip is counted under ``reason``. Hostile shards are not
    this: they stay a plain ValueError that stops training."""
    reason = "corrupt"


class CorruptShardError(ShardUnreadable, OSError, ValueError):
    """Bytes that are not what index.json describes: size or sha256 mismatch, not a tar, a
    damaged .npy member, a sample without its members. (An OSError for the bytes read and a
    ValueError for what they hold, as io.UnsupportedOperation is both.)"""
    reason = "corrupt"


class MissingShardError(ShardUnreadable, FileNotFoundError):
    """Not in storage (a removed file, HTTP 404, no such S3 object, access denied)."""
    reason = "missing"


class UnavailableShardError(ShardUnreadable, OSError):
    """Storage kept failing (connection errors, 5xx, timeouts) through every retry."""
    reason = "unavailable"


SKIP_REASONS = ("missing", "corrupt", "unavailable")


class NoReadableShardError(OSError):
    """Too many shards in a row, or all of them, could not be read: training cannot go on."""

# where object-store clients keep their exception classes (not all of them derive from OSError)
_TRANSPORT_PACKAGES = {"aiohttp", "botocore", "urllib3", "requests", "google", "azure", "fsspec", "s3fs",
                       "gcsfs", "adlfs"}


def _chained_http_status(exc: BaseException) -> int | None:
    """The HTTP status behind ``exc``, if a client error in its chain carries one (aiohttp's
    ``status``; fsspec's http filesystem reports a 503 on open as FileNotFoundError from it)."""
    seen = exc.__cause__ or exc.__context__
    for _ in range(8):
        if seen is None:
            return None
        status = getattr(seen, "status", None)
        if isinstance(status, int):
            return status
        seen = seen.__cause__ or seen.__context__
    return None


def is_not_found(exc: BaseException) -> bool:
    """Not in storage, or not ours to read: FileNotFoundError / PermissionError, unless the
    client turned a server error (5xx, 429) into one."""
    if not isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    status = _chained_http_status(exc)
    return status is None or status in (401, 403, 404, 410)


def is_permanent(exc: BaseException) -> bool:
    """Errors a retry will not fix (a few retries still cover eventually consistent stores)."""
    return is_not_found(exc) or isinstance(exc, CorruptShardError)


def is_transport_error(exc: BaseException) -> bool:
    """I/O and storage-client errors, as opposed to bugs (a TypeError must not become a skip)."""
    return isinstance(exc, (OSError, EOFError)) or any(
        c.__module__.split(".")[0] in _TRANSPORT_PACKAGES for c in type(exc).__mro__)


def retry(fn, *, retries: int, backoff_s: float, what: str, permanent_retries: int | None = None,
          fatal=lambda exc: False):
    """Call ``fn`` up to ``retries + 1`` times, sleeping backoff * 2**i (+ jitter) between.

    An error ``is_permanent`` (not found, access denied, corrupt bytes) gets at most
    ``permanent_retries`` retries: enough for an eventually consistent store, no more. An error
    ``fatal(exc)`` is raised at once, unchanged."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - object stores raise many kinds
            if fatal(exc):
                raise
            limit = retries if permanent_retries is None or not is_permanent(exc) else min(retries, permanent_retries)
            if attempt >= limit:
                err = RuntimeError(f"{what}: failed after {attempt + 1} attempts: {exc}")
                err.attempts = attempt + 1
                raise err from exc
            delay = backoff_s * 2 ** attempt * (1 + 0.25 * random.random())
            attempt += 1
            log.warning("%s: %s; retry %d/%d in %.2fs", what, exc, attempt, limit, delay)
            time.sleep(delay)


def read_npy_header(fd: int, offset: int, size: int, name: str) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of the ``.npy`` member at ``offset``, checked against its
    ``size``; a damaged header, an object or Fortran-order array, or a size that does not match
    the header is a CorruptShardError naming the member (the pickle rule: object arrays are never
    read, whatever their contents)."""
    head = os.pread(fd, min(size, 4096), offset)
    buf = io.BytesIO(head)
    try:
        major, _ = np.lib.format.read_magic(buf)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(buf)
    except ValueError as e:  # bad magic, unparsable header dict, header cut short
        raise CorruptShardError(f"{name}: not a readable .npy header ({e})") from None
    if fortran or dtype.hasobject:
        raise CorruptShardError(f"{name}: only C-order, non-object .npy members are readable")
    if len(shape) < 1:
        raise CorruptShardError(f"{name}: a 0-d .npy member has no rows")
    need = buf.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if need != size:
        problem = "truncated .npy member" if need > size else "member longer than its .npy header says"
        raise CorruptShardError(f"{name}: {problem} ({size} bytes, header {list(shape)} {dtype} needs {need})")
    return tuple(shape), dtype, offset + buf.tell()


class NpyMember:
    """A ``.npy`` member inside an open shard: header parsed, rows read on demand."""

    def __init__(self, owner: "ShardFile", header: tuple[tuple, np.dtype, int], name: str):
        self.owner = owner  # keeps the shard's descriptor open while this member is in use
        self.shape, self.dtype, self.data_offset = header
        self.fd, self.name = owner.fd, name
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.bytes_read = 0

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
    """An open shard: key -> {member: (data offset, size)} from its tar headers.

    With ``entry`` (its index.json row) the shard is checked whole on opening, so that whether it
    is readable never depends on which of its clips is read first: every sample index.json lists
    is there with the ``.npy`` ``members`` training reads, each header parses and matches its
    size, and a sample's latent/audio/kps agree on the frame count. A failure is a
    CorruptShardError (the loader skips the shard); a hostile member a ValueError (it refuses)."""

    def __init__(self, path: str, entry=None, members: tuple[str, ...] = ()):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.members: dict[str, dict[str, tuple[int, int]]] = {}
        self._headers: dict[tuple[str, str], tuple] = {}
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
            raise CorruptShardError(f"{path}: not a readable tar shard ({type(e).__name__}: {e})") from e
        self.keys = list(self.members)
        if entry is not None:
            self._check_samples(entry, members)

    def _check_samples(self, entry, members: tuple[str, ...]) -> None:
        keys = entry.keys if entry.keys is not None else self.keys
        if len(keys) != entry.nsamples or len(self.keys) < entry.nsamples:
            raise CorruptShardError(f"{self.path}: holds {len(self.keys)} samples, index.json says {entry.nsamples}")
        for key in keys:
            for member in members:
                if member not in self.members.get(key, {}):
                    raise CorruptShardError(f"{self.path}: sample {key!r} has no member {member!r}")
                if member.endswith(".npy"):
                    self._header(key, member)
            frames = {m: self._headers[key, m][0][0] for m in ("latent.npy", "audio.npy", "kps.npy")
                      if (key, m) in self._headers}
            if len(set(frames.values())) > 1:
                raise CorruptShardError(f"{self.path}: sample {key!r}: frame counts differ between members {frames}")

    def _header(self, key: str, member: str) -> tuple:
        if (key, member) not in self._headers:
            offset, size = self.members[key][member]
            name = f"{os.path.basename(self.path)}:{key}.{member}"
            self._headers[key, member] = read_npy_header(self.fd, offset, size, name)
        return self._headers[key, member]

    def npy(self, key: str, member: str) -> NpyMember:
        if member not in self.members.get(key, {}):
            raise KeyError(f"{self.path}: sample {key!r} has no member {member!r}")
        return NpyMember(self, self._header(key, member), f"{os.path.basename(self.path)}:{key}.{member}")

    def __del__(self):  # closed by refcount, never under a thread still reading it
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)


class ShardStore:
    """Per-process access to the shards of one dataset (create it inside each worker)."""

    def __init__(self, index: DatasetIndex, *, cache_dir: str | None = None,
                 cache_limit_bytes: int = 64 << 30, verify: bool = False, retries: int = 4,
                 backoff_s: float = 0.5, download_threads: int = 2, max_open: int = 16,
                 permanent_retries: int = 2, max_failed_in_a_row: int = 8, members: tuple[str, ...] = ()):
        self.index, self.verify = index, verify
        self.retries, self.backoff_s, self.permanent_retries = retries, backoff_s, permanent_retries
        self.members = tuple(members)  # checked in every sample when a shard opens (ShardFile)
        # shards that could not be read (skipped by the loader) and the error; a storage that fails
        # this many fetches in a row, with no success between, is gone: NoReadableShardError
        self.failures: dict[int, ShardUnreadable] = {}
        self.failed_in_a_row = 0
        self.max_failed_in_a_row = max(1, min(max_failed_in_a_row, len(index.shards)))
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
            what = "truncated" if size < entry.filesize else "longer than index.json says"
            raise CorruptShardError(f"{self.index.shard_uri(shard)}: {what}: {size} bytes, index.json says "
                                    f"{entry.filesize}")
        if self.verify and digest is None and shard not in self._verified:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            digest = h.hexdigest()
        if digest is not None and digest != entry.sha256:
            raise CorruptShardError(f"{self.index.shard_uri(shard)}: sha256 mismatch: {digest[:12]}.. != "
                                    f"index.json {entry.sha256[:12]}..")
        self._verified.add(shard)

    def _download(self, shard: int) -> str:
        """One attempt: the cached copy, or a fresh download checked and renamed into the cache."""
        path = self._cache_path(shard)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be fetching it right now
            if os.path.exists(path):
                os.utime(path)
                return path
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

    def _attempt(self, shard: int) -> ShardFile:
        """One try at an open, checked shard (ShardFile checks every sample's members)."""
        if self.local:
            path = self._local_path(shard)
            self._check(shard, path, None)
        else:
            path = self._download(shard)
        try:
            f = ShardFile(path, self.index.shards[shard], self.members)  # the fd keeps it readable if evicted
        except CorruptShardError:
            if not self.local:  # so the retry downloads it again (a fault in transit), not re-reads the cache
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        if not self.local:
            os.utime(path)
        return f

    def _fetch(self, shard: int) -> ShardFile:
        """The shard, opened and checked, with retries; a ShardUnreadable when it cannot be."""
        uri = self.index.shard_uri(shard)
        try:
            f = retry(lambda: self._attempt(shard), retries=self.retries, backoff_s=self.backoff_s,
                      what=f"{'open' if self.local else 'download'} {self.index.shards[shard].url}",
                      permanent_retries=self.permanent_retries,
                      fatal=lambda e: isinstance(e, ValueError) and not isinstance(e, ShardUnreadable))  # hostile
        except RuntimeError as e:
            cause = e.__cause__
            attempts = f"failed after {getattr(e, 'attempts', '?')} attempts"
            if isinstance(cause, ShardUnreadable):
                err = self._failed(shard, cause)
                raise err from (None if err is cause else cause)
            if is_not_found(cause):
                raise self._failed(shard, MissingShardError(
                    f"{uri}: not in storage ({type(cause).__name__}: {cause}); {attempts}")) from cause
            if is_transport_error(cause):
                status = _chained_http_status(cause)
                why = f"HTTP {status}, " if status else ""
                raise self._failed(shard, UnavailableShardError(
                    f"{uri}: storage kept failing ({why}{type(cause).__name__}: {cause}); {attempts}")) from cause
            raise  # not an I/O problem: a bug must not turn into a skipped shard
        with self._lock:
            self.failed_in_a_row = 0
        return f

    def _failed(self, shard: int, err: ShardUnreadable) -> Exception:
        """Remember ``err`` for ``shard``; the error to raise (NoReadableShardError past the limit)."""
        with self._lock:
            new = shard not in self.failures
            self.failures.setdefault(shard, err)
            if new:
                self.failed_in_a_row += 1
            in_a_row = self.failed_in_a_row
        if new:
            log.info("shard %s unreadable (%s): %s", self.index.shards[shard].url, err.reason, err)
        if in_a_row >= self.max_failed_in_a_row:
            return NoReadableShardError(self.failure_report(
                f"{self.index.uri}: the last {in_a_row} shards fetched could not be read, none in between "
                "could: the storage or the dataset is gone"))
        return err

    def failure_report(self, head: str) -> str:
        with self._lock:
            items = list(self.failures.items())
        lines = [f"  {self.index.shards[s].url} ({e.reason}): {e}" for s, e in items[:10]]
        more = [f"  ... and {len(items) - 10} more"] if len(items) > 10 else []
        return "\n".join([head] + lines + more)

    # -- public
    def forget_failures(self) -> None:
        """Try unreadable shards again (at the start of each pass: a restored shard comes back)."""
        with self._lock:
            self.failures.clear()
            self.failed_in_a_row = 0

    def prefetch(self, shard: int) -> None:
        """Start making ``shard`` readable in the background (no-op if open, pending or failed)."""
        with self._lock:
            if shard not in self._open and shard not in self._pending and shard not in self.failures:
                self._pending[shard] = self._pool.submit(self._fetch, shard)

    def open(self, shard: int) -> ShardFile:
        """The open shard, fetching it first if needed (blocks until readable). A shard that cannot
        be read raises a ShardUnreadable (again, at once, on every later call in this process)."""
        with self._lock:
            if shard in self.failures:
                err = self.failures[shard]
                raise type(err)(str(err))
            if shard in self._open:
                self._open.move_to_end(shard)
                return self._open[shard]
            future = self._pending.get(shard) or self._pool.submit(self._fetch, shard)
            self._pending[shard] = future
        try:
            f = future.result()
        finally:
            with self._lock:
                if self._pending.get(shard) is future:
                    del self._pending[shard]
        with self._lock:
            if shard not in self._open:
                self._open[shard] = f
                while len(self._open) > self.max_open:
                    self._open.popitem(last=False)  # closed when its last reader drops it
            self._open.move_to_end(shard)
            return self._open[shard]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._open.clear()
            self._pending.clear()
