"""Diffusion wrapper: noise schedule, noising, targets, loss. The network is any callable.

k-diffusion style: the denoiser knows nothing about timesteps' meaning; this module owns the
forward process and the objective, and the trainer glues them:

    t, noise = diffusion.draw(x0, generators); x_t = diffusion.add_noise(x0, noise, t)
    loss, per_sample = diffusion.loss(net(x_t, t, cond), diffusion.target(x0, noise, t), t, mask)

Objective: Loopy Eq. 1 (lost in the text we have; reconstructed as in DESIGN.md) is the
latent-diffusion epsilon loss E[ || eps - eps_theta(z_t, t, c) ||^2 ], z_t = sqrt(ab_t) z_0 +
sqrt(1 - ab_t) eps, with SD 1.5's scaled-linear DDPM schedule. Options, as in Moore/Hallo trainers:
- v-prediction + zero-terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
  Steps are Flawed"): rescale betas so ab_T = 0, predict v = sqrt(ab) eps - sqrt(1 - ab) x0, and
  sample with "trailing" timestep spacing so inference starts at t = T - 1;
- min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
  Weighting Strategy"): w_t = min(SNR_t, gamma) / SNR_t for epsilon, / (SNR_t + 1) for v;
- offset noise: eps += offset * N(0, 1) per (sample, channel), constant over frames and pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler


@dataclass(frozen=True)
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # SD 1.5's
    prediction_type: str = "epsilon"  # or "v_prediction"
    zero_terminal_snr: bool = False  # rescale betas (Lin et al. 2023); v_prediction only
    min_snr_gamma: float | None = None  # min-SNR-gamma weighting (Hang et al. 2023), e.g. 5.0
    noise_offset: float = 0.0  # offset noise per (sample, channel), e.g. 0.05 in Moore/Hallo

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction: {self.prediction_type!r}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            # At SNR 0 the input is pure noise, so predicting eps is trivial and x0 = (x_t -
            # sqrt(1-ab) eps) / sqrt(ab) divides by zero (Lin et al. 2023, section 3.2).
            raise ValueError("zero_terminal_snr needs prediction_type='v_prediction'")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError("min_snr_gamma must be > 0")
        if self.noise_offset < 0:
            raise ValueError("noise_offset must be >= 0")


class Diffusion:
    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_train_timesteps = cfg.num_train_timesteps
        # Take the schedule from diffusers itself so it is exactly SD 1.5's (float32 there).
        sched = DDPMScheduler(**self.scheduler_config())
        self.alphas_cumprod = sched.alphas_cumprod.detach().clone().float()  # [T], CPU

    def scheduler_config(self) -> dict:
        """Kwargs for DDPMScheduler(**cfg) / DDIMScheduler(**cfg) matching this training schedule."""
        c = self.cfg
        cfg = dict(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                   beta_schedule=c.beta_schedule, prediction_type=c.prediction_type, clip_sample=False,
                   rescale_betas_zero_snr=c.zero_terminal_snr)
        if c.zero_terminal_snr:  # Lin et al. 2023, section 3.3: always start sampling from t = T-1
            cfg.update(timestep_spacing="trailing", steps_offset=0)
        else:  # SD 1.5's scheduler_config.json
            cfg.update(timestep_spacing="leading", steps_offset=1)
        return cfg

    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t (float32) on like's device, shaped [B, 1, ..., 1] to broadcast over like."""
        ab = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]
        return ab.view(-1, *([1] * (like.dim() - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = alpha_bar_t / (1 - alpha_bar_t), float32, on t's device (0 at a zero-SNR T-1)."""
        ab = self.alphas_cumprod.to(t.device)[t.long()]
        return ab / (1 - ab)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (DDPM forward process), in x0's dtype."""
        ab = self._ab(t, x0)
        return (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses: eps, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho)."""
        if self.cfg.prediction_type == "epsilon":
            return noise
        ab = self._ab(t, x0)
        return (ab.sqrt() * noise - (1 - ab).sqrt() * x0).to(x0.dtype)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights [B] (float32): ones, or min-SNR-gamma (Hang et al. 2023)."""
        if self.cfg.min_snr_gamma is None:
            return torch.ones(t.shape[0], dtype=torch.float32, device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.cfg.min_snr_gamma)
        # epsilon: loss_x0 = SNR * loss_eps, so w_eps = min(SNR, g) / SNR; v: loss_v = (SNR + 1) loss_eps
        return clipped / snr if self.cfg.prediction_type == "epsilon" else clipped / (snr + 1)

    def draw(self, x0: torch.Tensor, generators: list[torch.Generator],
             channel_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [B] (long) and noise like x0, sample i drawn only from generators[i] (CPU).

        One generator per sample (seeded e.g. from the sample's global index) makes the draw
        independent of how a batch is split over ranks. Order per sample: t, noise, offset.
        ``channel_dim`` is x0's channel axis (1 for [B, C, ...], 2 for [B, F, C, H, W]); the
        offset is constant over every other non-batch axis.
        """
        if len(generators) != x0.shape[0]:
            raise ValueError(f"need one generator per sample: {len(generators)} for batch {x0.shape[0]}")
        ts, noises = [], []
        for g in generators:
            ts.append(torch.randint(0, self.num_train_timesteps, (1,), generator=g))
            n = torch.randn(x0.shape[1:], generator=g, dtype=torch.float32)
            if self.cfg.noise_offset > 0:
                shape = [1] * (x0.dim() - 1)
                shape[channel_dim - 1] = x0.shape[channel_dim]
                n = n + self.cfg.noise_offset * torch.randn(shape, generator=g, dtype=torch.float32)
            noises.append(n)
        return torch.cat(ts).to(x0.device), torch.stack(noises).to(device=x0.device, dtype=x0.dtype)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
             frame_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted MSE (Eq. 1). Returns (scalar loss, per-sample weighted losses [B]).

        Per sample: mean squared error over all its elements in float32, or, with ``frame_mask``
        [B, F] bool and prediction [B, F, ...], the mean over its unmasked frames only (a sample
        with none gives 0). The per-sample weights multiply these per-sample errors before the
        batch mean: loss = sum_i w_i mse_i / B. (Hallo train_stage2.py L873 takes the batch mean
        first, which turns min-SNR into a single mean weight.)
        """
        err = (prediction.float() - target.float()).square()
        if frame_mask is None:
            per_sample = err.reshape(err.shape[0], -1).mean(1)
        else:
            per_frame = err.reshape(err.shape[0], err.shape[1], -1).mean(2)  # [B, F]
            m = frame_mask.to(per_frame.device, torch.float32)
            per_sample = (per_frame * m).sum(1) / m.sum(1).clamp(min=1)
        weighted = per_sample * self.loss_weights(t).to(per_sample.device)
        return weighted.mean(), weighted


def timestep_buckets(t: torch.Tensor, per_sample_loss: torch.Tensor, num_train_timesteps: int,
                     num_buckets: int = 10) -> dict[str, tuple[float, int]]:
    """Loss summed per timestep bucket, for logging: {"t000-099": (sum_loss, count), ...}.

    Every bucket is present (count 0 if empty) so ranks can all-reduce the same keys.
    """
    width = math.ceil(num_train_timesteps / num_buckets)
    digits = len(str(num_train_timesteps - 1))
    t, losses, out = t.detach().cpu().long(), per_sample_loss.detach().cpu().double(), {}
    for lo in range(0, num_train_timesteps, width):
        hi = min(lo + width, num_train_timesteps) - 1
        sel = (t >= lo) & (t <= hi)
        out[f"t{lo:0{digits}d}-{hi:0{digits}d}"] = (float(losses[sel].sum()), int(sel.sum()))
    return out
