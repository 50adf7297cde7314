"""All training features of one clip, with every model loaded once per worker.

    fx = FeatureExtractor("full", model_dir="MODELS", device="auto", batch_size=16)
    out = fx(frames, audio16k)      # frames uint8 [T,512,512,3], audio16k float32 [N] (time 0 = frame 0)
    members = fx.members(out)       # {"latent.npy": bytes, "audio.npy": ..., "kps.npy": ..., "motion.npy": ...}

A Ray Data stage wraps this in a callable class (constructed once per actor, called per clip).
Workers only read ``model_dir``; a missing file raises FileNotFoundError naming it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import schemas
from pipeline.shards import npy_bytes

from . import motion as motion_mod
from . import vae as vae_mod
from . import wav2vec as w2v_mod
from .dwpose import DWPoseFace

FRAME_SIZE = 512
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
MEMBER_NAMES = {"latent": "latent.npy", "audio": "audio.npy", "kps": "kps.npy", "motion": "motion.npy"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The VAE's encode precision. auto/None: fp32 everywhere (definitions audit item 4: bf16 autocast
    moved the latents far more than fp16 storage rounding). float16/bfloat16: autocast, CUDA only."""
    if dtype is None or dtype == "auto":
        return torch.float32
    dt = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype!r}")
    if device.type != "cuda" and dt != torch.float32:
        raise ValueError(f"dtype {dtype!r} needs CUDA; on {device.type} the features are computed in float32")
    return dt


class FeatureExtractor:
    """SD VAE latents, wav2vec2 hidden states, DWPose face keypoints and Loopy motion variances.

    ``dtype`` is the VAE's encode precision (fp32 by default; wav2vec2 always runs in strict fp32);
    ``tf32``: a float32 VAE encode on CUDA uses TF32 convolutions (4x faster, precision.py).
    """

    def __init__(self, profile: str, model_dir: str | Path | None = None, device: str = "auto",
                 batch_size: int = 16, dtype: str | torch.dtype | None = "float32",
                 motion_window: int = motion_mod.WINDOW, ort_threads: int | None = None, *,
                 vae_store_std: bool = False, motion_score_threshold: float | None = motion_mod.SCORE_THRESHOLD,
                 motion_min_valid_frac: float = motion_mod.MIN_VALID_FRAC, vae_model: str = vae_mod.REGISTRY_VAE,
                 tf32: bool = True):
        if profile not in schemas.PROFILES:
            raise ValueError(f"unknown profile {profile!r}; expected one of {schemas.PROFILES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.profile = profile
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = int(batch_size)
        self.motion_window = int(motion_window)
        self.vae_store_std = bool(vae_store_std)
        # TF32 applies to float32 encodes on CUDA only (precision.py); what ran is recorded in meta.
        self.vae_tf32 = bool(tf32) and self.device.type == "cuda" and self.dtype == torch.float32
        self.motion_score_threshold = None if motion_score_threshold is None else float(motion_score_threshold)
        self.motion_min_valid_frac = float(motion_min_valid_frac)

        self.vae, vae_id = vae_mod.load_vae(profile, self.model_dir, vae_model)
        self.vae.to(self.device)
        self.wav2vec, w2v_id, self.audio_normalize = w2v_mod.load_wav2vec2(profile, self.model_dir)
        self.wav2vec.to(self.device)
        self.dwpose = DWPoseFace.load(profile, self.model_dir, device=str(self.device), threads=ort_threads,
                                      batch_size=self.batch_size)
        self.model_ids = {"vae": vae_id, "audio_encoder": w2v_id, "keypoints": self.dwpose.model_id}
        cfg = self.wav2vec.config
        self.meta = {
            "profile": profile,
            "vae_scaling_factor": float(self.vae.config.scaling_factor),
            "vae_dtype": str(self.dtype).replace("torch.", ""),
            "vae_store_std": self.vae_store_std,
            "vae_tf32": self.vae_tf32,
            "latent_layout": "mean+std" if self.vae_store_std else "mean",
            "audio_dtype": "float32",
            "audio_alignment": w2v_mod.ALIGNMENT,
            "audio_layers": cfg.num_hidden_layers + 1,
            "audio_layer0_included": w2v_mod.LAYER0_INCLUDED,
            "audio_resampling": w2v_mod.RESAMPLING,
            "audio_dim": cfg.hidden_size,
            "audio_normalized": self.audio_normalize,
            "kps": "DWPose whole-body 23..90 (iBUG-68), x,y in 512-crop pixels, score",
            "motion_window": self.motion_window,
            "motion": "per window start: var(nose tip), mean over 37 upper-face points of var(point - nose tip); "
                      "var = var_x + var_y (ddof 0) over frames with DWPose score >= threshold; columns 0-1 px^2, "
                      "2-3 divided by motion_face_size_px^2; NaN where too few valid points",
            "motion_columns": list(schemas.MOTION_COLUMNS),
            "motion_score_threshold": self.motion_score_threshold,
            "motion_min_valid_frac": self.motion_min_valid_frac,
            "device": str(self.device),
        }

    def __call__(self, frames: np.ndarray, audio16k: np.ndarray) -> dict:
        """-> {"latent", "audio", "kps", "motion": np.ndarray (schema dtypes/shapes), "model_ids", "meta"}."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (FRAME_SIZE, FRAME_SIZE, 3):
            raise ValueError(f"frames must be uint8 [T,{FRAME_SIZE},{FRAME_SIZE},3], got {frames.dtype} {frames.shape}")
        if len(frames) == 0:
            raise ValueError("a clip needs at least one frame")
        audio16k = np.asarray(audio16k, dtype=np.float32)
        T = len(frames)
        latent = vae_mod.encode_frames(self.vae, frames, batch_size=self.batch_size, device=self.device,
                                       dtype=self.dtype, store_std=self.vae_store_std, tf32=self.vae_tf32)
        audio = w2v_mod.encode_audio(self.wav2vec, audio16k, T, device=self.device, normalize=self.audio_normalize)
        kps = self.dwpose(frames)
        # NaN in motion is by definition (a window without enough valid keypoints), not an overflow
        motion, face_size = motion_mod.motion_table(kps, self.motion_window, score_threshold=self.motion_score_threshold,
                                                    min_valid_frac=self.motion_min_valid_frac)
        for name, arr in (("latent", latent), ("audio", audio), ("kps", kps)):
            # fp16 storage (or an fp16 autocast) can overflow; never write inf/NaN into a shard.
            if not np.isfinite(arr).all():
                raise FloatingPointError(f"non-finite values in {name} features ({self.dtype} on {self.device}); "
                                         "retry this clip with dtype='float32'")
        meta = dict(self.meta, n_frames=T, audio_samples=int(len(audio16k)),
                    motion_face_size_px=face_size if np.isfinite(face_size) else None)
        return {"latent": latent, "audio": audio, "kps": kps, "motion": motion,
                "model_ids": dict(self.model_ids), "meta": meta}

    @staticmethod
    def members(features: dict) -> dict[str, bytes]:
        """The four .npy tar members of a sample, checked against the schema's dtypes."""
        out = {}
        for key, member in MEMBER_NAMES.items():
            arr = features[key]
            want = schemas.MEMBERS[member].dtype
            if arr.dtype != np.dtype(want):
                raise TypeError(f"{member}: dtype {arr.dtype}, schema says {want}")
            out[member] = npy_bytes(arr)
        return out
