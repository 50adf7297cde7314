"""Run metrics: RUN_DIR/metrics.csv (one row per logged step), TensorBoard under
RUN_DIR/tensorboard/, and a progress bar with ETA. Rank 0 writes; a resumed run appends, after
dropping rows past the step it resumes from (they belonged to the interrupted run's lost tail)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "skipped", "step_time_s", "data_wait_frac",
           "samples_per_s", "gpu_mem_gb",
           # the loader's unreadable shards so far (rank 0's view; StreamingLoader.fault_stats)
           "skipped_shards", "skipped_missing", "skipped_corrupt", "skipped_unavailable", "stand_in_clips")


class MetricsWriter:
    def __init__(self, run_dir: str | Path, start_step: int, max_steps: int, bucket_names: list[str],
                 enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.columns = list(COLUMNS) + [f"loss_{b}" for b in bucket_names]
        self.bar = None
        if not enabled:
            return
        path = Path(run_dir) / "metrics.csv"
        rows = []
        if path.exists():  # keep the rows this run's resume point already covers
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.file = open(path, "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        self.csv.writeheader()
        self.csv.writerows(rows)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is a dependency; a stripped image still trains
            log.warning("tensorboard is not installed: metrics go to metrics.csv only")
            self.tb = None
        if progress:
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.csv.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and v == v and v is not None:  # skip NaN
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", wait=f"{row['data_wait_frac']:.0%}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
