"""Checkpoints that survive a SIGKILL at any instant and resume the run exactly.

RUN_DIR/checkpoints/step-00001000/
    model/          LoopyModel.save_pretrained (config.json + safetensors): loadable on its own
    ema/            the EMA weights the same way (when EMA is on)
    trainer.pt      optimiser, LR scheduler, EMA counters, loader position, RNG states, step,
                    counters; tensors and plain containers only, read with weights_only=True
    models.lock.json  the sha256 of every file above, recorded when written; loading verifies
                    each file against it first (pipeline.models.registry.verified_file), so a
                    changed or swapped file is refused with both hashes named
RUN_DIR/checkpoints/latest      the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when complete; ``latest`` is replaced
atomically after that. A crash leaves at most a ``.tmp-*`` directory, which the next save removes.
Only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.models.registry import register_local_files, verified_file, verified_tree
from pipeline.shards import atomic_write_bytes

LATEST = "latest"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    if not (path / "trainer.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def resolve_model_dir(path: str | Path) -> Path | None:
    """A Loopy model directory from a RUN_DIR, a checkpoint directory or a model directory; None
    when ``path`` is none of these (e.g. SD 1.5 weights)."""
    path = Path(path)
    if (path / "checkpoints" / LATEST).exists():
        path = latest_checkpoint(path)
    if (path / "model" / "config.json").exists():
        path = path / "model"
    if (path / "config.json").exists() and '"LoopyModel"' in (path / "config.json").read_text():
        return path
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), int(state["numpy"]["pos"]),
                         int(state["numpy"]["has_gauss"]), float(state["numpy"]["cached_gaussian"])))
    random.setstate(_literal_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached_gaussian": cached}


def _literal_state(text: str):
    import ast

    return ast.literal_eval(text)


def save_checkpoint(run_dir: str | Path, step: int, model, trainer_state: dict, ema_model=None,
                    keep: int = 3) -> Path:
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}"
    model.save_pretrained(tmp / "model", safe_serialization=True)
    if ema_model is not None:
        ema_model.save_pretrained(tmp / "ema", safe_serialization=True)
    torch.save(trainer_state, tmp / "trainer.pt")
    register_local_files(tmp, ".", log=lambda *_: None)  # the manifest loading verifies against
    _fsync_tree(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_bytes(root / LATEST, name.encode())
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict:
    state = verified_file(Path(path) / "trainer.pt", "trainer state")  # the sha256 recorded when it was written
    return torch.load(state, map_location="cpu", weights_only=True)


def verified_model_dir(path: str | Path) -> Path:
    """A Loopy model directory (``model/``, ``ema/`` or one made by ``save_pretrained`` and
    registered) after checking every file against its recorded sha256; call before
    ``LoopyModel.from_pretrained``."""
    return verified_tree(path, "Loopy model directory")


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
