"""wav2vec2 hidden states of every layer, one row per 25 fps video frame, computed in fp32.

Contract (schemas 2.0: ``audio.npy`` float16 [T,L,D]): L = num_hidden_layers + 1 hidden states
(``output_hidden_states=True``): index 0 is the encoder input (CNN features -> feature projection ->
positional convolution -> layer norm), 1..L-1 the transformer layers; D = hidden size (768 for
facebook/wav2vec2-base-960h, L = 13). meta.json records L (``audio_layers``), that index 0 is
included (``audio_layer0_included``) and the 50 -> 25 fps method (``audio_resampling``). The
model runs in fp32, never under autocast (as Hallo computes it).

Alignment (time 0 = first video frame, 16 kHz, 25 fps -> 640 samples per frame):
  * frame i covers audio samples [640 i, 640 (i+1)).
  * The audio is first cut or zero-padded to exactly 640 T samples (the crop stage already makes
    audio and video start together), normalised like ``Wav2Vec2FeatureExtractor`` (zero mean, unit
    variance over the clip's own samples), then padded with 40 zeros on each side.
  * wav2vec2's CNN has a 400-sample receptive field and a 320-sample stride (50 Hz), so on
    640 T + 80 samples it yields exactly 2 T rows; row k sees samples [320 k - 40, 320 k + 360),
    centred on 320 k + 160. Rows 2i and 2i+1 are centred 160 samples either side of frame i's centre
    (640 i + 320): they are frame i's two rows, and frame i's feature is their mean, taken on the
    transformer's *outputs* (the encoder runs on the 50 Hz sequence it was pretrained on).
  * The pairing is V-Express's (tencent-ailab/V-Express, datasets/talking_face_video.py,
    get_audio_frame_embeddings: frame i owns 50 Hz rows [2i, 2i+2)); their mean is exactly what
    linear interpolation 50 -> 25 Hz with half-sample-centred grids gives
    (``F.interpolate(mode="linear", align_corners=False)`` samples 50 Hz position 2i + 0.5).

What Hallo does instead (fudan-generative-vision/hallo, hallo/models/wav2vec.py ``Wav2VecModel.forward``
and ``linear_interpolation``; hallo/datasets/audio_processor.py ``preprocess``): it interpolates the
*CNN features* (``feature_extractor`` output, before the feature projection) to the frame count with
``F.interpolate(mode="linear", align_corners=True)``, runs the projection and transformer on that
25 Hz sequence, keeps ``hidden_states[1:]`` (the 12 transformer layers, no index 0), and computes
in fp32. So our features are not Hallo's: fine for training an audio projection from scratch, but
Hallo's pretrained audio projection expects its own features; ``audio[:, 1:]`` at least gives it
the 12 layers it was built for (the values still differ, as the transformer saw 50 Hz input here).
"""
from __future__ import annotations

import json
from math import gcd
from pathlib import Path

import numpy as np
import torch

from pipeline.models.registry import FULL_MODELS, verified_file, verified_model_path

from .precision import tf32_mode

SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
FEATURE_STRIDE = 320  # product of conv_stride (5,2,2,2,2,2,2): 50 Hz
RECEPTIVE_FIELD = 400  # of conv_kernel (10,3,3,3,3,2,2) with those strides
EDGE_PAD = (RECEPTIVE_FIELD - FEATURE_STRIDE) // 2  # 40: centres frame i's two rows on the frame
ALIGNMENT = "wav2vec2@50Hz, rows (2i,2i+1) averaged per 25fps frame (V-Express pairing), 40-sample edge pad"
# meta.json "audio_resampling": how the 50 Hz rows become 25 fps rows.
RESAMPLING = ("mean of 50 Hz rows (2i, 2i+1) after the transformer (= linear 50->25 Hz, align_corners=False); "
              "input 640T samples + 40 zeros each side")
LAYER0_INCLUDED = True  # audio.npy[:, 0] is hidden_states[0]; Hallo keeps hidden_states[1:]

# Same conv geometry as wav2vec2-base (stride 320 -> 50 Hz, receptive field 400), tiny widths.
SMOKE_CONFIG = dict(
    hidden_size=16, conv_dim=(8,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    num_hidden_layers=2, num_attention_heads=2, intermediate_size=20,
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="group",
    do_stable_layer_norm=False, vocab_size=32,
)
SMOKE_SEED = 0
SMOKE_ID = "smoke:tiny-wav2vec2-seed0"


# ---- input audio -------------------------------------------------------------------------

def to_16k_mono(samples: np.ndarray, rate: int) -> np.ndarray:
    """Any-rate mono [N] or channels-last [N, C] PCM (float, or int16/int32/uint8) -> float32 [M] at 16 kHz.

    Channels are averaged (the usual downmix; V-Express also takes the mean over channels), then
    resampled by the rational factor 16000/rate with scipy's polyphase FIR (Kaiser window), which
    handles 44.1 kHz (160/441) exactly and without drift.
    """
    from scipy.signal import resample_poly

    x = np.asarray(samples)
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        mid = (int(info.max) + int(info.min) + 1) / 2  # 0 for signed, 128 for uint8
        x = (x.astype(np.float64) - mid) / (info.max - mid + 1)
    x = x.astype(np.float64, copy=False)
    if x.ndim == 2:
        if x.shape[1] > 8:
            raise ValueError(f"expected channels-last audio [N, C], got shape {x.shape}; transpose [C, N] input")
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise ValueError(f"audio must be [N] or [N, C], got shape {x.shape}")
    rate = int(rate)
    if rate <= 0:
        raise ValueError(f"bad sample rate {rate}")
    if rate != SAMPLE_RATE:
        g = gcd(SAMPLE_RATE, rate)
        x = resample_poly(x, SAMPLE_RATE // g, rate // g)
    return x.astype(np.float32)


def zero_mean_unit_var(x: np.ndarray) -> np.ndarray:
    """As transformers' Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm (do_normalize=True)."""
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def frame_aligned_input(audio16k: np.ndarray, n_frames: int, normalize: bool = True) -> np.ndarray:
    """The model input for ``n_frames`` frames: 640 T samples (cut/zero-padded), normalised, plus
    40 zeros each side -> 640 T + 80 samples -> exactly 2 T wav2vec2 rows (see module doc)."""
    a = np.asarray(audio16k, dtype=np.float32)
    if a.ndim != 1:
        raise ValueError(f"audio16k must be 1-D float32 at 16 kHz, got shape {a.shape}")
    n = n_frames * SAMPLES_PER_FRAME
    a = a[:n]
    if normalize and len(a):
        a = zero_mean_unit_var(a)  # statistics of the clip's own samples, before zero padding
    out = np.zeros(n + 2 * EDGE_PAD, dtype=np.float32)
    out[EDGE_PAD:EDGE_PAD + len(a)] = a
    return out


def n_feature_rows(n_samples: int, kernels=(10, 3, 3, 3, 3, 2, 2), strides=(5, 2, 2, 2, 2, 2, 2)) -> int:
    """Output length of wav2vec2's unpadded conv stack (as Wav2Vec2Model._get_feat_extract_output_lengths)."""
    n = n_samples
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return n


# ---- models ------------------------------------------------------------------------------

def build_smoke_wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SMOKE_SEED)
        return Wav2Vec2Model(Wav2Vec2Config(**SMOKE_CONFIG)).eval()


def load_wav2vec2_dir(path: str | Path):
    """``Wav2Vec2Model.from_pretrained`` on a local transformers directory (config.json +
    model.safetensors). A Wav2Vec2ForCTC checkpoint (as facebook/wav2vec2-base-960h) loads too: its
    ``wav2vec2.`` prefix is stripped and the CTC head ignored. Missing encoder weights are an error,
    never silently random. No remote code, no pickle."""
    from transformers import Wav2Vec2Model

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"missing model file {path / name} (model 'wav2vec2')")
        verified_file(path / name, "wav2vec2 model file")  # recorded sha256, before transformers reads it
    model, info = Wav2Vec2Model.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                output_loading_info=True)
    # masked_spec_embed is only used for SpecAugment during training; some checkpoints omit it.
    missing = [k for k in info.get("missing_keys", []) if k != "masked_spec_embed"]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:5]}, "
                         f"mismatched {mismatched[:5]}")
    return model.eval()


def read_do_normalize(path: Path | None) -> bool:
    """``do_normalize`` of preprocessor_config.json (True for wav2vec2-base-960h); True when absent."""
    p = None if path is None else Path(path) / "preprocessor_config.json"
    if p is not None and p.is_file():
        return bool(json.loads(p.read_text()).get("do_normalize", True))
    return True


def load_wav2vec2(profile: str, model_dir: str | Path | None = None):
    """(model, model_id, do_normalize) for a profile; ``full`` reads ``model_dir/wav2vec2-base-960h``."""
    if profile == "smoke":
        return build_smoke_wav2vec2(), SMOKE_ID, True
    if profile != "full":
        raise ValueError(f"unknown profile {profile!r}")
    d = verified_model_path(model_dir, "wav2vec2")
    return load_wav2vec2_dir(d), FULL_MODELS["wav2vec2"].model_id, read_do_normalize(d)


# ---- features ----------------------------------------------------------------------------

@torch.inference_mode()
def encode_audio(model, audio16k: np.ndarray, n_frames: int, *, device: torch.device | str = "cpu",
                 normalize: bool = True) -> np.ndarray:
    """float32 [N] at 16 kHz -> float16 [T, L, D] (all hidden states, one row per video frame), in fp32."""
    device = torch.device(device)
    cfg = model.config
    L, D = cfg.num_hidden_layers + 1, cfg.hidden_size
    if n_frames == 0:
        return np.zeros((0, L, D), dtype=np.float16)
    weights = {p.dtype for p in model.parameters()}
    if weights != {torch.float32}:
        raise ValueError(f"wav2vec2 weights are {sorted(map(str, weights))}; features are computed in float32")
    x = frame_aligned_input(audio16k, n_frames, normalize)
    rows = n_feature_rows(len(x), cfg.conv_kernel, cfg.conv_stride)
    if rows != 2 * n_frames:
        raise ValueError(f"model conv stack gives {rows} rows for {n_frames} frames; the alignment needs "
                         f"stride {FEATURE_STRIDE} and receptive field {RECEPTIVE_FIELD} (wav2vec2 geometry)")
    # an enclosing autocast (e.g. a caller's) must not lower the precision: fp32 like Hallo; and on
    # CUDA strict fp32, not cuDNN's default TF32 for the conv feature encoder (precision.py)
    with torch.autocast(device.type, enabled=False), tf32_mode(False):
        out = model(torch.from_numpy(x)[None].to(device), output_hidden_states=True)
    h = torch.stack(out.hidden_states, dim=2)[0].float()  # [2T, L, D]
    return h.view(n_frames, 2, L, D).mean(dim=1).to(torch.float16).cpu().numpy()
