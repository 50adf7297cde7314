#!/usr/bin/env python
"""Train Loopy on curated shards: stage 1 (ReferenceNet + denoiser on single frames), then stage 2
(temporal, audio and audio-to-latents modules, 12 target + 20 motion latents).

    python jobs/train.py --data DIR_OR_URI --stage 1 --preset tiny --out RUN1 --max-steps 20 --allow-smoke
    python jobs/train.py --data DIR_OR_URI --stage 2 --preset tiny --out RUN2 --init RUN1 ...
    torchrun --nproc-per-node 8 jobs/train.py ...          # the same script, DDP
    python jobs/train.py --ray --num-workers 16 ...        # Ray Train on the cluster (RAY_ADDRESS)

--init: a stage-1 RUN_DIR/checkpoint for stage 2, or SD 1.5 weights (a diffusers directory or a
single-file checkpoint) for stage 1. --resume continues RUN_DIR from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# MKL's results may depend on memory alignment, which differs between a continuing and a resumed
# process; its conditional-numerical-reproducibility mode makes CPU resumes bitwise exact (measured:
# without it, weights differ by ~1 ulp two steps after a resume). Set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="curated dataset (the directory or URI holding index.json)")
    ap.add_argument("--out", required=True, help="RUN_DIR: checkpoints, metrics.csv, tensorboard/")
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True)
    ap.add_argument("--preset", default="tiny", help="model preset: tiny | paper")
    ap.add_argument("--init", help="stage-1 run/checkpoint (stage 2) or SD 1.5 weights")
    ap.add_argument("--where", help='select clips by stored scores, e.g. "sync_conf >= 5"')
    ap.add_argument("--split", help='identity-disjoint side to train on, e.g. "train:0.02" (2%% of identities '
                    'held out; needs identities.parquet)')
    ap.add_argument("--balance", choices=("identity",), help="draw identities equally often (needs identities.parquet)")
    ap.add_argument("--balance-temperature", type=float,
                    help="with --balance identity: p(identity) ∝ clips^(1/T); 1 = natural, default uniform")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=0, help="global batch (clips per step); 0 = 1 per process")
    ap.add_argument("--grad-accum", type=int, default=1, help="loader batches per optimiser step")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--lr-schedule", default="constant")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--precision", choices=("bf16", "no"), default="bf16")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--ema-decay", type=float)
    ap.add_argument("--trainable", help="comma-separated parameter groups (default: the paper's for the stage)")
    ap.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    ap.add_argument("--zero-terminal-snr", action="store_true")
    ap.add_argument("--min-snr-gamma", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loader-workers", type=int, default=2, help="data loader worker processes per training process")
    ap.add_argument("--cache-dir", help="local shard cache for remote datasets")
    ap.add_argument("--verify-shards", action="store_true",
                    help="check each shard's sha256 against index.json before use (once per process); "
                         "a mismatching shard is skipped and counted like a corrupt one")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--keep-checkpoints", type=int, default=3)
    ap.add_argument("--max-nonfinite-steps", type=int, default=10)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--allow-smoke", action="store_true", help="train on smoke-profile shards (tiny random feature models)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--ray", action="store_true", help="run as a Ray Train TorchTrainer")
    ap.add_argument("--num-workers", type=int, default=1, help="with --ray: Ray Train workers (processes)")
    ap.add_argument("--use-gpu", action="store_true", help="with --ray: one GPU per worker")
    return ap.parse_args(argv)


def config_from_args(args):
    from loopy_model.train import TrainConfig

    return TrainConfig(
        data=args.data, out=args.out, stage=args.stage, preset=args.preset, init=args.init, where=args.where,
        split=args.split, balance=args.balance, balance_temperature=args.balance_temperature,
        allow_smoke=args.allow_smoke, resume=args.resume, max_steps=args.max_steps,
        global_batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed, lr=args.lr,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, grad_clip=args.grad_clip, mixed_precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, ema_decay=args.ema_decay,
        max_nonfinite_steps=args.max_nonfinite_steps,
        trainable=tuple(args.trainable.split(",")) if args.trainable else None,
        prediction_type=args.prediction_type, zero_terminal_snr=args.zero_terminal_snr,
        min_snr_gamma=args.min_snr_gamma,
        num_workers=args.loader_workers,
        cache_dir=args.cache_dir, verify_shards=args.verify_shards, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        progress=not args.no_progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.ray:
            from loopy_model.train.ray_launch import train_with_ray

            result = train_with_ray(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu)
            print(json.dumps({"ray_result": result.return_value}, default=str))
            return 0
        from loopy_model.train import train

        train(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
