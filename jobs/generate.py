#!/usr/bin/env python
"""Audio-only talking-head generation with a trained Loopy model (paper 3.4): a portrait and a
speech track in, an mp4 (25 fps, H.264 + AAC, the input audio) out.

    python jobs/generate.py --model RUN_DIR_OR_CHECKPOINT --image portrait.png --audio speech.wav --out talk.mp4
    python jobs/generate.py --model RUN_DIR --batch requests.jsonl      # {"image":..,"audio":..,"out":..[,"seed":..]} per line

--profile/--model-dir name the feature models (VAE, wav2vec2, face detector) the training shards
were made with; the model loads once for all requests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="RUN_DIR, a checkpoint directory, or a model directory")
    ap.add_argument("--image", help="portrait (any image PIL reads)")
    ap.add_argument("--audio", help="speech (any file FFmpeg decodes)")
    ap.add_argument("--out", help="output mp4")
    ap.add_argument("--batch", help="JSONL of requests (image, audio, out, optional seed)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--audio-cfg", type=float, default=5.0)
    ap.add_argument("--ref-cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-crop", action="store_true", help="the image is already a square face crop")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    ap.add_argument("--profile", choices=("smoke", "full"), default="smoke")
    ap.add_argument("--model-dir", help="feature-model weights for --profile full")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--vae-tiling", action="store_true", help="decode frames in tiles (less memory)")
    ap.add_argument("--native-logs", action="store_true", help="keep native libraries' own stderr logging")
    ap.add_argument("--ray", action="store_true", help="with --batch: a Ray Data job over model actors (RAY_ADDRESS)")
    ap.add_argument("--actors", type=int, default=1, help="with --ray: actors, each holding the model")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    args = ap.parse_args(argv)
    if not args.batch and not (args.image and args.audio and args.out):
        ap.error("give --image, --audio and --out, or --batch")
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def requests(args) -> list[dict]:
    if not args.batch:
        return [{"image": args.image, "audio": args.audio, "out": args.out}]
    rows = []
    with open(args.batch) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.batch}:{n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{args.batch}:{n}: a request must be a JSON object, got {type(row).__name__}")
                missing = [k for k in ("image", "audio", "out") if k not in row]
                if missing:
                    raise ValueError(f"{args.batch}:{n}: request lacks {missing}")
                rows.append(row)
    return rows


def silence_native_stderr() -> None:
    """Native libraries (MediaPipe's TFLite/absl) log start-up lines on fd 2, some from their own
    threads at any time; send fd 2 to /dev/null and keep Python's sys.stderr (our error lines,
    tracebacks, progress bars) on a copy of the terminal."""
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.native_logs and argv is None:  # the command line, not a test calling main()
        silence_native_stderr()
        # mediapipe 0.10.14 on protobuf 4 warns about a deprecated protobuf API on every start
        warnings.filterwarnings("ignore", category=UserWarning, module="google.protobuf")
    from loopy_model.generate import GenerateConfig, GenerateError, Generator
    from loopy_model.sampling import GuidanceConfig

    cfg = GenerateConfig(profile=args.profile, model_dir=args.model_dir, seed=args.seed, crop=not args.no_crop,
                         use_ema=not args.no_ema, device=args.device, progress=not args.no_progress,
                         vae_tiling=args.vae_tiling,
                         guidance=GuidanceConfig(audio_cfg=args.audio_cfg, ref_cfg=args.ref_cfg, steps=args.steps))
    if args.ray:
        return render_on_ray(args, cfg)
    try:
        todo = requests(args)
        gen = Generator(args.model, cfg)
    except (GenerateError, ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for req in todo:
        try:
            result = gen.render(req["image"], req["audio"], req["out"], seed=req.get("seed"))
            print(json.dumps(result))
        except (GenerateError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def render_on_ray(args, cfg) -> int:
    from loopy_model.generate import GenerateError, render_with_ray, resolve_checkpoint

    try:
        todo = requests(args)
        resolve_checkpoint(args.model, cfg.use_ema)  # a bad checkpoint fails here, not in every actor
    except (GenerateError, ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for row in render_with_ray(args.model, cfg, todo, actors=args.actors, gpus_per_actor=args.gpus_per_actor):
        if row["error"]:
            print(f"error: {row['error']}", file=sys.stderr)
            failed += 1
        else:
            print(json.dumps({"out": row["out"], "frames": int(row["frames"])}))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
