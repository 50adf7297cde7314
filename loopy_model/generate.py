"""Reference image + speech -> talking video with a trained Loopy model (paper 3.4, 3.5).

Every preprocessing step is the curation pipeline's own, imported, so training and inference
features cannot drift apart: the portrait goes through the same face detector and square crop
geometry (``pipeline.faces``, ``pipeline.segment.crop_box``, ``pipeline.crop.crop_square``) and the
same SD VAE; the audio through the same decoder/resampler (``pipeline.media.decode_audio``, 16 kHz
mono), the same wav2vec2 extractor and 25 fps alignment (``pipeline.features.wav2vec``). The
model's feature models come from the same profile (``smoke`` or ``full`` + a model directory) the
training shards were made with.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loopy_model.conditions import resize_latents
from loopy_model.diffusion import Diffusion, DiffusionConfig
from loopy_model.models import LoopyModel
from loopy_model.sampling import GuidanceConfig, generate_latents

FPS, AUDIO_RATE = 25, 16000
SAMPLES_PER_FRAME = AUDIO_RATE // FPS  # 640: wav2vec2's 20 ms hop x 2 (pipeline/features/wav2vec.py)


class GenerateError(ValueError):
    """A request that cannot be rendered; the message names the file and the problem."""


@dataclass(frozen=True)
class GenerateConfig:
    profile: str = "smoke"  # the feature models the training shards were made with
    model_dir: str | None = None  # full-profile weights (VAE, wav2vec2, SCRFD)
    guidance: GuidanceConfig = GuidanceConfig()
    seed: int = 0
    crop: bool = True  # False: the image is already a square face crop
    use_ema: bool = True  # the EMA weights when the checkpoint has them
    device: str = "cpu"
    progress: bool = True
    vae_tiling: bool = False  # decode in overlapping tiles (diffusers enable_tiling) when memory asks


def resolve_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[Path, dict]:
    """(model directory, diffusion settings) from a RUN_DIR, a checkpoint or a model directory.

    The diffusion settings (prediction type, zero-terminal SNR) come from the run's config.json,
    found by walking up from ``path`` to the directory that holds ``checkpoints/``.
    """
    from loopy_model.train.checkpoint import latest_checkpoint

    path = Path(path)
    run_config = next((json.loads((d / "config.json").read_text()) for d in [path, *path.parents][:4]
                       if (d / "checkpoints").is_dir() and (d / "config.json").is_file()), {})
    if (path / "checkpoints").is_dir():
        path = latest_checkpoint(path) or path
    if use_ema and (path / "ema" / "config.json").exists():
        path = path / "ema"
    elif (path / "model" / "config.json").exists():
        path = path / "model"
    if not (path / "config.json").exists() or '"LoopyModel"' not in (path / "config.json").read_text():
        raise GenerateError(f"{path}: not a Loopy checkpoint (no LoopyModel config.json)")
    diffusion = {k: run_config[k] for k in ("prediction_type", "zero_terminal_snr") if k in run_config}
    return path, diffusion


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence what native libraries print on fd 2 (MediaPipe's TFLite/absl start-up lines), so
    a bad input stays one clear line on the terminal. Python-level errors are unaffected."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class Generator:
    """A loaded model and its feature models; ``render`` many requests with one load."""

    def __init__(self, checkpoint: str | Path, cfg: GenerateConfig = GenerateConfig()):
        from diffusers import DDIMScheduler

        from pipeline.config import load_config
        from pipeline.faces.base import make_detector
        from pipeline.features.vae import load_vae
        from pipeline.features.wav2vec import load_wav2vec2

        self.cfg = cfg
        self.device = torch.device(cfg.device)
        model_dir, diffusion = resolve_checkpoint(checkpoint, cfg.use_ema)
        from loopy_model.train.checkpoint import verified_model_dir

        verified_model_dir(model_dir)  # the sha256s recorded when the checkpoint was written
        try:
            self.model = LoopyModel.from_pretrained(str(model_dir), low_cpu_mem_usage=False).eval().to(self.device)
        except (ValueError, RuntimeError, OSError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            detail = lines[0] if lines else e.__class__.__name__
            more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
            raise GenerateError(f"{model_dir}: the checkpoint does not match its model config: {detail}{more}") from None
        self.scheduler = DDIMScheduler(**Diffusion(DiffusionConfig(**diffusion)).scheduler_config())
        self.curate = load_config(profile=cfg.profile, model_dir=cfg.model_dir)
        with quiet_native_stderr():
            self.detector = make_detector(self.curate) if cfg.crop else None
        self.vae, _ = load_vae(cfg.profile, cfg.model_dir)
        self.vae = self.vae.to(self.device)
        if cfg.vae_tiling:
            self.vae.enable_tiling()
        self.wav2vec, _, self.normalize_audio = load_wav2vec2(cfg.profile, cfg.model_dir)
        mc = self.model.config
        layers, dim = self.wav2vec.config.num_hidden_layers + 1, self.wav2vec.config.hidden_size
        if mc.stage == 2 and (layers, dim) != (mc.audio_layers, mc.audio_dim):
            raise GenerateError(f"{model_dir}: the model expects audio features {mc.audio_layers} x {mc.audio_dim}, "
                                f"the {cfg.profile} profile's wav2vec2 gives {layers} x {dim}")

    # ------------------------------------------------------------------ inputs
    def portrait(self, image_path: str | Path) -> np.ndarray:
        """uint8 [512, 512, 3]: the curation crop around the most confident face."""
        from PIL import Image, UnidentifiedImageError

        from pipeline.crop import crop_square
        from pipeline.segment import crop_box

        try:
            with Image.open(image_path) as im:
                img = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise GenerateError(f"{image_path}: cannot read the image ({e.__class__.__name__})") from None
        size = self.curate.output.size
        if self.detector is None:
            if img.shape[0] != img.shape[1]:
                raise GenerateError(f"{image_path}: --no-crop needs a square image, got {img.shape[1]}x{img.shape[0]}")
            return crop_square(img, 0, 0, img.shape[0], size)
        with quiet_native_stderr():
            faces = self.detector.detect(img)
        if not faces:
            raise GenerateError(f"{image_path}: no face found")
        x0, y0, side, *_ = crop_box(np.asarray([faces[0].box], dtype=np.float32), width=img.shape[1],
                                    height=img.shape[0], crop_scale=self.curate.segment.crop_scale, smooth=1)
        return crop_square(img, x0, y0, side, size)

    def speech(self, audio_path: str | Path) -> tuple[np.ndarray, int]:
        """(16 kHz mono float32, video frames): one frame per 640 samples, rounded."""
        from pipeline.media import MediaError, decode_audio

        path = str(audio_path)
        if not os.path.exists(path):
            raise GenerateError(f"{path}: no such file")
        try:
            samples, _ = decode_audio(path, AUDIO_RATE)
        except MediaError as e:
            raise GenerateError(f"{path}: {e}") from None
        except Exception as e:  # PyAV/FFmpeg errors on files that are not media at all
            raise GenerateError(f"{path}: cannot decode audio ({e.__class__.__name__})") from None
        n_frames = int(round(len(samples) / SAMPLES_PER_FRAME))
        if n_frames < 1:
            raise GenerateError(f"{path}: the audio is empty")
        if float(np.abs(samples).max()) < 1e-4:
            raise GenerateError(f"{path}: the audio is silent")
        return samples, n_frames

    # ------------------------------------------------------------------ render
    @torch.no_grad()
    def render(self, image: str | Path, audio: str | Path, out: str | Path, seed: int | None = None) -> dict:
        from pipeline.features.vae import SCALING_FACTOR, encode_frames
        from pipeline.features.wav2vec import encode_audio

        face = self.portrait(image)
        samples, n_frames = self.speech(audio)
        mc = self.model.config
        latent_size = mc.unet["sample_size"]
        moments = torch.from_numpy(encode_frames(self.vae, face[None], device=self.device)).float()
        ref = resize_latents(moments[:, :4] * SCALING_FACTOR, latent_size)[0].to(self.device)
        features = torch.from_numpy(encode_audio(self.wav2vec, samples, n_frames, device=self.device,
                                                 normalize=self.normalize_audio)).float()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            latents = generate_latents(self.model, self.scheduler, ref, features, n_frames, self.cfg.guidance,
                                       seed=self.cfg.seed if seed is None else seed, progress=self.cfg.progress)
        frames = self.decode(latents.float())
        write_video(out, frames, samples)
        return {"out": str(out), "frames": n_frames, "seconds": n_frames / FPS, "size": frames.shape[1]}

    def decode(self, latents: torch.Tensor, batch: int = 8) -> np.ndarray:
        """[T, c, h, w] scaled latents -> uint8 [T, 8h, 8w, 3], ``batch`` frames at a time (memory)."""
        from pipeline.features.vae import SCALING_FACTOR

        out = []
        for i in range(0, len(latents), batch):
            x = self.vae.decode(latents[i:i + batch].to(self.device) / SCALING_FACTOR).sample
            out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy()


def write_video(path: str | Path, frames: np.ndarray, audio16k: np.ndarray) -> None:
    """H.264 + AAC mp4 at 25 fps (pipeline.media.ClipEncoder), written under a temporary name."""
    from pipeline.media import ClipEncoder

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    enc = ClipEncoder(str(tmp), audio16k, width=frames.shape[2], height=frames.shape[1], fps=FPS,
                      audio_rate=AUDIO_RATE)
    try:
        for img in frames:
            enc.add_frame(img)
        enc.close()
    except BaseException:
        enc.abort()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


class _RenderActor:
    """One Generator per Ray actor (the model loads once per actor); rows in, result rows out."""

    def __init__(self, checkpoint: str, cfg: GenerateConfig):
        self.gen = Generator(checkpoint, cfg)

    def __call__(self, batch: dict) -> dict:
        results = {"out": [], "frames": [], "error": []}
        for image, audio, out, seed in zip(batch["image"], batch["audio"], batch["out"], batch["seed"]):
            try:
                r = self.gen.render(image, audio, out, seed=None if seed < 0 else int(seed))
                results["out"].append(r["out"]), results["frames"].append(r["frames"]), results["error"].append("")
            except (GenerateError, FileNotFoundError) as e:
                results["out"].append(str(out)), results["frames"].append(0), results["error"].append(str(e))
        return results


def render_with_ray(checkpoint: str | Path, cfg: GenerateConfig, requests: list[dict], actors: int = 1,
                    gpus_per_actor: float = 0.0) -> list[dict]:
    """The same requests as a Ray Data job over ``actors`` model-holding actors (GPUs from the
    cluster). Connects to RAY_ADDRESS or starts Ray locally. Returns one row per request, with
    ``error`` empty on success."""
    import ray

    rows = [{"image": str(r["image"]), "audio": str(r["audio"]), "out": str(Path(r["out"]).resolve()),
             "seed": int(r.get("seed", -1))} for r in requests]
    ds = ray.data.from_items(rows).map_batches(
        _RenderActor, fn_constructor_args=(str(Path(checkpoint).resolve()), cfg), batch_size=1,
        concurrency=actors, num_gpus=gpus_per_actor)
    return ds.take_all()
