"""The trainer under torchrun (2 gloo ranks) and Ray Train (2 CPU workers) computes what a single
process computes at the same global batch, and a run resumes elastically on another world size.

The loop draws every random number of a sample from (seed, epoch, global sample position) and
DDP averages gradients, so with a global batch of 4 (4 samples in one process, 2 on each of 2
ranks) the per-step loss (metrics.csv) and the final weights must agree up to float reduction
order. Single-process baselines are computed once per module and shared.

Every run is a real launch: ``jobs/train.py`` in a subprocess (plain or under
``python -m torch.distributed.run``), and Ray Train's ``TorchTrainer`` on a local Ray started by
this module with ``address="local"`` (never a cluster left running on the machine).
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loader_fixtures import make_dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "jobs" / "train.py"
STEPS = 4
GLOBAL_BATCH = 4
COMMON = ["--preset", "tiny", "--precision", "no", "--loader-workers", "0", "--no-progress",
          "--batch-size", str(GLOBAL_BATCH), "--checkpoint-every", "2"]
RUN_TIMEOUT_S = 300
# What a launcher may have left in our environment; each run must start its own world.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
             "TORCHELASTIC_USE_AGENT_STORE", "RAY_ADDRESS")


# ------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # 2 cores: no oversubscription by 2 ranks
    return env


def _run(cmd: list[str], log: Path) -> tuple[int, str]:
    """Run ``cmd`` in its own process group (so a hang is killed with all its ranks)."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
    return rc, log.read_text(errors="replace")


def _train_args(data: Path, out: Path, stage: int, steps: int, extra=()) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--stage", str(stage), "--max-steps", str(steps),
            *COMMON, *extra]


def run_single(data: Path, out: Path, stage: int, steps: int = STEPS, extra=()) -> str:
    rc, text = _run([sys.executable, str(TRAIN), *_train_args(data, out, stage, steps, extra)],
                    out.with_name(out.name + ".log"))
    assert rc == 0, f"single-process run failed (rc {rc}):\n{text[-4000:]}"
    return text


def run_torchrun(data: Path, out: Path, stage: int, steps: int = STEPS, extra=(), nproc: int = 2) -> str:
    """``torchrun --nproc-per-node nproc jobs/train.py ...`` on gloo; retried on a port taken meanwhile."""
    for attempt in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               str(TRAIN), *_train_args(data, out, stage, steps, extra)]
        rc, text = _run(cmd, out.with_name(f"{out.name}.torchrun{attempt}.log"))
        if rc == 0:
            return text
        if not re.search(r"address already in use|EADDRINUSE", text, re.I):
            break
        time.sleep(1)
    raise AssertionError(f"torchrun failed (rc {rc}):\n{text[-6000:]}")


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_curve(run: Path, reference: Path, rtol: float = 1e-4) -> None:
    got, want = read_metrics(run), read_metrics(reference)
    assert [int(r["step"]) for r in got] == list(range(1, STEPS + 1)), f"{run}: steps {[r['step'] for r in got]}"
    assert [int(r["step"]) for r in want] == list(range(1, STEPS + 1))
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for col in ("loss", "grad_norm"):
        np.testing.assert_allclose([float(r[col]) for r in got], [float(r[col]) for r in want], rtol=rtol,
                                   err_msg=f"{col} per step: {run} vs {reference}")
    assert all(int(r["skipped"]) == 0 for r in got)


def checkpoint(run: Path, step: int | None = None) -> Path:
    root = run / "checkpoints"
    name = (root / "latest").read_text().strip() if step is None else f"step-{step:08d}"
    return root / name


def model_weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model" / "diffusion_pytorch_model.safetensors"))


def trainer_state(ckpt: Path) -> dict:
    from loopy_model.train.checkpoint import load_trainer_state

    return load_trainer_state(ckpt)


def assert_same_weights(run: Path, reference: Path, atol: float = 1e-5) -> None:
    """Final weights allclose, and the difference tiny next to how far training moved them (with
    lr 1e-5 a step moves a weight ~1e-5, so atol alone would not tell a wrong update from none)."""
    import torch

    final = checkpoint(run)
    assert final.name == f"step-{STEPS:08d}", f"{run}: latest checkpoint is {final.name}"
    got, want = model_weights(final), model_weights(checkpoint(reference))
    before = model_weights(checkpoint(reference, 2))
    assert set(got) == set(want)
    worst = max(((got[k] - want[k]).abs().max().item(), k) for k in want)
    assert worst[0] <= atol, f"weights differ by up to {worst[0]:.3g} ({worst[1]}): {run} vs {reference}"
    diff = torch.cat([(got[k] - want[k]).abs().flatten() for k in want]).mean().item()
    moved = torch.cat([(want[k] - before[k]).abs().flatten() for k in want]).mean().item()
    assert moved > 0, "the reference run's weights did not change between steps 2 and 4"
    assert diff < 1e-2 * moved, f"mean |weight difference| {diff:.3g} vs mean |update| over 2 steps {moved:.3g}"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_dist")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    # 12 clips: 3 steps of 4 per epoch, so a 4-step run crosses an epoch boundary.
    return make_dataset(workdir / "data", [6, 6], frames=(20, 40))


@pytest.fixture(scope="module")
def baseline(dataset, workdir):
    """baseline(stage) -> the RUN_DIR of an uninterrupted single-process run (computed once)."""
    runs: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            out = workdir / f"single-stage{stage}"
            run_single(dataset, out, stage)
            runs[stage] = out
        return runs[stage]

    return get


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray with 2 CPUs for this module: an already initialised one (conftest's session
    ``ray_local``) is reused and left to its owner; otherwise one is started with
    ``address="local"`` (ignoring RAY_ADDRESS and any cluster a crashed test left behind) and shut
    down afterwards."""
    import ray

    owned = not ray.is_initialized()
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        if owned:
            ray.init(address="local", num_cpus=2, include_dashboard=False,
                     object_store_memory=400 * 1024 * 1024, log_to_driver=True)
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < 2:
            if time.monotonic() > deadline:
                pytest.fail(f"Ray has not 2 free CPUs for the 2 train workers: {ray.available_resources()}")
            time.sleep(1)
        yield ray
    finally:
        if owned:
            ray.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def _ray_config(dataset: Path, out: Path, stage: int = 1):
    from loopy_model.train import TrainConfig

    # The same settings as the CLI runs (COMMON): jobs/train.py's defaults otherwise.
    return TrainConfig(data=str(dataset), out=str(out), stage=stage, preset="tiny", max_steps=STEPS,
                       global_batch_size=GLOBAL_BATCH, mixed_precision="no", num_workers=0, progress=False,
                       checkpoint_every=2)


@pytest.fixture(scope="module")
def ray_stage1(ray_session, dataset, workdir):
    """(RUN_DIR, Result) of stage 1 on 2 Ray Train CPU workers (absolute data and out paths)."""
    from loopy_model.train.ray_launch import train_with_ray

    out = workdir / "ray-stage1"
    result = train_with_ray(_ray_config(dataset, out), num_workers=2, use_gpu=False)
    assert result.error is None, result.error
    return out, result


# ------------------------------------------------------------------------------------ tests
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_torchrun_two_ranks_match_single_process(stage, dataset, workdir, baseline):
    out = workdir / f"torchrun-stage{stage}"
    text = run_torchrun(dataset, out, stage)
    assert "resumed from" not in text
    assert trainer_state(checkpoint(out))["world_size"] == 2
    assert_same_curve(out, baseline(stage))
    assert_same_weights(out, baseline(stage))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_two_workers_match_single_process(ray_stage1, baseline):
    out, _ = ray_stage1
    assert trainer_state(checkpoint(out))["world_size"] == 2
    assert_same_curve(out, baseline(1))
    assert_same_weights(out, baseline(1))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_result_carries_the_run_summary(ray_stage1):
    _, result = ray_stage1
    assert isinstance(result.return_value, dict), result.return_value
    assert result.return_value["steps"] == STEPS


@pytest.mark.slow
def test_resume_on_two_ranks_continues_a_single_process_run(dataset, workdir, baseline):
    out = workdir / "elastic"
    run_single(dataset, out, stage=1, steps=2)
    assert checkpoint(out).name == "step-00000002"
    assert len(read_metrics(out)) == 2
    text = run_torchrun(dataset, out, stage=1, steps=STEPS, extra=["--resume"])
    assert re.search(r"resumed from \S+step-00000002 at step 2 \(world size 1 -> 2\)", text), text[-3000:]
    # step 2 was written by the 1-process run and kept; step 4 by the 2-rank continuation
    assert trainer_state(checkpoint(out, 2))["world_size"] == 1
    assert trainer_state(checkpoint(out))["world_size"] == 2
    assert_same_curve(out, baseline(1))
    assert_same_weights(out, baseline(1))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_with_a_relative_run_dir(ray_session, dataset, workdir, baseline, monkeypatch):
    from loopy_model.train.ray_launch import train_with_ray

    monkeypatch.chdir(workdir)
    shutil.rmtree(workdir / "ray-relative", ignore_errors=True)
    result = train_with_ray(_ray_config(dataset, Path("ray-relative")), num_workers=2, use_gpu=False)
    assert result.error is None, result.error
    assert_same_curve(workdir / "ray-relative", baseline(1))


@pytest.mark.slow
def test_torchrun_with_gradient_accumulation_matches_single_process(dataset, workdir, baseline):
    """2 ranks x 2 accumulated batches of 1 clip each (DDP no_sync on the first): the same steps
    as one process taking all 4 clips at once."""
    out = workdir / "torchrun-accum"
    run_torchrun(dataset, out, stage=1, extra=["--grad-accum", "2"])
    assert_same_curve(out, baseline(1))
    assert_same_weights(out, baseline(1))
