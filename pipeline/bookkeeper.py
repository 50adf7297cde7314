"""The driver's bookkeeping: small records in, journal entries out (no Ray, no I/O of its own).

The curation stages end in the writer stage (pipeline/writer.py), which writes every kept clip
into a shard on its worker and passes on small records only. The driver feeds those records to a
``Bookkeeper``, which decides what the journal (pipeline/journal.py) publishes and when:

- ``summary`` (an input's candidate count), ``reject`` (an input or a candidate clip rejected),
  ``written`` (a kept clip: its key, and the shard it went to, or none when an earlier, killed run
  already published it): the per-input outcomes, as the stages emit them;
- ``shard``: a shard a writer closed, with its index entry, manifest and scores rows. It is
  journaled at once (which publishes it), whether or not the ``written`` records of its samples
  have arrived: records of different workers reach the driver in no fixed order;
- ``write error``: a writer could not write to the output (no space left): the run stops.

An input is journaled once all its candidates have an outcome and its kept clips are all in
journaled shards, so a killed run resumed counts every input exactly once. At the end of the
stream (``finish``), inputs without every outcome (their Ray task failed, or their clips were in
a shard a failed writer never closed) are journaled as "worker failed", retryable: the next run
redoes them, and their clips that are in a journaled shard stay kept.

The driver holds the inputs in flight only: an input's state lives from its first record until it
is journaled. Unit tests drive this class with synthetic records (tests/test_bookkeeper.py).
"""
from __future__ import annotations

import errno as errno_mod
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import schemas
from schemas import records
from .inputs import InputItem
from .shards import ShardInfo

# Kinds of the records the writer stage adds to the stages' ``summary`` and ``reject`` rows.
WRITTEN, SHARD, WRITE_ERROR = "written", "shard", "write error"


@dataclass
class _InFlight:
    item: InputItem
    n_candidates: int | None = None
    terminal: int = 0
    kept_keys: list[str] = field(default_factory=list)
    pending_keys: set[str] = field(default_factory=set)
    rejects: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)  # scores rows of rejected clips
    summary: dict | None = None
    video_reject: dict | None = None
    counted: bool = False

    @property
    def finished(self) -> bool:
        return self.video_reject is not None or (self.n_candidates is not None and self.terminal >= self.n_candidates)


# ---- the rows the journal holds (built on the workers for kept clips, here for inputs)

def _shard_meta(meta: dict) -> dict:
    """meta.json as written into the shard: its scores without the wide scores.parquet-only columns
    (schemas.SCORES_ONLY_COLUMNS, e.g. the 512-value identity embedding), and without the stage
    timings (wall seconds, different on every run: they go to run.json's stage_cpu_s), so the same
    input gives the same meta.json bytes."""
    out = {k: v for k, v in meta.items() if k != "timings"}
    if any(k in out.get("scores", {}) for k in schemas.SCORES_ONLY_COLUMNS):
        out["scores"] = {k: v for k, v in out["scores"].items() if k not in schemas.SCORES_ONLY_COLUMNS}
    return out


def _kept_scores_row(meta: dict, source: str, features: bool) -> dict:
    return records.kept_scores_row(meta, source=source, features_computed=features)


# Whether an outcome is retried by the next run (a crashed worker, a bug, a GPU out of memory, an
# HTTP 5xx) is said by the reject itself (schemas.records: ``retryable``); rows journaled before
# that field existed are judged by their reason, as those runs did.
_is_retryable = records.is_retryable


def _retryable(st: _InFlight) -> bool:
    rejects = ([st.video_reject] if st.video_reject else []) + st.rejects
    return any(_is_retryable(r) for r in rejects)


def _video_row(st: _InFlight) -> dict:
    probe = (st.summary or {}).get("probe") or {}
    if st.video_reject is not None:
        status, stage, reason = "rejected", st.video_reject["stage"], st.video_reject["reason"]
        duration = st.video_reject.get("duration_s")
    elif st.kept_keys:
        status, stage, reason = "kept", None, None
        duration = probe.get("duration_s")
    else:
        status, stage = "rejected", "clips"
        reasons = sorted({r["reason"] for r in st.rejects})
        reason = "all clips rejected: " + ", ".join(reasons)
        duration = probe.get("duration_s")
    return {"uri": st.item.uri, "video_id": st.item.video_id, "source": st.item.source, "status": status,
            "stage": stage, "reason": reason, "n_candidates": st.n_candidates or 0, "n_kept": len(st.kept_keys),
            "n_rejected_clips": len(st.rejects), "duration_s": duration,
            "timings": json.dumps((st.summary or {}).get("timings", {})),
            "coverage": _coverage_json(st)}


def _coverage_json(st: _InFlight) -> str | None:
    coverage = ((st.summary or {}).get("analysis") or {}).get("coverage")
    return None if coverage is None else json.dumps(coverage)


def _journal_entry(st: _InFlight) -> dict:
    return {"video": _video_row(st), "rejects": ([st.video_reject] if st.video_reject else []) + st.rejects,
            "scores": st.scores, "retryable": _retryable(st)}


def worker_failed_reject(item: InputItem, detail: str) -> dict:
    return records.input_reject(uri=item.uri, video_id=item.video_id, source=item.source, stage="ray",
                                reason="worker failed", retryable=True, detail=detail)


def _video_id_of(key: str) -> str:
    return key.rsplit("_", 1)[0]  # a key is "{video_id}_{clip:04d}"


class _NoProgress:
    done = rejected_inputs = rejected_clips = kept_clips = 0
    kept_seconds = 0.0

    def add_probed(self, duration_s) -> None:
        pass


class Bookkeeper:
    """Tracks the inputs in flight and journals shards and finished inputs.

    ``journal``: what it calls (``record_shard(info, manifest_rows, score_rows)``,
    ``record_videos(entries)``); ``todo``: the inputs of this run; ``committed_keys``: sample keys of
    those inputs an earlier run already published (they stay kept whatever this run's outcome).
    ``progress``: counters to update (pipeline.progress.CurateProgress), optional.
    ``after_shard(info)``: called once a shard is journaled (the kill fault injection point).
    ``discard_shard(url)``: called when a shard's journal entry could not be written, so that no
    unjournaled shard is left for the next run to find.
    """

    def __init__(self, journal, todo: Iterable[InputItem], committed_keys: set[str] = frozenset(), *,
                 progress=None, after_shard: Callable[[ShardInfo], None] | None = None,
                 discard_shard: Callable[[str], None] | None = None, flush_every: int = 64,
                 flush_after_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.journal = journal
        self.waiting = {it.uri: it for it in todo}  # no record received yet
        self.committed_keys = committed_keys
        self.progress = progress if progress is not None else _NoProgress()
        self.after_shard, self.discard_shard = after_shard, discard_shard
        self.flush_every, self.flush_after_s, self.clock = flush_every, flush_after_s, clock
        self.states: dict[str, _InFlight] = {}
        self._pending_owner: dict[str, str] = {}  # key written, its shard not journaled yet -> uri
        self._published_early: set[str] = set()  # key journaled before its ``written`` record came
        self._written_keys: set[str] = set()
        self._ready: list[dict] = []
        self._last_flush = clock()
        # run facts
        self.stage_seconds: dict[str, float] = {}
        self.nodes_used: set[str] = set()
        self.shards: list[ShardInfo] = []  # this run's journaled shards (index entries, no rows)
        self.worker_failed: list[str] = []  # uris journaled as "worker failed" by ``finish``

    # ---- records in
    def add(self, row: dict) -> None:
        """One record row (``uri``, ``kind``, ``clip_index``, ``payload``: JSON text)."""
        kind = row["kind"]
        payload = json.loads(row["payload"])
        if kind == SHARD:
            self.add_shard(payload)
            return
        if kind == WRITE_ERROR:
            raise write_error(payload)
        st = self.states.get(row["uri"])
        if st is None:
            if row["uri"] not in self.waiting:
                return  # journaled already
            st = self.states[row["uri"]] = _InFlight(self.waiting.pop(row["uri"]))
        progress = self.progress
        if kind == "reject" and row["clip_index"] < 0:
            st.video_reject = payload
            progress.rejected_inputs += 1
            progress.add_probed(payload.get("duration_s"))
        elif kind == "summary":
            st.summary = payload
            st.n_candidates = payload["n_candidates"]
            progress.add_probed(payload["probe"]["duration_s"])
            for k, v in payload.get("timings", {}).items():
                self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v
            self.nodes_used.update(n for n in payload.get("nodes", {}).values() if n)
        elif kind == "reject" and payload.get("key") in self.committed_keys:
            # Published by an earlier, killed run: the sample stays; this run's different
            # outcome (a transient failure) must not make it both kept and rejected.
            st.kept_keys.append(payload["key"])
            st.terminal += 1
        elif kind == "reject":
            scores_row = payload.pop("scores", None)
            if scores_row is not None:
                st.scores.append(scores_row)
            st.rejects.append(payload)
            st.terminal += 1
            progress.rejected_clips += 1
        elif kind == WRITTEN:
            self._add_written(st, payload, row["uri"])
        else:
            raise RuntimeError(f"unexpected row kind {kind!r} from the pipeline for {row['uri']}")
        if st.finished:
            if not st.counted:
                progress.done += 1
                st.counted = True
            self._finish_if_ready(st)
        self._flush()

    def _add_written(self, st: _InFlight, payload: dict, uri: str) -> None:
        key = payload["key"]
        for k, v in payload.get("timings", {}).items():  # the clip's own stages (features)
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v
        st.terminal += 1
        st.kept_keys.append(key)
        self.progress.kept_clips += 1
        self.progress.kept_seconds += payload["duration_s"]
        if key in self._written_keys:
            raise RuntimeError(f"sample key {key} produced twice in one run ({uri}): two inputs share a video id")
        self._written_keys.add(key)
        if payload.get("shard") is None:
            return  # published by an earlier run, not written again
        if key in self._published_early:
            self._published_early.discard(key)
        else:
            st.pending_keys.add(key)
            self._pending_owner[key] = st.item.uri

    def add_shard(self, record: dict) -> None:
        """A closed shard ({"shard": index entry, "manifest": rows, "scores": rows}): journal it, then
        finish the inputs that were waiting for it."""
        info = ShardInfo(**record["shard"])
        try:
            self.journal.record_shard(info, record["manifest"], record["scores"])
        except BaseException:
            # Its journal entry publishes a shard: one that could not be journaled (no space left)
            # is removed now rather than left for the next run to find as an orphan.
            if self.discard_shard is not None:
                self.discard_shard(info.url)
            raise
        self.shards.append(ShardInfo(**dict(record["shard"], keys=[])))  # the run's facts, not its keys
        for key in info.keys:
            uri = self._pending_owner.pop(key, None)
            st = self.states.get(uri) if uri is not None else None
            if st is None:
                self._published_early.add(key)
                continue
            st.pending_keys.discard(key)
            self._finish_if_ready(st)
        # Progress is durable at shard granularity: the inputs this shard finished (and any others
        # waiting) are journaled with it, so a run killed after a shard resumes after its inputs.
        self._flush(force=True)
        if self.after_shard is not None:
            self.after_shard(info)

    # ---- journal out
    def _finish_if_ready(self, st: _InFlight) -> None:
        if st.finished and not st.pending_keys and st.item.uri in self.states:
            self._ready.append(_journal_entry(st))
            del self.states[st.item.uri]

    def _flush(self, force: bool = False) -> None:
        if self._ready and (force or len(self._ready) >= self.flush_every
                            or self.clock() - self._last_flush > self.flush_after_s):
            self.journal.record_videos(self._ready)
            self._ready = []
            self._last_flush = self.clock()

    def flush(self) -> None:
        """Journal the finished inputs not journaled yet."""
        self._flush(force=True)

    def finish(self) -> None:
        """End of the stream (every writer closed and its tail shards added): inputs still without
        every outcome are journaled as "worker failed" (retryable), keeping their published clips."""
        self.flush()
        published_early: dict[str, list[str]] = {}
        for key in self._published_early:
            published_early.setdefault(_video_id_of(key), []).append(key)
        for item in list(self.waiting.values()):  # not one record of it came back
            self.states[item.uri] = _InFlight(item)
        self.waiting.clear()
        for st in list(self.states.values()):
            # Its Ray task failed after Ray's retries (a worker died: out of memory, a crash in a
            # native decoder), or its clips were in a shard a failed writer never closed.
            received = f"{st.terminal} of {st.n_candidates} candidate outcomes received"
            lost = len(st.pending_keys)
            detail = (f"{st.item.uri}: the Ray task processing this input failed ({received}"
                      + (f", {lost} kept clip(s) in a shard that was never closed" if lost else "")
                      + "); it is retried by the next run")
            st.video_reject = worker_failed_reject(st.item, detail)
            st.rejects, st.scores = [], []
            # Kept: clips published by an earlier run, or by this one (in a journaled shard).
            kept = [k for k in st.kept_keys if k in self.committed_keys or k not in st.pending_keys]
            kept += [k for k in published_early.pop(st.item.video_id, []) if k not in kept]
            st.kept_keys, st.pending_keys = kept, set()
            for key in list(self._pending_owner):
                if self._pending_owner[key] == st.item.uri:
                    del self._pending_owner[key]
            self.worker_failed.append(st.item.uri)
            self._finish_if_ready(st)
        self.flush()

    @property
    def in_flight(self) -> int:
        return len(self.states)


def write_error(payload: dict) -> OSError:
    """The OSError a ``write error`` record stands for (the driver raises it: the run stops)."""
    code = payload.get("errno")
    return OSError(code, payload["message"], payload.get("filename")) if code else OSError(payload["message"])


def write_error_payload(error: OSError, where: str) -> dict:
    """The ``write error`` record of a failed write to the output (the driver raises it again)."""
    return {"errno": error.errno, "message": f"{error.strerror or error} ({where})" if error.errno else str(error),
            "filename": error.filename or where,
            "no_space": error.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT)}
