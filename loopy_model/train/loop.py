"""train(cfg): the Loopy training loop, one code path for a single process, torchrun and Ray Train.

Per step (paper 3.1 Eq. 1, reconstructed in DESIGN.md; 3.4 for the conditions):
    z0 = VAE latents of the target frames (the loader samples them from the stored posterior)
    t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps
    loss = || target(z0, eps, t) - LoopyModel(z_t, t, ref, motion frames, audio, A2L; masks) ||^2
Every random draw of a sample (t, eps, masks, A2L condition) comes from a generator seeded by
(seed, epoch, the sample's global position), so a step computes the same thing on 1 or N ranks
and after any resume; with the loader's exact position and the optimiser state in the
checkpoint, a resumed run reproduces the uninterrupted loss curve (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.nn.parallel import DistributedDataParallel

from loopy_model.conditions import ConditionConfig, draw_conditions, model_inputs
from loopy_model.diffusion import Diffusion, DiffusionConfig, timestep_buckets
from loopy_model.models import LoopyModel, parameter_groups
from loopy_model.presets import preset
from pipeline.shards import atomic_write_bytes

from .checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .metrics import MetricsWriter
from .setup import World, build_loader, build_model, data_layout, init_distributed

log = logging.getLogger(__name__)
_SALT_STEP = 0x4C4F4F50  # "LOOP": the trainer's random stream, apart from the loader's


class NonFiniteLossError(RuntimeError):
    pass


def train(cfg: TrainConfig) -> dict:
    world = init_distributed()
    try:
        return Trainer(cfg, world).run()
    finally:
        if world.owns_process_group:
            dist.destroy_process_group()


def sample_generators(seed: int, batch: dict) -> list[torch.Generator]:
    """One CPU generator per sample, from (seed, epoch, global position, window of that clip)."""
    seen: Counter = Counter()
    gens = []
    for pos in batch["sample_position"].tolist():
        k, seen[pos] = seen[pos], seen[pos] + 1
        state = np.random.SeedSequence([seed, int(batch["epoch"]), pos, k, _SALT_STEP]).generate_state(1, np.uint64)
        gens.append(torch.Generator().manual_seed(int(state[0])))
    return gens


class Trainer:
    def __init__(self, cfg: TrainConfig, world: World):
        self.cfg, self.world = cfg, world
        self.out = Path(cfg.out)
        if not cfg.resume and latest_checkpoint(cfg.out) is not None:
            raise ValueError(f"{cfg.out} already holds checkpoints ({latest_checkpoint(cfg.out).name}); pass "
                             "--resume to continue that run, or choose another --out")
        if world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.loader = build_loader(cfg, world)
        self.layout = data_layout(self.loader)
        self.model, origin = build_model(cfg, self.layout)
        self.latent_size = preset(cfg.preset)["data"]["latent_size"]
        self._log(f"model: {origin}; data: {self.loader.dataset.index.uri} "
                  f"({len(self.loader.dataset.gids)} clips, {self.layout})")
        self.params = self._select_trainable()
        if cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.to(world.device)
        self.diffusion = Diffusion(DiffusionConfig(prediction_type=cfg.prediction_type,
                                                   zero_terminal_snr=cfg.zero_terminal_snr,
                                                   min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset))
        self.conditions = ConditionConfig(cfg.ref_drop, cfg.audio_drop, cfg.motion_zero)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.lr_schedule, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.max_steps)
        self.ema = (EMAModel(self.model.parameters(), decay=cfg.ema_decay, model_cls=LoopyModel,
                             model_config=self.model.config) if cfg.ema_decay else None)
        self.step, self.skipped, self.nonfinite_run = 0, 0, 0
        if cfg.resume:
            self._resume()
        self.net = (DistributedDataParallel(self.model, device_ids=[world.device.index] if world.device.type == "cuda"
                                            else None) if world.size > 1 else self.model)

    # ------------------------------------------------------------------ setup
    def _log(self, msg: str) -> None:
        if self.world.is_main:
            print(msg, flush=True)

    def _select_trainable(self) -> list[torch.nn.Parameter]:
        wanted = set(self.cfg.trainable_groups)
        groups = parameter_groups(self.model)
        unknown = wanted - set(groups)
        if unknown:
            raise ValueError(f"unknown parameter groups {sorted(unknown)}; known: {list(groups)}")
        lines = []
        for name, members in groups.items():
            on = name in wanted and name != "reference_tail"
            for _, p in members:
                p.requires_grad_(on)
            n = sum(p.numel() for _, p in members)
            if n:
                lines.append(f"  {name:<15} {n:>14,} {'trainable' if on else 'frozen'}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"no trainable parameters in groups {sorted(wanted)} of a stage-{self.cfg.stage} model")
        total = sum(p.numel() for p in params)
        self._log(f"stage {self.cfg.stage} parameters ({total:,} trainable):\n" + "\n".join(lines))
        return params

    def _resume(self) -> None:
        path = latest_checkpoint(self.cfg.out)
        if path is None:
            self._log(f"--resume: no checkpoint in {self.cfg.out}; starting fresh")
            return
        state = load_trainer_state(path)
        if state["stage"] != self.cfg.stage:
            raise ValueError(f"{path} is a stage-{state['stage']} checkpoint; this run is stage {self.cfg.stage}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step, self.skipped, self.nonfinite_run = state["step"], state["skipped"], state["nonfinite_run"]
        self._log(f"resumed from {path} at step {self.step} (world size {state['world_size']} -> {self.world.size})")

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        cfg, world = self.cfg, self.world
        if world.is_main:
            atomic_write_bytes(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str).encode())
        buckets = list(timestep_buckets(torch.zeros(1, dtype=torch.long), torch.zeros(1), 1000))
        metrics = MetricsWriter(self.out, self.step, cfg.max_steps, buckets, enabled=world.is_main,
                                progress=cfg.progress)
        last_saved, loss = self.step, float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        try:
            # an optimiser step's micro-batches may straddle an epoch boundary: the accumulation
            # state lives outside the epoch loop, as the gradients do
            pending, wait, clips, step_start = [], 0.0, 0, time.perf_counter()
            while self.step < cfg.max_steps:
                fetch_start = time.perf_counter()
                for batch in self.loader:
                    wait += time.perf_counter() - fetch_start
                    pending.append(self.micro_step(batch, last=len(pending) + 1 == cfg.grad_accum))
                    clips += len(batch["keys"]) * world.size
                    if len(pending) < cfg.grad_accum:  # accumulate gradients over grad_accum batches
                        fetch_start = time.perf_counter()
                        continue
                    row = self.optimizer_step(pending)
                    step_time = time.perf_counter() - step_start
                    loss = row["loss"]
                    row.update(step=self.step, epoch=int(batch["epoch"]), step_time_s=step_time,
                               data_wait_frac=wait / step_time, samples_per_s=clips / step_time,
                               **self.loader.fault_stats())
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        metrics.write(row)
                    metrics.advance()
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                        self.save()
                        last_saved = self.step
                    if self.step >= cfg.max_steps:
                        break
                    fetch_start = time.perf_counter()
                    pending, wait, clips, step_start = [], 0.0, 0, fetch_start
        finally:
            metrics.close()
        if last_saved != self.step:
            self.save()
        summary = {"steps": self.step, "final_loss": loss, "skipped_steps": self.skipped,
                   **self.loader.fault_stats(), "skipped_shard_problems": self.loader.skipped_shards,
                   "checkpoint": str(latest_checkpoint(cfg.out))}
        self._log(f"done: {json.dumps(summary)}")
        return summary

    def micro_step(self, batch: dict, last: bool = True) -> tuple:
        """Forward and backward of one loader batch; gradients add up until the optimiser step.
        Under DDP only the ``last`` micro-batch of a step all-reduces gradients."""
        cfg, dev = self.cfg, self.world.device
        inputs = model_inputs(batch, cfg.stage, self.latent_size)
        gens = sample_generators(cfg.seed, batch)
        z0 = inputs.pop("latents")
        t, noise = self.diffusion.draw(z0, gens, channel_dim=2)  # [B, F, c, H, W]: channels on dim 2
        kwargs = {k: v.to(dev, non_blocking=True) for k, v in inputs.items()}
        if cfg.stage == 2:
            kwargs.update({k: v.to(dev) for k, v in
                           draw_conditions(self.conditions, gens, batch["a2l_valid"]).items()})
        frame_mask = kwargs.pop("frame_mask")
        z0, noise, t = z0.to(dev), noise.to(dev), t.to(dev)
        sync = last or self.world.size == 1
        with contextlib.nullcontext() if sync else self.net.no_sync():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                pred = self.net(self.diffusion.add_noise(z0, noise, t), t, kwargs.pop("ref_latents"), **kwargs)
            loss, per_sample = self.diffusion.loss(pred.float(), self.diffusion.target(z0, noise, t), t, frame_mask)
            (loss / cfg.grad_accum).backward()
        return loss.detach(), t, per_sample.detach()

    def optimizer_step(self, micro: list[tuple]) -> dict:
        """Clip, check, step (or skip) with the gradients of the ``micro`` batches; the metrics row."""
        cfg = self.cfg
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        loss = torch.stack([m[0] for m in micro]).mean()
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        stats = self._reduce(loss, finite, torch.cat([m[1] for m in micro]), torch.cat([m[2] for m in micro]))
        self.step += 1
        if stats["finite"]:
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.step(self.model.parameters())
            self.nonfinite_run = 0
        else:  # the non-finite guard: skip, count, stop after too many in a row
            self.skipped += 1
            self.nonfinite_run += 1
            self._log(f"step {self.step}: non-finite loss or gradient, step skipped "
                      f"({self.nonfinite_run} in a row, {self.skipped} in all)")
            if self.nonfinite_run >= cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_run} non-finite steps in a row; the last good checkpoint is "
                    f"{latest_checkpoint(cfg.out)}")
        self.optimizer.zero_grad(set_to_none=True)
        row = {"loss": stats["loss"], "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
               "skipped": self.skipped, "gpu_mem_gb": _gpu_mem_gb(self.world.device)}
        row.update({f"loss_{k}": v for k, v in stats["buckets"].items()})
        return row

    def _reduce(self, loss, finite, t, per_sample) -> dict:
        """Mean loss, finiteness and per-timestep-bucket losses over all ranks."""
        buckets = timestep_buckets(t.cpu(), per_sample.cpu(), self.diffusion.cfg.num_train_timesteps)
        vec = torch.tensor([loss.item(), float(finite.item())] + [x for s, n in buckets.values() for x in (s, n)],
                           dtype=torch.float64)
        if self.world.size > 1:
            vec_dev = vec.to(self.world.device)
            dist.all_reduce(vec_dev)
            vec = vec_dev.cpu()
        w = self.world.size
        per = vec[2:].view(-1, 2)
        return {"loss": vec[0].item() / w, "finite": vec[1].item() == w,
                "buckets": {k: (s / n).item() if n else float("nan") for k, (s, n) in zip(buckets, per)}}

    def save(self) -> None:
        if self.world.is_main:
            state = {"step": self.step, "stage": self.cfg.stage, "skipped": self.skipped,
                     "nonfinite_run": self.nonfinite_run, "world_size": self.world.size,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "loader": self.loader.state_dict(), "rng": rng_state()}
            ema_model = None
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
                ema_model = _EmaView(self.ema, self.model)
            save_checkpoint(self.out, self.step, self.model, state, ema_model, keep=self.cfg.keep_checkpoints)
        if self.world.size > 1:
            dist.barrier()


class _EmaView:
    """save_pretrained of the EMA weights without building a second model: swap them in, save, swap back."""

    def __init__(self, ema: EMAModel, model: LoopyModel):
        self.ema, self.model = ema, model

    def save_pretrained(self, path, **kwargs):
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        try:
            self.model.save_pretrained(path, **kwargs)
        finally:
            self.ema.restore(self.model.parameters())


def _gpu_mem_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")




