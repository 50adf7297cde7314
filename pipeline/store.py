"""Where a curation output lives: a local (or shared) directory, or an object store through fsspec.

Everything the job writes goes through one ``OutputStore``: the shard writers on the workers, the
journal and lock on the driver, the final tables and ``index.json``. Names are ``/``-separated
paths relative to the output root (``shards/shard-r0001-w003-000012.tar``, ``_journal/lock.json``).

What the job relies on, and how each backend gives it:

- a published object is complete (``put_bytes``, ``open_write``): a local file is written under a
  temporary name in the same directory and renamed; an object store makes a PUT or a completed
  multipart upload visible whole, and an aborted (or killed) upload never becomes an object;
- create-if-absent (``put_if_absent``, the lock): ``O_EXCL`` locally, a conditional PUT
  (``If-None-Match: *``) on S3 and S3-compatible stores;
- listing (``list``), reading and deleting. Nothing relies on rename, ``flock`` or mtimes on an
  object store: order comes from sequence numbers in the names the journal writes.

Credentials and endpoints come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...; read by botocore/s3fs and
gcsfs themselves) or from ``storage_options`` (the config's ``storage_options:`` section, passed to
``fsspec.url_to_fs``), never from the command line.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

import fsspec

# Local temp names: ".<name>.tmp<pid>" in the target's directory (shards.remove_stale_temp_files
# deletes those a killed run left).
_TMP_SUFFIX = ".tmp"


class StoreError(OSError):
    """An output-store operation failed; the message names the object and the store."""


def _check_name(name: str) -> str:
    if not name or "\\" in name or any(p in ("", ".", "..") for p in name.split("/")):
        raise ValueError(f"output object name {name!r} is not a relative path inside the output")
    return name


class StreamingUpload:
    """One object being written: ``write`` bytes, then ``commit`` (the object appears whole) or
    ``abort`` (nothing appears). Its size and sha256 are computed while streaming, so a shard is
    read once. A context manager: commits on success, aborts on an exception."""

    def __init__(self, name: str):
        self.name = name
        self.size = 0
        self._sha = hashlib.sha256()
        self._done = False

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def write(self, data: bytes) -> int:
        if self._done:
            raise ValueError(f"{self.name}: write after commit/abort")
        self._sha.update(data)
        self.size += len(data)
        self._write(data)
        return len(data)

    def commit(self) -> None:
        if not self._done:
            self._done = True
            self._commit()

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def file(self) -> io.RawIOBase:
        """This upload as the binary file object tarfile and pyarrow write to (they ask for
        ``tell``). Closing that file does not commit: its owner commits or aborts the upload."""
        return _UploadFile(self)

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError


class _UploadFile(io.RawIOBase):
    def __init__(self, upload: StreamingUpload):
        super().__init__()
        self._upload = upload

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._upload.write(bytes(data))

    def tell(self) -> int:
        return self._upload.size


class TableWriter:
    """One parquet object streamed into a store in row groups of ``batch_rows`` rows (pyarrow's
    ParquetWriter over a StreamingUpload): never held whole; ``close`` publishes it, ``abort`` (or an
    exception inside ``with``) leaves nothing. The final tables and the journal's segments."""

    def __init__(self, store: "OutputStore", name: str, schema, batch_rows: int = 2048):
        import pyarrow.parquet as pq

        self.name, self.schema, self.batch_rows = name, schema, batch_rows
        self.upload = store.open_write(name)
        try:
            self._writer = pq.ParquetWriter(self.upload.file(), schema)
        except BaseException:
            self.upload.abort()
            raise
        self._rows: list[dict] = []

    def add(self, rows: Iterable[dict]) -> None:
        self._rows.extend(rows)
        while len(self._rows) >= self.batch_rows:  # one row group per batch, however many rows came at once
            batch, self._rows = self._rows[:self.batch_rows], self._rows[self.batch_rows:]
            self._write(batch)

    def _write(self, rows: list[dict]) -> None:
        import schemas

        self._writer.write_table(schemas.conform_table(rows, self.schema))

    def finish(self) -> None:
        """Write the last rows and the footer; the object is published by ``commit``."""
        try:
            if self._rows:
                self._write(self._rows)
                self._rows = []
            self._writer.close()
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        self.upload.commit()

    def close(self) -> None:
        self.finish()
        self.commit()

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - after a failed write: the first error is the one to report
            pass
        self.upload.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class OutputStore:
    """A curation output: a root URL and the operations the job needs on the objects under it."""

    url: str
    is_local: bool = False

    def uri(self, name: str) -> str:
        """The full path or URL of ``name`` (what a reader outside the job opens)."""
        return f"{self.url.rstrip('/')}/{_check_name(name)}"

    def local_path(self, name: str = "") -> Path | None:
        """The filesystem path of ``name`` when the output is a local directory, else None."""
        return None

    # every method below takes names relative to the root
    def put_bytes(self, name: str, data: bytes) -> None:
        with self.open_write(name) as up:
            up.write(data)

    def open_write(self, name: str) -> StreamingUpload:
        raise NotImplementedError

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create ``name`` with ``data`` unless it exists; False if it existed (nothing written)."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def open_read(self, name: str):
        """A seekable binary file of ``name`` (a parquet reader fetches only the columns it reads)."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Names of the objects under the directory ``prefix`` (recursive), sorted."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Delete ``name``; a missing object is not an error."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class _LocalUpload(StreamingUpload):
    def __init__(self, final: Path, name: str):
        super().__init__(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._final = final
        self._tmp = final.with_name(f".{final.name}{_TMP_SUFFIX}{os.getpid()}")
        self._file = open(self._tmp, "wb")

    def _write(self, data: bytes) -> None:
        self._file.write(data)

    def _commit(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._final)
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        try:
            self._file.close()  # may fail again flushing its buffer (no space left): the temp file still goes
        finally:
            self._tmp.unlink(missing_ok=True)


class LocalStore(OutputStore):
    """A local or shared-filesystem directory (NFS, a Kubernetes RWX volume)."""

    is_local = True

    def __init__(self, root: str | Path):
        root = str(root)
        if root.startswith("file://"):
            root = root[len("file://"):]
        self.root = Path(root)
        self.url = str(self.root)

    def uri(self, name: str) -> str:
        return str(self.root / _check_name(name))

    def local_path(self, name: str = "") -> Path:
        return self._file(name) if name else self.root

    def _file(self, name: str) -> Path:
        return self.root / _check_name(name)

    def open_write(self, name: str) -> StreamingUpload:
        return _LocalUpload(self._file(name), name)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        # Written whole to a temp file, then hard-linked to the name (link fails if it exists): a
        # reader, or a run killed half-way, never sees a partial object under the name.
        path = self._file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                return self._create_exclusive(path, data)  # no hard links here (SMB, some FUSE mounts)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    @staticmethod
    def _create_exclusive(path: Path, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return True

    def read_bytes(self, name: str) -> bytes:
        return self._file(name).read_bytes()

    def open_read(self, name: str):
        return open(self._file(name), "rb")

    def exists(self, name: str) -> bool:
        return self._file(name).exists()

    def list(self, prefix: str = "") -> list[str]:
        base = self._file(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def delete(self, name: str) -> None:
        self._file(name).unlink(missing_ok=True)


class _FsspecUpload(StreamingUpload):
    def __init__(self, fs, path: str, name: str):
        super().__init__(name)
        self._fs = fs
        self._path = path
        # s3fs/gcsfs stream in parts (multipart upload) and make the object visible on close only.
        self._file = fs.open(path, "wb")

    def _write(self, data: bytes) -> None:
        self._file.write(data)

    def _commit(self) -> None:
        try:
            self._file.close()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        discard = getattr(self._file, "discard", None)
        try:
            if discard is not None:
                discard()  # s3fs: aborts the multipart upload, nothing becomes visible
            self._file.closed = True  # fsspec's close() would publish what was written
        finally:
            if discard is None:
                try:
                    self._fs.rm_file(self._path)
                except FileNotFoundError:
                    pass


class FsspecStore(OutputStore):
    """Any fsspec filesystem: ``s3://bucket/prefix`` (s3fs), ``gs://`` (gcsfs), ``memory://``."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self._root = self._root.rstrip("/")
        self._protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)

    def _path(self, name: str) -> str:
        return f"{self._root}/{_check_name(name)}"

    def open_write(self, name: str) -> StreamingUpload:
        return _FsspecUpload(self.fs, self._path(name), name)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        if self._protocols & {"s3", "s3a"}:
            try:
                self.fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
            except (FileExistsError, OSError) as e:
                if _precondition_failed(e):
                    return False
                raise
            return True
        try:
            with self.fs.open(path, "xb") as f:  # filesystems that implement exclusive create
                f.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError) as e:
            raise StoreError(f"{self.url}: this filesystem offers no create-if-absent, which the output "
                             f"lock needs ({e})") from e
        return True

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def open_read(self, name: str):
        return self.fs.open(self._path(name), "rb")

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self._path(name))
        return self.fs.exists(self._path(name))

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self._root
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        start = len(self._root) + 1
        return sorted(p[start:] for p in found if p.startswith(self._root + "/"))

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._path(name))


def _precondition_failed(error: BaseException) -> bool:
    """A conditional PUT refused because the object exists (HTTP 412, or 409 on some stores)."""
    if isinstance(error, FileExistsError):
        return True
    text = f"{error!r} {getattr(error, '__cause__', '')!r}"
    return any(s in text for s in ("PreconditionFailed", "412", "ConditionalRequestConflict"))


def open_store(url: str | Path, storage_options: dict | None = None) -> OutputStore:
    """The store for an output URL: a path or ``file://`` URL is a directory, anything with a
    scheme (``s3://``, ``gs://``, ``memory://``) goes through fsspec."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        return LocalStore(url)
    return FsspecStore(url, storage_options)
