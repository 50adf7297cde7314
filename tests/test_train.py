"""The trainer (loopy_model/train, jobs/train.py) on CPU with the tiny preset: overfitting,
exact resume after SIGKILL, the non-finite guard, data/model checks, and a run on the curation
job's own output. Distributed agreement (torchrun, Ray Train): test_train_distributed.py."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import loader_fixtures
from loader_fixtures import make_dataset
from loopy_model.conditions import model_inputs
from loopy_model.data import LoaderConfig, StreamingLoader, StreamingWindowDataset
from loopy_model.diffusion import Diffusion, DiffusionConfig
from loopy_model.models import LoopyModel
from loopy_model.presets import preset
from loopy_model.train import TrainConfig, train
from loopy_model.train.checkpoint import latest_checkpoint, load_trainer_state
from loopy_model.train.loop import NonFiniteLossError, sample_generators
from loopy_model.train.setup import window_config
from pipeline.shards import npy_bytes
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "jobs" / "train.py")]


def run_cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), preset="tiny", global_batch_size=2, num_workers=0, progress=False,
                mixed_precision="no", checkpoint_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir) -> list[str]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [row["loss"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread; two oversubscribe a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train_ds"), [4, 4, 4], frames=(20, 60))


@pytest.mark.parametrize("stage", [1, 2])
def test_overfit_one_batch(dataset, stage):
    """A fixed batch with fixed noise and timesteps: the loss must fall by at least half."""
    torch.manual_seed(0)
    cfg = run_cfg(dataset, "unused", stage=stage)
    ds = StreamingWindowDataset(LoaderConfig(str(dataset), global_batch_size=2, windows=window_config(cfg)), 0, 1)
    batch = next(iter(StreamingLoader(ds)))
    inputs = model_inputs(batch, stage, preset("tiny")["data"]["latent_size"])
    model = LoopyModel(stage=stage, audio_layers=loader_fixtures.LAYERS, audio_dim=loader_fixtures.DIM,
                       **preset("tiny")["model"])
    diffusion = Diffusion(DiffusionConfig())
    z0, frame_mask, ref = inputs.pop("latents"), inputs.pop("frame_mask"), inputs.pop("ref_latents")
    t, noise = diffusion.draw(z0, sample_generators(0, batch), channel_dim=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    curve = []
    for _ in range(200):
        pred = model(diffusion.add_noise(z0, noise, t), t, ref, **inputs)
        loss, _ = diffusion.loss(pred, diffusion.target(z0, noise, t), t, frame_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    assert np.isfinite(curve).all()
    assert curve[-1] < 0.5 * curve[0], (curve[0], curve[-1])


def test_cli_stage1_then_stage2_with_checks(dataset, tmp_path):
    """Stage 1 from scratch, stage 2 from its checkpoint; both write metrics, TensorBoard and
    checkpoints whose model loads on its own."""
    run1, run2 = tmp_path / "s1", tmp_path / "s2"
    common = ["--data", str(dataset), "--preset", "tiny", "--max-steps", "4", "--batch-size", "2",
              "--loader-workers", "0", "--no-progress", "--checkpoint-every", "2"]
    p1 = subprocess.run(TRAIN + common + ["--stage", "1", "--out", str(run1)], capture_output=True, text=True)
    assert p1.returncode == 0, p1.stderr
    assert "denoiser" in p1.stdout and "trainable" in p1.stdout and "reference_tail" in p1.stdout
    p2 = subprocess.run(TRAIN + common + ["--stage", "2", "--out", str(run2), "--init", str(run1)],
                        capture_output=True, text=True)
    assert p2.returncode == 0, p2.stderr
    assert "stage 1" in p2.stdout and "fresh stage-2 modules" in p2.stdout
    for run, stage in ((run1, 1), (run2, 2)):
        assert len(losses(run)) == 4 and all(np.isfinite(float(x)) for x in losses(run))
        ckpt = latest_checkpoint(run)
        assert ckpt.name == "step-00000004"
        assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
        assert (ckpt / "model" / "diffusion_pytorch_model.safetensors").exists()
        assert LoopyModel.from_pretrained(str(ckpt / "model"), low_cpu_mem_usage=False).config.stage == stage
        state = load_trainer_state(ckpt)
        assert state["step"] == 4 and state["loader"]["samples"] == 8
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the stage-2 run started from the stage-1 weights: its ReferenceNet began equal to stage 1's
    # final one, so after 4 steps at lr 1e-5 it is still close to it
    m1 = LoopyModel.from_pretrained(str(latest_checkpoint(run1) / "model"), low_cpu_mem_usage=False)
    m2 = LoopyModel.from_pretrained(str(latest_checkpoint(run2) / "model"), low_cpu_mem_usage=False)
    w1 = m1.reference_unet.conv_in.weight
    assert torch.allclose(w1, m2.reference_unet.conv_in.weight, atol=1e-3)
    assert not torch.allclose(w1, LoopyModel(stage=1, audio_layers=3, audio_dim=4,
                                             **preset("tiny")["model"]).reference_unet.conv_in.weight, atol=1e-3)


@pytest.mark.long  # an injected fault (SIGKILL mid-run): `make test-long`, like the curation job's
def test_sigkill_and_resume_reproduce_the_loss_curve(dataset, tmp_path):
    steps = 10
    args = ["--data", str(dataset), "--stage", "2", "--preset", "tiny", "--max-steps", str(steps),
            "--batch-size", "2", "--loader-workers", "1", "--no-progress", "--checkpoint-every", "2",
            "--precision", "no", "--ema-decay", "0.99"]
    whole = tmp_path / "whole"
    done = subprocess.run(TRAIN + args + ["--out", str(whole)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(TRAIN + args + ["--out", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().strip() >= "step-00000004":
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = latest_checkpoint(killed).name
    assert "step-00000004" <= at_kill < f"step-{steps:08d}"

    resumed = subprocess.run(TRAIN + args + ["--out", str(killed), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed / 'checkpoints' / at_kill}" in resumed.stdout
    assert losses(killed) == losses(whole)  # bitwise: the CSV holds float reprs
    a = load_trainer_state(latest_checkpoint(whole))
    b = load_trainer_state(latest_checkpoint(killed))
    assert a["loader"] == b["loader"] and a["step"] == b["step"] == steps
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    weights = [load_file(str(latest_checkpoint(run) / "model" / "diffusion_pytorch_model.safetensors"))
               for run in (whole, killed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _nan_dataset(root: Path, nan_clips: set[int], n: int = 4) -> Path:
    """Like loader_fixtures.make_dataset, with NaN latents in the clips ``nan_clips``."""
    from pipeline.shards import ShardWriter, build_index, write_index

    writer = ShardWriter(root, max_bytes=1 << 40)
    for clip in range(n):
        key = f"vid{clip:03d}_0000"
        members = loader_fixtures.sample_members(clip, 30, key, "full")
        if clip in nan_clips:
            latent = np.full((30, 4, loader_fixtures.HW, loader_fixtures.HW), np.nan, dtype=np.float16)
            members["latent.npy"] = npy_bytes(latent)
        writer.write(key, members)
    writer.close_current()
    write_index(root, build_index(writer.closed_shards, profile="full", name="nan", pipeline_version="test",
                                  members=["latent.npy", "audio.npy", "kps.npy", "motion.npy", "meta.json",
                                           "video.mp4"]))
    return root


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    data = _nan_dataset(tmp_path / "ds", nan_clips={1})
    summary = train(run_cfg(data, tmp_path / "run", stage=1, global_batch_size=1, max_steps=8))
    assert summary["skipped_steps"] == 2  # clip 1 comes once per epoch, 2 epochs of 4 steps
    model = LoopyModel.from_pretrained(str(latest_checkpoint(tmp_path / "run") / "model"), low_cpu_mem_usage=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_run_stops_with_last_good_checkpoint(tmp_path):
    good = make_dataset(tmp_path / "good", [4], frames=(20, 30))
    train(run_cfg(good, tmp_path / "run", stage=1, global_batch_size=1, max_steps=2, checkpoint_every=2))
    before = (latest_checkpoint(tmp_path / "run") / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    bad = _nan_dataset(tmp_path / "bad", nan_clips={0, 1, 2, 3})
    cfg = run_cfg(bad, tmp_path / "run2", stage=2, init=str(tmp_path / "run"), global_batch_size=1, max_steps=8,
                  max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "run2") is None  # nothing half-good was written
    after = (latest_checkpoint(tmp_path / "run") / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert before == after


def test_smoke_shards_refused_unless_allowed(tmp_path):
    smoke = make_dataset(tmp_path / "smoke", [2], frames=(20, 30), profile="smoke")
    p = subprocess.run(TRAIN + ["--data", str(smoke), "--stage", "1", "--out", str(tmp_path / "r"), "--max-steps",
                                "1", "--loader-workers", "0", "--no-progress"], capture_output=True, text=True)
    assert p.returncode == 2 and "smoke" in p.stderr and "allow" in p.stderr
    train(run_cfg(smoke, tmp_path / "r2", stage=1, max_steps=1, allow_smoke=True))


def test_feature_layout_mismatch_is_named(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "a", [2], frames=(20, 30))
    train(run_cfg(data, tmp_path / "s1", stage=1, max_steps=1))
    monkeypatch.setattr(loader_fixtures, "LAYERS", 5)  # a dataset made with another audio encoder
    other = make_dataset(tmp_path / "b", [2], frames=(20, 30))
    with pytest.raises(ValueError, match=r"audio features: data 5 layers x 4, model 3 x 4"):
        train(run_cfg(other, tmp_path / "s2", stage=2, init=str(tmp_path / "s1"), max_steps=1))


@pytest.mark.slow
def test_train_on_the_curation_jobs_own_output(tmp_path):
    """README flow: the demo curation output, stage 1 for 20 steps, then stage 2 from it."""
    out = tmp_path / "demo"
    cur = subprocess.run([sys.executable, str(ROOT / "jobs" / "curate.py"), "--demo", "--output", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert cur.returncode == 0, cur.stderr[-2000:]
    for stage, extra in ((1, []), (2, ["--init", str(tmp_path / "s1")])):
        p = subprocess.run(TRAIN + ["--data", str(out), "--stage", str(stage), "--preset", "tiny", "--max-steps", "20",
                                    "--allow-smoke", "--out", str(tmp_path / f"s{stage}"), "--no-progress"] + extra,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        assert len(losses(tmp_path / f"s{stage}")) == 20
        assert latest_checkpoint(tmp_path / f"s{stage}").name == "step-00000020"


def test_stage1_from_sd15_directory_loads_unet_and_clip_context(dataset, tmp_path):
    """--init with a diffusers SD 1.5-layout directory: the U-Net weights go into both U-Nets and
    CLIP's empty-prompt embedding becomes the text context (tiny stand-ins built locally)."""
    from diffusers import UNet2DConditionModel
    from test_weights import reference_empty_embedding, write_tiny_clip

    from model_files import register

    from loopy_model.presets import TINY_UNET

    sd_dir = tmp_path / "sd15"
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**TINY_UNET)
    unet.save_pretrained(sd_dir / "unet")
    register(sd_dir / "unet", root=sd_dir)  # downloaded SD 1.5 weights are registered once (fetch_models --register)
    write_tiny_clip(sd_dir)
    (sd_dir / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="empty-prompt embedding is \\[77, 16\\].*\\[4, 16\\]"):
        train(run_cfg(dataset, tmp_path / "bad", stage=1, max_steps=1, init=str(sd_dir)))
    train(run_cfg(dataset, tmp_path / "run", stage=1, max_steps=1, init=str(sd_dir), lr=1e-12,
                  model_overrides={"text_context_tokens": 77}))
    model = LoopyModel.from_pretrained(str(latest_checkpoint(tmp_path / "run") / "model"), low_cpu_mem_usage=False)
    torch.testing.assert_close(model.text_context.data, reference_empty_embedding(sd_dir)[1], atol=1e-6, rtol=0)
    for net in (model.reference_unet, model.denoising_unet):
        torch.testing.assert_close(net.conv_in.weight, unet.conv_in.weight, atol=1e-6, rtol=0)


def test_gradient_accumulation_equals_the_whole_batch(dataset, tmp_path):
    """4 clips per step as one batch or as 2 accumulated batches of 2: the same clips, noise and
    masks (per-sample seeding), so the same losses and weights up to float summation order."""
    whole = tmp_path / "whole"
    accum = tmp_path / "accum"
    common = dict(stage=2, global_batch_size=4, max_steps=3, lr=1e-3, checkpoint_every=3)
    train(run_cfg(dataset, whole, **common))
    train(run_cfg(dataset, accum, grad_accum=2, **common))
    a, b = (np.array([float(x) for x in losses(r)]) for r in (whole, accum))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    wa, wb = (load_file(str(latest_checkpoint(r) / "model" / "diffusion_pytorch_model.safetensors"))
              for r in (whole, accum))
    # Adam divides by sqrt(v): an element whose gradient is near 0 turns summation-order noise into
    # a visible step; with the schema 2.0 fixture (mean-only latents, no sampling noise) one element
    # of 205k differs by 1.4e-5 (1.4% of one lr step). A real accumulation bug moves many by ~lr.
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 2e-5
    state = load_trainer_state(latest_checkpoint(accum))["loader"]
    assert (state["epoch"], state["samples"]) == (1, 0)  # 3 steps x 4 clips = the 12-clip epoch
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        run_cfg(dataset, tmp_path / "bad", global_batch_size=3, grad_accum=2)


def test_gradient_accumulation_straddles_the_epoch_boundary(dataset, tmp_path):
    """12 clips = 6 loader batches of 2 per epoch, 4 per optimiser step: step 2 takes the last 2
    batches of epoch 0 and the first 2 of epoch 1, so 3 steps consume exactly 2 epochs."""
    train(run_cfg(dataset, tmp_path / "run", stage=1, global_batch_size=8, grad_accum=4, max_steps=3))
    state = load_trainer_state(latest_checkpoint(tmp_path / "run"))["loader"]
    assert (state["epoch"], state["samples"]) == (2, 0)
    assert len(losses(tmp_path / "run")) == 3
