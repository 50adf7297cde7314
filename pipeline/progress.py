"""Progress of a curation run: inputs and hours of video done of the total, with an ETA.

On a terminal it is a live bar (rich); otherwise (a log file, `ray job logs`, CI) it is one
``[curate] ...`` line every ``every_s`` seconds, the same facts in words. The total hours are
only known once every input is probed, so until then they are estimated from the mean duration
of the inputs probed so far ("~").
"""
from __future__ import annotations

import sys
import time


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class CurateProgress:
    def __init__(self, total: int, already: int, stream=None, every_s: float = 5.0, bar: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.started_with = total, already, already
        self.kept_clips = self.rejected_clips = self.rejected_inputs = 0
        self.kept_seconds = 0.0
        self.video_seconds = 0.0  # of the inputs probed by this run (rejected ones included)
        self.probed = 0
        self.start = time.monotonic()
        self.last = 0.0
        self.every_s = every_s
        use_bar = bar if bar is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = self._start_bar() if use_bar and total > already else None

    # -- what the runner reports
    def add_probed(self, duration_s: float | None) -> None:
        self.probed += 1
        self.video_seconds += duration_s or 0.0

    # -- derived figures
    @property
    def elapsed_s(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def eta_s(self) -> float | None:
        done_here = self.done - self.started_with
        if done_here <= 0:
            return None
        return (self.total - self.done) * self.elapsed_s / done_here

    def total_hours_estimate(self) -> tuple[float, bool]:
        """Hours of video of this run's inputs, and whether that is an estimate (not all probed)."""
        to_do = self.total - self.started_with
        if self.probed == 0:
            return 0.0, True
        if self.probed >= to_do:
            return self.video_seconds / 3600, False
        return self.video_seconds / self.probed * to_do / 3600, True

    def line(self) -> str:
        total_h, estimated = self.total_hours_estimate()
        rate = (self.done - self.started_with) / self.elapsed_s
        return (f"[curate] inputs {self.done}/{self.total} | video {self.video_seconds / 3600:.3f} h of "
                f"{'~' if estimated else ''}{total_h:.3f} h | clips kept {self.kept_clips} "
                f"({self.kept_seconds / 3600:.3f} h) rejected {self.rejected_clips} | inputs rejected "
                f"{self.rejected_inputs} | {rate * 60:.1f} inputs/min, {self.video_seconds / self.elapsed_s:.2f} s video/s"
                f" | {_hms(self.elapsed_s)} elapsed, ETA {_hms(self.eta_s())}")

    # -- output
    def tick(self, force: bool = False) -> None:
        if self._bar is not None:
            self._update_bar()
            return
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the bar (leaving its last state on screen) or print the last line."""
        if self._bar is not None:
            self._update_bar()
            self._bar.stop()
            self._bar = None
        else:
            self.tick(force=True)

    def _start_bar(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]curate"), BarColumn(), MofNCompleteColumn(), TextColumn("inputs"),
                       TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[facts]}"),
                       console=Console(file=self.stream), refresh_per_second=2, transient=False)
        self._task = bar.add_task("curate", total=self.total, completed=self.done, eta="?", facts="")
        bar.start()
        return bar

    def _update_bar(self) -> None:
        total_h, estimated = self.total_hours_estimate()
        facts = (f"video {self.video_seconds / 3600:.2f}/{'~' if estimated else ''}{total_h:.2f} h | kept "
                 f"{self.kept_clips} clips ({self.kept_seconds / 3600:.2f} h), rejected {self.rejected_clips} clips, "
                 f"{self.rejected_inputs} inputs")
        self._bar.update(self._task, completed=self.done, eta=_hms(self.eta_s()), facts=facts)
