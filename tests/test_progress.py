"""Curation progress: inputs and hours done of the total with an ETA, as lines or as a live bar."""
from __future__ import annotations

import io
import re

from pipeline.progress import CurateProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _advance(p: CurateProgress, durations, clock, monkeypatch, step_s=10.0):
    for d in durations:
        clock[0] += step_s
        p.add_probed(d)
        p.done += 1
        p.tick()


def test_lines_give_hours_of_total_and_an_eta(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    p = CurateProgress(total=10, already=2, stream=out, every_s=0.0)  # 2 finished by an earlier run
    _advance(p, [360.0, 360.0], clock, monkeypatch)
    last = out.getvalue().strip().splitlines()[-1]
    # 2 of the 8 to do probed, 0.1 h each: ~0.8 h in all; 20 s for 2 inputs, 6 left: 60 s
    assert "inputs 4/10" in last and "video 0.200 h of ~0.800 h" in last, last
    assert "0:20 elapsed, ETA 1:00" in last, last
    _advance(p, [360.0] * 6, clock, monkeypatch)
    p.close()
    last = out.getvalue().strip().splitlines()[-1]
    assert "inputs 10/10" in last and "video 0.800 h of 0.800 h" in last and "ETA 0:00" in last, last


def test_a_terminal_gets_a_live_bar(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: clock[0])
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes the bar to the terminal
    out = _Terminal()
    p = CurateProgress(total=4, already=0, stream=out)
    _advance(p, [30.0, 90.0], clock, monkeypatch)
    p.kept_clips, p.kept_seconds = 3, 60.0
    p.close()
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "2/4" in screen and "━" in screen, screen  # rich's bar
    assert "ETA 0:20" in screen and "video 0.03/~0.07 h" in screen and "kept 3 clips" in screen, screen
    assert "[curate] inputs" not in screen  # no periodic lines under a bar


def test_no_bar_when_nothing_is_left_to_do():
    out = _Terminal()
    p = CurateProgress(total=3, already=3, stream=out)
    p.close()
    assert "[curate] inputs 3/3" in out.getvalue()
