"""Training configuration: the paper's settings as defaults (section 4, "Implementation Details":
AdamW, lr 1e-5, 12 target frames, 124 motion frames -> 20 latents, batch 1 per GPU)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# What trains by default in each stage (paper 3.4 "Multistage Training": stage 1 trains the
# ReferenceNet and the denoising U-Net on single frames; stage 2 "add[s] the inter-/intra-clip
# temporal layers and the audio condition module for full training").
STAGE_TRAINABLE = {
    1: ("denoiser", "reference", "text_context"),
    2: ("denoiser", "reference", "text_context", "temporal", "audio", "a2l"),
}


@dataclass
class TrainConfig:
    data: str  # dataset root (index.json) or URI
    out: str  # RUN_DIR: checkpoints, metrics.csv, tensorboard/, config.json
    stage: int = 1
    preset: str = "tiny"
    init: str | None = None  # stage-1 RUN_DIR / checkpoint (stage 2), or an SD 1.5 directory/file
    where: str | None = None
    split: str | None = None  # "train:0.02": train on the identities outside a 2% val split (docs/loader.md)
    balance: str | None = None  # "identity": draw identities equally (or by balance_temperature)
    balance_temperature: float | None = None  # p(identity) ∝ clips ** (1/T); None = uniform
    allow_smoke: bool = False
    resume: bool = False
    max_steps: int = 1000
    global_batch_size: int = 0  # clips per optimiser step over all ranks; 0 = world size x grad_accum
    grad_accum: int = 1  # loader batches (of global_batch_size / grad_accum clips) per optimiser step
    seed: int = 0
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (diffusers.optimization.get_scheduler names)
    grad_clip: float = 1.0
    mixed_precision: str = "bf16"  # bf16 autocast with fp32 master weights | no
    gradient_checkpointing: bool = False
    ema_decay: float | None = None  # e.g. 0.9999
    max_nonfinite_steps: int = 10  # stop after this many skipped steps in a row
    trainable: tuple[str, ...] | None = None  # parameter groups; None = STAGE_TRAINABLE[stage]
    # diffusion (loopy_model/diffusion.py)
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    # condition masks (paper 3.4)
    ref_drop: float = 0.15
    audio_drop: float = 0.10
    motion_zero: float = 0.40
    # data
    num_workers: int = 2
    cache_dir: str | None = None
    verify_shards: bool = False  # sha256 of every shard against index.json once per process (docs/loader.md, Faults)
    storage_options: dict | None = None
    windows_per_clip: int = 1
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 1
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)  # LoopyModel config fields over the preset's

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.mixed_precision not in ("bf16", "no"):
            raise ValueError("mixed_precision must be 'bf16' or 'no'")
        if self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if self.grad_accum < 1 or (self.global_batch_size and self.global_batch_size % self.grad_accum):
            raise ValueError(f"global_batch_size {self.global_batch_size} must be a multiple of grad_accum "
                             f"{self.grad_accum} (>= 1)")
        self.adam_betas = tuple(self.adam_betas)
        if self.trainable is not None:
            self.trainable = tuple(self.trainable)

    @property
    def trainable_groups(self) -> tuple[str, ...]:
        return self.trainable if self.trainable is not None else STAGE_TRAINABLE[self.stage]

    def to_dict(self) -> dict:
        return asdict(self)
