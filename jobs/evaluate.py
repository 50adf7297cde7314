#!/usr/bin/env python
"""Score generated (or any) talking-head videos with the curation pipeline's own scorers.

    python jobs/evaluate.py VIDEO_OR_DIR... --out EVAL_DIR [--profile smoke|full] [--model-dir MODELS]
        [--crop frame|face] [--compare OTHER_EVAL_DIR] [--syncnet-weights FILE]
        [--fid-weights FILE] [--fvd-weights FILE] [--reference EVAL_DIR_OR_NPZ]

Writes EVAL_DIR/scores.parquet (one row per video: Sync-C/D and offset, speech, mouth, pose,
head movement, face size, completeness, Loopy Glo/Exp motion variances, model ids), summary.json,
report.html and report.md, and fid_stats.npz / fvd_stats.npz when the weights are given.
Videos of any size and frame rate are normalised as the curation job normalises clips (512x512,
25 fps, 16 kHz mono). Exit code 2 when no input could be scored (one error line per input);
an input that fails among good ones is an error row (--strict: exit 2 as well). See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir
os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ start-up chatter
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="VIDEO_OR_DIR", help="video files and/or directories of videos")
    ap.add_argument("--out", required=True, metavar="EVAL_DIR", help="output directory")
    ap.add_argument("--profile", choices=["smoke", "full"], default="smoke",
                    help="model profile: smoke = CPU models without weights (random SyncNet/DWPose), "
                         "full = published weights from --model-dir")
    ap.add_argument("--model-dir", default=None, help="weights directory of the full profile (jobs/fetch_models.py)")
    ap.add_argument("--crop", choices=["frame", "face"], default="frame",
                    help="frame: the centred square of each frame (generated videos); face: the curation job's "
                         "detect & track + segment crop, longest clip (raw footage)")
    ap.add_argument("--compare", default=None, metavar="OTHER_EVAL_DIR", help="an earlier eval dir to put side by side")
    ap.add_argument("--syncnet-weights", default=None, metavar="FILE",
                    help="a SyncNet state dict (syncnet_v2.model layout) instead of the profile's")
    ap.add_argument("--fid-weights", default=None, metavar="FILE",
                    help="pytorch-fid pt_inception-2015-12-05-*.pth (or torchvision inception_v3_google-*.pth)")
    ap.add_argument("--fvd-weights", default=None, metavar="FILE", help="StyleGAN-V i3d_torchscript.pt")
    ap.add_argument("--reference", default=None, metavar="EVAL_DIR_OR_NPZ",
                    help="FID/FVD reference: an eval dir of real videos run with the same weights "
                         "(or a pytorch-fid stats .npz for FID)")
    ap.add_argument("--fid-stride", type=int, default=1, metavar="N", help="every N-th 25 fps frame enters FID")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    ap.add_argument("--name", default=None, help="run name in the report (default: the EVAL_DIR name)")
    ap.add_argument("--strict", action="store_true", help="exit 2 when any input could not be scored")
    ap.add_argument("--quiet", action="store_true", help="no per-video progress lines")
    return ap.parse_args(argv)


def _say(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.profile == "full" and not args.model_dir:
        print("error: the full profile needs --model-dir (see jobs/fetch_models.py)", file=sys.stderr)
        return 2
    if args.fid_stride < 1:
        print(f"error: --fid-stride must be >= 1, got {args.fid_stride}", file=sys.stderr)
        return 2
    for flag in ("syncnet_weights", "fid_weights", "fvd_weights", "model_dir", "reference"):
        value = getattr(args, flag)
        if value and not Path(value).exists():
            print(f"error: --{flag.replace('_', '-')} {value}: not found", file=sys.stderr)
            return 2
    try:
        from loopy_model.evaluation import EvalConfig, EvalInputError, EvalRunError, evaluate
        from loopy_model.evaluation.run import error_line
        from pipeline.config import ConfigError

        cfg = EvalConfig(profile=args.profile, model_dir=args.model_dir, crop=args.crop,
                         syncnet_weights=args.syncnet_weights, fid_weights=args.fid_weights,
                         fvd_weights=args.fvd_weights, reference=args.reference, fid_stride=args.fid_stride,
                         device=args.device)
        summary = evaluate(args.inputs, args.out, cfg, compare=args.compare, name=args.name,
                           log=None if args.quiet else _say)
    except EvalRunError as e:
        for line in ([error_line(r) for r in e.rows] if len(e.rows) > 1 else [str(e)]):
            print(f"error: {line}", file=sys.stderr)
        return 2
    except (EvalInputError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        print(f"error: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    v = summary["videos"]
    for err in v["error_list"]:
        print(f"error: {err['path']}: {err['error']}" + (f" ({err['detail']})" if err["detail"] else ""),
              file=sys.stderr)
    sc = summary["scores"]
    _say(f"{v['scored']} of {v['inputs']} videos scored in {summary['seconds']:.1f} s; Sync-C mean "
         f"{_f(sc['sync_conf']['mean'])}, Sync-D mean {_f(sc['sync_dist']['mean'])}, FID {_f(summary['fid']['value'])}, "
         f"FVD {_f(summary['fvd']['value'])}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 2 if (args.strict and v["errors"]) else 0


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
