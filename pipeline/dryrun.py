"""``jobs/curate.py --dry-run``: everything a run would check before its first input, and nothing else.

It expands and counts the inputs, reads the head of one input per source (storage access and
credentials), checks the weights the profile needs, and checks the output: that it can be
written, that its configuration matches the one it was started with, and that no other run holds
its lock. It starts no Ray and writes nothing into the output (an output directory that does not
exist yet is not created).
"""
from __future__ import annotations

import fcntl
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import CurateConfig
from .inputs import InputItem
from .journal import Journal, config_differences, config_fingerprint


@dataclass
class DryRunReport:
    inputs: int = 0
    inputs_by_source: dict[str, int] = field(default_factory=dict)
    already_finished: int = 0
    to_process: int = 0
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, ok, detail)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def check(self, what: str, ok: bool, detail: str) -> None:
        self.checks.append((what, ok, detail))

    def lines(self) -> list[str]:
        out = [f"inputs: {self.inputs} ({self.already_finished} already finished in the output, "
               f"{self.to_process} to process)"]
        out += [f"  {n:>8}  {src}" for src, n in sorted(self.inputs_by_source.items())]
        out += [f"{'ok  ' if ok else 'FAIL'}  {what}: {detail}" for what, ok, detail in self.checks]
        return out


def dry_run(items: list[InputItem], output: str | Path, config: CurateConfig, *, force_resume: bool = False,
            retry_failed: bool = True) -> DryRunReport:
    report = DryRunReport(inputs=len(items), inputs_by_source=dict(Counter(it.source for it in items)))
    _check_weights(config, report)
    _check_input_access(items, report)
    finished = _check_output(Path(output), config, report, force_resume, retry_failed) if _is_local(output) else set()
    if not _is_local(output):
        report.check("output", False, f"{output}: object-store output is not supported by this version; "
                                      "write to a local or shared-filesystem directory")
    report.already_finished = sum(1 for it in items if it.uri in finished)
    report.to_process = report.inputs - report.already_finished
    return report


def _is_local(output: str | Path) -> bool:
    return "://" not in str(output) or str(output).startswith("file://")


def _check_weights(config: CurateConfig, report: DryRunReport) -> None:
    from .runner import preflight, required_models

    needed = required_models(config)
    try:
        preflight(config)
    except FileNotFoundError as e:
        report.check("weights", False, str(e))
        return
    report.check("weights", True, ", ".join(needed) + f" in {config.model_dir}" if needed
                 else f"none needed (profile {config.profile}: models are built in memory)")


def _check_input_access(items: list[InputItem], report: DryRunReport) -> None:
    """Read the first KiB of the first input of each source: credentials, endpoints, permissions."""
    import fsspec

    first_of_source: dict[str, InputItem] = {}
    for it in items:
        first_of_source.setdefault(it.source, it)
    for source, it in sorted(first_of_source.items()):
        try:
            with fsspec.open(it.uri, "rb") as f:
                n = len(f.read(1024))
            report.check(f"read access ({source})", True, f"read {n} bytes of {it.uri}")
        except Exception as e:  # noqa: BLE001 - any failure to read is what this check reports
            report.check(f"read access ({source})", False, f"{it.uri}: {type(e).__name__}: {e}")


def _held_by_another_run(lock: Path) -> bool:
    """Whether a run holds the journal's lock (the same flock Journal.lock takes), without creating it."""
    if not lock.exists():
        return False
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_output(out: Path, config: CurateConfig, report: DryRunReport, force_resume: bool,
                  retry_failed: bool) -> set[str]:
    if out.exists() and not out.is_dir():
        report.check("output", False, f"{out} exists and is not a directory")
        return set()
    probe_dir = out if out.is_dir() else _nearest_existing(out)
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".dry-run-"):
            pass
        report.check("output writable", True, f"{out}" + ("" if out.is_dir() else f" (would be created in {probe_dir})"))
    except OSError as e:
        report.check("output writable", False, f"{probe_dir}: {e.strerror or e}")
    if not (out / "_journal").is_dir():
        report.check("output lock", True, f"{out}: a new output")
        return set()
    journal = Journal(out)
    lock = journal.dir / "lock"
    if _held_by_another_run(lock):
        report.check("output lock", False, f"{out} is being written by another run (lock {lock})")
    else:
        report.check("output lock", True, f"{lock} is free")
    cfg_dict = config.model_dump(mode="json")
    recorded = journal.dir / "config.json"
    if recorded.exists() and not force_resume:
        import json

        old = json.loads(recorded.read_text())
        changed = ([] if old["fingerprint"] == config_fingerprint(cfg_dict) else
                   config_differences(old.get("config", {}), cfg_dict, type(config)().model_dump(mode="json")))
        report.check("configuration", not changed,
                     "matches the output's" if not changed else
                     f"differs from the one {out} was written with (in {', '.join(changed[:12])}); "
                     "use a new output directory, or --force-resume to mix them")
    return {uri for uri, retryable in journal.finished().items() if not (retry_failed and retryable)}
