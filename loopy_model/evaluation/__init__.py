"""Evaluation of generated (or any) talking-head videos with the curation pipeline's own scorers.

    from loopy_model.evaluation import EvalConfig, evaluate
    summary = evaluate(["generated/"], "eval/run1", EvalConfig(profile="full", model_dir="MODELS"),
                       compare="eval/ground_truth")

Modules: score (one video: normalise + the crop & score stage's observers, DWPose motion
variances), frechet (FID Inception / FVD I3D from local weights, running statistics, Fréchet
distance), run (inputs -> scores.parquet + summary.json, compare), report (report.html / .md).
Entry point: ``jobs/evaluate.py``; definitions and decisions: docs/evaluation.md.
"""
from .run import EVAL_SCHEMA, SCORE_LABELS, EvalRunError, compare_runs, evaluate, expand_inputs, load_eval
from .score import EvalConfig, EvalInputError, Scorer

__all__ = ["EVAL_SCHEMA", "SCORE_LABELS", "EvalConfig", "EvalInputError", "EvalRunError", "Scorer", "compare_runs",
           "evaluate", "expand_inputs", "load_eval"]
