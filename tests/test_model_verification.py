"""Hostile weights files (issue 12): every loader checks a file's sha256 against the registry's pinned hash,
else the ``models.lock.json`` entry that ``fetch_models`` / ``--register`` / the trainer wrote, before it
parses a byte of it; a lock entry never overrides a pinned hash; the trainer's checkpoints carry a manifest.

Files are built here (the smoke ArcFace ONNX with w600k_r50's signature, a tiny SyncNet state dict, a tiny
Loopy checkpoint) and tampered with by flipping one byte.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from model_files import register
from pipeline.faces.arcface import ArcFace, smoke_model_bytes
from pipeline.models import registry
from pipeline.models.registry import FULL_MODELS, LOCK_FILE, UntrustedModelFile, sha256_of, verified_file

ROOT = Path(__file__).resolve().parents[1]


def fetch_job():
    spec = importlib.util.spec_from_file_location("fetch_models_job", ROOT / "jobs" / "fetch_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def flip_one_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_registered_onnx_loads_and_one_flipped_byte_is_refused_naming_both_hashes(tmp_path):
    path = tmp_path / "my_arcface.onnx"
    path.write_bytes(smoke_model_bytes())
    assert fetch_job().main(["--dir", str(tmp_path), "--register", "my_arcface.onnx"]) == 0
    lock = json.loads((tmp_path / LOCK_FILE).read_text())
    assert lock["my_arcface.onnx"]["sha256"] == sha256_of(path)
    assert ArcFace(path).embed(np.zeros((1, 112, 112, 3), np.uint8)).shape == (1, 512)

    good = sha256_of(path)
    flip_one_byte(path)
    with pytest.raises(UntrustedModelFile) as e:
        ArcFace(path)
    msg = str(e.value)
    assert str(path) in msg and good in msg and sha256_of(path) in msg and "--register my_arcface.onnx" in msg


def test_refused_before_any_parser_sees_the_file(tmp_path):
    """A registered name holding bytes that are not ONNX at all: the refusal is the sha256 one, not onnx's
    parse error; the same file registered as it is reaches the parser, which then rejects it."""
    path = tmp_path / "detector.onnx"
    path.write_bytes(smoke_model_bytes())
    register(path)
    path.write_bytes(b"<html>not a model</html>")
    from pipeline.faces.scrfd import ScrfdDetector

    with pytest.raises(UntrustedModelFile, match=r"sha256 [0-9a-f]{64} is not the expected") as e:
        ScrfdDetector(path)
    assert "could not load it as an ONNX model" not in str(e.value)
    register(path)
    with pytest.raises(ValueError, match="could not load it as an ONNX model"):
        ScrfdDetector(path)


_RAN: list[str] = []


def _record(flag):
    _RAN.append(flag)
    return flag


class Payload:
    def __reduce__(self):
        return (_record, ("ran",))


def test_unrecorded_torch_file_is_refused_before_torch_reads_it(tmp_path):
    """A pickle whose payload would run under a plain torch.load: no record -> refused before torch.load;
    recorded -> torch.load(weights_only=True) refuses it. The payload never runs either way."""
    from pipeline.scoring.syncnet import SyncNet

    path = tmp_path / "syncnet_v2.model"
    torch.save({"netcnnaud.0.weight": torch.zeros(1), "hook": Payload()}, path)
    with pytest.raises(UntrustedModelFile, match=r"no sha256 on record.*--register syncnet_v2.model"):
        SyncNet.from_state_dict_file(path)
    register(path)
    with pytest.raises(Exception, match="(?i)weights only|unpickl"):
        SyncNet.from_state_dict_file(path)
    assert _RAN == []


def test_a_lock_entry_cannot_override_a_pinned_hash(tmp_path):
    from pipeline.faces.scrfd import ScrfdDetector

    pinned = FULL_MODELS["scrfd"].files[0]
    path = tmp_path / pinned.path  # det_10g.onnx holding other (valid ONNX) bytes
    path.write_bytes(smoke_model_bytes())
    # a lock that vouches for these bytes, as a hostile or mistaken hand would write it
    (tmp_path / LOCK_FILE).write_text(json.dumps({pinned.path: {"sha256": sha256_of(path)}}))
    with pytest.raises(UntrustedModelFile, match="pinned in pipeline/models/registry.py") as e:
        ScrfdDetector.from_model_dir(tmp_path)
    assert pinned.sha256 in str(e.value) and sha256_of(path) in str(e.value)
    # insightface's own layout and a lock inside the model's folder change nothing
    (tmp_path / "buffalo_l").mkdir()
    os.replace(path, tmp_path / "buffalo_l" / pinned.path)
    (tmp_path / "buffalo_l" / LOCK_FILE).write_text(json.dumps({pinned.path: {"sha256": sha256_of(tmp_path / "buffalo_l" / pinned.path)}}))
    with pytest.raises(UntrustedModelFile, match="pinned"):
        ScrfdDetector.from_model_dir(tmp_path)
    # and --register refuses a pinned name
    assert fetch_job().main(["--dir", str(tmp_path), "--register", f"buffalo_l/{pinned.path}"]) == 1


def test_register_refuses_paths_outside_the_directory(tmp_path):
    (tmp_path / "outside.onnx").write_bytes(b"x")
    (tmp_path / "models").mkdir()
    with pytest.raises(ValueError, match="not inside"):
        registry.register_local_files(tmp_path / "models", "../outside.onnx", log=lambda *_: None)


def test_each_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    calls = []
    real = registry.sha256_of
    monkeypatch.setattr(registry, "sha256_of", lambda p, *a: calls.append(Path(p)) or real(p, *a))
    path = tmp_path / "weights.onnx"
    path.write_bytes(smoke_model_bytes())
    register(path)  # hashes it (1)
    for _ in range(3):
        verified_file(path)
    assert len(calls) == 1
    flip_one_byte(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a new mtime
    with pytest.raises(UntrustedModelFile):
        verified_file(path)
    assert len(calls) == 2


def test_preflight_refuses_a_changed_file_before_ray_starts(tmp_path):
    from pipeline.config import load_config
    from pipeline.runner import preflight
    from pipeline.scoring.syncnet import SyncNet

    models = tmp_path / "models"
    models.mkdir()
    torch.save(SyncNet.tiny().state_dict(), models / "syncnet_v2.model")
    (models / "lmk_own.onnx").write_bytes(smoke_model_bytes())  # preflight only checks hashes
    register(models)
    cfg = load_config(None, profile="full", model_dir=str(models), **{
        "detect.backend": "mediapipe", "score.identity": False, "features.enabled": False,
        "score.landmarks3d_model": "lmk_own.onnx"})
    preflight(cfg)
    flip_one_byte(models / "syncnet_v2.model")
    with pytest.raises(UntrustedModelFile, match=r"(?s)cannot start.*syncnet_v2\.model.*sha256"):
        preflight(cfg)


def test_trainer_checkpoint_manifest_verified_on_load(tmp_path):
    from loopy_model.models.loopy import LoopyModel
    from loopy_model.presets import preset
    from loopy_model.train.checkpoint import load_trainer_state, save_checkpoint, verified_model_dir

    model = LoopyModel(stage=1, audio_layers=2, audio_dim=8, **preset("tiny")["model"])
    ckpt = save_checkpoint(tmp_path, 3, model, {"step": 3, "w": torch.ones(2)})
    manifest = json.loads((ckpt / LOCK_FILE).read_text())
    assert {"trainer.pt", "model/config.json"} <= set(manifest)
    assert load_trainer_state(ckpt)["step"] == 3
    LoopyModel.from_pretrained(str(verified_model_dir(ckpt / "model")), low_cpu_mem_usage=False)

    weights = next((ckpt / "model").glob("*.safetensors"))
    flip_one_byte(weights, offset=weights.stat().st_size - 3)  # a tensor byte: safetensors would still load it
    with pytest.raises(UntrustedModelFile, match=weights.name):
        verified_model_dir(ckpt / "model")
    flip_one_byte(ckpt / "trainer.pt")
    with pytest.raises(UntrustedModelFile, match="trainer.pt"):
        load_trainer_state(ckpt)
    (ckpt / LOCK_FILE).unlink()  # a checkpoint without its manifest
    with pytest.raises(UntrustedModelFile, match="no sha256 on record"):
        load_trainer_state(ckpt)
