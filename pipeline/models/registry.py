"""Every full-profile model in one place: where its files live in the model directory, where
they come from, and the checksums they must have.

Workers never download: they only read ``model_dir`` and fail with a message that names the
missing file (``require_file``). Files get there once, by name, through
``jobs/fetch_models.py --profile full --dir MODELS`` (``fetch_models`` below), which downloads
to a temporary name, checks the sha256 and renames atomically.

Checksums. A pinned ``sha256`` is verified on every fetch. Where no trustworthy published hash
was found (``sha256=None``) the fetcher is trust-on-first-use: it records the hash it saw in
``MODELS/models.lock.json`` and later runs verify the file against that record. The sources of
the pinned hashes are cited next to them; ``docs/features.md`` lists which entries are TOFU.

Verification before use. Every loader passes a weights file through ``verified_file`` before it
opens it (ONNX, safetensors, torch files, the trainer's checkpoints): the file's sha256 must equal
the registry's pinned hash when the file is a pinned one, else the entry of the nearest
``models.lock.json`` in its directory or above (written by ``fetch_models``, by
``register_local_files`` for one's own weights, and by the trainer beside each checkpoint). A lock
entry never overrides a pinned hash. A file with no record, or another hash, is refused before
anything parses it (``UntrustedModelFile``). Hashes are computed once per file per process.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.shards import sha256_file

LOCK_FILE = "models.lock.json"
FETCH_HINT = "run `python jobs/fetch_models.py --profile full --dir MODELS` and pass MODELS as model_dir"
REGISTER_HINT = "python jobs/fetch_models.py --dir {root} --register {rel}"


@dataclass(frozen=True)
class ModelFile:
    path: str  # relative to the model directory (also the path under --base-url mirrors)
    url: str
    sha256: str | None = None  # None = trust on first use (recorded in models.lock.json)
    size: int | None = None  # bytes, when known; checked before hashing


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_id: str  # what shards record in meta.json["models"]
    files: tuple[ModelFile, ...]
    license: str = ""
    notes: str = ""


_HF = "https://huggingface.co"

FULL_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            name="sd-vae",
            model_id="stable-diffusion-v1-5/stable-diffusion-v1-5:vae",
            files=(
                ModelFile("sd-vae/config.json",
                          f"{_HF}/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/vae/config.json"),
                # sha256/size: the git-lfs pointer of vae/diffusion_pytorch_model.safetensors in the
                # runwayml/stable-diffusion-v1-5 repo (mirrored on GitHub as
                # HDRJ-One/runwayml-stable-diffusion-v1-5); stable-diffusion-v1-5/* is a re-upload
                # of the same files. A different file fails the fetch loudly (never silently).
                ModelFile("sd-vae/diffusion_pytorch_model.safetensors",
                          f"{_HF}/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/vae/"
                          "diffusion_pytorch_model.safetensors",
                          sha256="b4d2b5932bb4151e54e694fd31ccf51fca908223c9485bd56cd0e1d83ad94c49",
                          size=334_643_268),
            ),
            license="CreativeML OpenRAIL-M",
        ),
        ModelSpec(
            name="wav2vec2",
            model_id="facebook/wav2vec2-base-960h",
            files=(
                ModelFile("wav2vec2-base-960h/config.json",
                          f"{_HF}/facebook/wav2vec2-base-960h/resolve/main/config.json"),
                ModelFile("wav2vec2-base-960h/preprocessor_config.json",
                          f"{_HF}/facebook/wav2vec2-base-960h/resolve/main/preprocessor_config.json"),
                ModelFile("wav2vec2-base-960h/model.safetensors",
                          f"{_HF}/facebook/wav2vec2-base-960h/resolve/main/model.safetensors"),
            ),
            license="Apache-2.0",
        ),
        ModelSpec(
            name="dwpose",
            model_id="yzd-v/DWPose:dw-ll_ucoco_384.onnx",
            files=(ModelFile("dw-ll_ucoco_384.onnx", f"{_HF}/yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx"),),
            license="Apache-2.0",
            notes="RTMPose-l whole-body (133 kps) distilled by DWPose; input 1x3x384x288, SimCC outputs",
        ),
        ModelSpec(
            name="scrfd",
            model_id="insightface/buffalo_l:det_10g.onnx",
            # sha256/size as published by several independent download manifests of the same file
            # (insightface buffalo_l.zip member det_10g.onnx = scrfd_10g_bnkps.onnx).
            files=(ModelFile("det_10g.onnx",
                             f"{_HF}/public-data/insightface/resolve/main/models/buffalo_l/det_10g.onnx",
                             sha256="5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91",
                             size=16_923_827),),
            license="insightface pretrained models: non-commercial research use",
        ),
        ModelSpec(
            name="landmarks3d",
            model_id="insightface/buffalo_l:1k3d68.onnx",
            # sha256/size as published by several independent download manifests of the same file
            # (buffalo_l.zip member 1k3d68.onnx; antelopev2 ships the identical file).
            files=(ModelFile("1k3d68.onnx",
                             f"{_HF}/public-data/insightface/resolve/main/models/buffalo_l/1k3d68.onnx",
                             sha256="df5c06b8a0c12e422b2ed8947b8869faa4105387f199c477af038aa01f9a45cc",
                             size=143_607_619),),
            license="insightface pretrained models: non-commercial research use",
            notes="68 3-D landmarks (x, y, z) + head pose; input 1x3x192x192, output [1, 3309]",
        ),
        ModelSpec(
            name="arcface",
            model_id="insightface/buffalo_l:w600k_r50.onnx",
            # sha256/size as published by several independent download manifests of the same file
            # (buffalo_l.zip member w600k_r50.onnx, ArcFace ResNet-50 trained on WebFace600K).
            files=(ModelFile("w600k_r50.onnx",
                             f"{_HF}/public-data/insightface/resolve/main/models/buffalo_l/w600k_r50.onnx",
                             sha256="4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43",
                             size=174_383_860),),
            license="insightface pretrained models: non-commercial research use",
            notes="ArcFace identity embedding; input Nx3x112x112 aligned with the arcface_dst 5-point template, "
                  "output [N, 512] (docs/identity.md)",
        ),
        ModelSpec(
            name="syncnet",
            model_id="joonson/syncnet_python:syncnet_v2.model",
            # URL from joonson/syncnet_python download_model.sh.
            files=(ModelFile("syncnet_v2.model",
                             "https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"),),
            license="MIT (code); weights from the VGG lipsync page",
            notes="a pickled torch module: load with torch.load(weights_only=True) into our SyncNet",
        ),
    ]
}

PROFILE_MODELS: dict[str, tuple[str, ...]] = {
    "full": tuple(FULL_MODELS),
    "smoke": (),  # smoke models are built in memory; nothing to fetch
}


# ---- reading (workers) -------------------------------------------------------------------

def require_file(model_dir: str | Path | None, relpath: str, model: str = "") -> Path:
    """``model_dir/relpath`` or a FileNotFoundError naming exactly what is missing."""
    what = f" (model {model!r})" if model else ""
    if model_dir is None:
        raise FileNotFoundError(f"no model_dir given; it must hold {relpath}{what}; {FETCH_HINT}")
    path = Path(model_dir).expanduser() / relpath
    if not path.is_file():
        raise FileNotFoundError(f"missing model file {path}{what}; {FETCH_HINT}")
    return path


def require_model(model_dir: str | Path | None, name: str) -> Path:
    """Check every file of a registered model is present; returns the model's directory
    (the parent of its files, e.g. ``MODELS/sd-vae``) or the single file's path."""
    spec = FULL_MODELS[name]
    paths = [require_file(model_dir, f.path, name) for f in spec.files]
    return paths[0] if len(paths) == 1 else paths[0].parent


# ---- verification before use (every loader) ----------------------------------------------

class UntrustedModelFile(ValueError):
    """A weights file whose sha256 is not the one on record, or that has no record at all."""


_hash_cache: dict[tuple, str] = {}
_hash_cache_lock = threading.Lock()


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per process for a given (path, size, mtime, inode): actors
    that load the same 300 MB file again do not hash it again; a replaced or rewritten file is."""
    path = Path(path).absolute()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    with _hash_cache_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    digest = sha256_of(path)
    with _hash_cache_lock:
        _hash_cache[key] = digest
    return digest


def pinned_file(path: str | Path) -> ModelFile | None:
    """The registry entry with a pinned sha256 whose path the absolute ``path`` ends with
    (``.../det_10g.onnx``, ``.../buffalo_l/det_10g.onnx``, ``.../sd-vae/diffusion_pytorch_model.safetensors``),
    or None. A file under a pinned name is that file wherever it lies and wherever a lock file is:
    no lock entry can make another one acceptable."""
    full = Path(path).expanduser().absolute().as_posix()
    for spec in FULL_MODELS.values():
        for f in spec.files:
            if f.sha256 and full.endswith("/" + f.path):
                return f
    return None


def lock_root(path: Path) -> Path | None:
    """The nearest directory at or above ``path``'s directory that holds a ``models.lock.json``."""
    for d in Path(path).absolute().parents:
        if (d / LOCK_FILE).is_file():
            return d
    return None


def expected_sha256(path: str | Path) -> tuple[str | None, str]:
    """(sha256 the file must have or None, where that comes from) for a weights file."""
    path = Path(path).expanduser().absolute()
    root = lock_root(path)
    pinned = pinned_file(path)
    if pinned is not None:
        return pinned.sha256, f"pinned in pipeline/models/registry.py for {pinned.path}"
    if root is None:
        return None, f"no {LOCK_FILE} in {path.parent} or any directory above it"
    rel = path.relative_to(root).as_posix()
    rec = _read_lock(root).get(rel)
    if not rec or not rec.get("sha256"):
        return None, f"no entry {rel!r} in {root / LOCK_FILE}"
    return rec["sha256"], f"{root / LOCK_FILE} entry {rel!r}"


def verified_file(path: str | Path, what: str = "model file") -> Path:
    """``path`` after checking its sha256 against the record (``expected_sha256``); refuses a file
    with no record or another hash with an ``UntrustedModelFile`` that names the file, both hashes
    and the fix. Called by every loader before it opens a weights file."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    want, source = expected_sha256(path)
    root = lock_root(path) or path.parent
    register = REGISTER_HINT.format(root=root, rel=path.relative_to(root).as_posix())
    if want is None:
        raise UntrustedModelFile(
            f"{path}: refused to load this {what}: no sha256 on record for it ({source}). Fix: {FETCH_HINT}; "
            f"or, if it is your own file, record its sha256 with `{register}`")
    got = cached_sha256(path)
    if got != want:
        fix = (f"fetch it again ({FETCH_HINT}); a pinned name cannot be registered, so "
               "give your own weights another file name, point the config at it and register that"
               if source.startswith("pinned") else
               f"fetch it again, or, if you replaced it on purpose, record the new sha256 with `{register}`")
        raise UntrustedModelFile(f"{path}: refused to load this {what}: sha256 {got} is not the expected {want} "
                                 f"({source}); the file was changed or replaced. Fix: {fix}")
    return path


def _is_lock_file(path: Path) -> bool:
    return path.name == LOCK_FILE or path.name.startswith(f".{LOCK_FILE}.tmp")


def verified_tree(directory: str | Path, what: str = "model directory") -> Path:
    """``directory`` after ``verified_file`` on every regular file below it (lock files aside):
    for loaders that open a whole directory (``from_pretrained``)."""
    directory = Path(directory).expanduser().absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} not found: {directory}")
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and not _is_lock_file(p)):
        verified_file(f, f"file of the {what}")
    return directory


def verified_model_path(model_dir: str | Path | None, name: str) -> Path:
    """``require_model`` with every file of the registered model verified (``verified_file``)."""
    found = require_model(model_dir, name)  # every file present first: a missing one is named as missing
    for f in FULL_MODELS[name].files:
        verified_file(require_file(model_dir, f.path, name), f"{name} model file")
    return found


def register_local_files(root: str | Path, relpath: str, log=print) -> dict[str, str]:
    """Record the sha256 of ``root/relpath`` (a file, or every file below a directory) in
    ``root/models.lock.json`` so loaders accept it: for one's own weights, placed deliberately.
    Pinned registry files cannot be registered (a lock entry never overrides a pinned hash).
    Returns {relative path: sha256}."""
    root = Path(root).expanduser().absolute()
    target = (root / relpath).absolute()
    if not target.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{relpath}: not inside {root}")
    if not target.exists():
        raise FileNotFoundError(f"nothing to register: {target} does not exist")
    files = [target] if target.is_file() else sorted(
        p for p in target.rglob("*") if p.is_file() and not _is_lock_file(p))
    lock = _read_lock(root)
    recorded = {}
    for f in files:
        rel = f.relative_to(root).as_posix()
        pinned = pinned_file(f)
        if pinned is not None:
            raise UntrustedModelFile(f"{f}: cannot register {rel}: it is the registry's {pinned.path}, pinned to "
                                     f"sha256 {pinned.sha256}; give your own weights another file name and "
                                     "point the config at it")
        digest = cached_sha256(f)
        lock[rel] = {"sha256": digest, "size": f.stat().st_size, "source": "registered local file",
                     "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        recorded[rel] = digest
        log(f"{rel}: registered sha256 {digest}")
    _write_lock(root, lock)
    return recorded


# ---- fetching (jobs/fetch_models.py) -----------------------------------------------------

class FetchError(RuntimeError):
    pass


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    return sha256_file(path, chunk)


def _read_lock(root: Path) -> dict:
    p = root / LOCK_FILE
    if not p.is_file():
        return {}
    try:
        lock = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UntrustedModelFile(f"{p}: not a readable lock file ({e}); fetch or register the models again") from None
    if not isinstance(lock, dict):
        raise UntrustedModelFile(f"{p}: not a lock file (expected a JSON object of path -> record)")
    return lock


def _write_lock(root: Path, lock: dict) -> None:
    tmp = root / f".{LOCK_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(lock, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / LOCK_FILE)


def _expected(f: ModelFile, lock: dict) -> tuple[str | None, str]:
    if f.sha256:
        return f.sha256, "registry"
    rec = lock.get(f.path)
    return (rec["sha256"], "models.lock.json (first download)") if rec else (None, "")


def _download(url: str, dest: Path, timeout: float) -> str:
    """Stream ``url`` into a temp file beside ``dest``; returns its sha256. The caller renames."""
    h = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": "talking-head-curation/fetch_models"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
            while block := resp.read(1 << 20):
                h.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    except urllib.error.HTTPError as e:
        raise FetchError(f"download failed: {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"download failed: {url}: {getattr(e, 'reason', e)}") from None
    return h.hexdigest()


def fetch_file(f: ModelFile, root: Path, *, base_url: str | None = None, lock: dict | None = None,
               timeout: float = 60.0, log=print) -> str:
    """Make ``root/f.path`` present and verified. Returns "present" or "downloaded"."""
    lock = {} if lock is None else lock
    dest = root / f.path
    want, source = _expected(f, lock)
    if dest.is_file():
        if f.size is not None and dest.stat().st_size != f.size:
            log(f"{f.path}: size {dest.stat().st_size} != {f.size}; downloading again")
        else:
            got = sha256_of(dest)
            if want is None or got == want:
                # A file placed by hand with no pinned hash is recorded here (trust on first use).
                lock.setdefault(f.path, {"url": f.url}).update(sha256=got, size=dest.stat().st_size)
                return "present"
            log(f"{f.path}: sha256 {got} != expected {want} ({source}); downloading again")
    url = f"{base_url.rstrip('/')}/{f.path}" if base_url else f.url
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part{os.getpid()}")
    try:
        got = _download(url, tmp, timeout)
        size = tmp.stat().st_size
        if f.size is not None and size != f.size:
            raise FetchError(f"{f.path}: downloaded {size} bytes from {url}, expected {f.size}")
        if want is not None and got != want:
            raise FetchError(f"{f.path}: sha256 mismatch for {url}: got {got}, expected {want} ({source}); "
                             "the file was not installed")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    if want is None:
        log(f"{f.path}: no pinned sha256; recorded {got} in {LOCK_FILE} (trust on first use)")
    lock[f.path] = {"sha256": got, "size": size, "url": url,
                    "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return "downloaded"


def fetch_models(root: str | Path, names=None, *, registry: dict[str, ModelSpec] | None = None,
                 base_url: str | None = None, timeout: float = 60.0, log=print) -> dict[str, str]:
    """Fetch every file of ``names`` (default: all of ``registry``) into ``root``.

    Returns {relative path: "present" | "downloaded"}. Raises FetchError listing every file that
    failed, after trying all of them (one bad mirror entry does not hide the others).
    """
    registry = FULL_MODELS if registry is None else registry
    names = list(registry) if names is None else list(names)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    lock = _read_lock(root)
    results, errors = {}, []
    for name in names:
        if name not in registry:
            raise KeyError(f"unknown model {name!r}; known: {sorted(registry)}")
        for f in registry[name].files:
            try:
                results[f.path] = fetch_file(f, root, base_url=base_url, lock=lock, timeout=timeout, log=log)
                log(f"{f.path}: {results[f.path]}")
            except FetchError as e:
                errors.append(str(e))
                log(f"ERROR {e}")
    _write_lock(root, lock)
    if errors:
        raise FetchError(f"{len(errors)} file(s) failed:\n  " + "\n  ".join(errors))
    return results
