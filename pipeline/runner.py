"""The curation driver: Ray Data stages in, shards + tables + run facts out.

The driver builds the Ray Data pipeline from the stage list, streams its output rows
(``iter_rows``: execution is streaming, nothing waits for a full stage) and is the single
writer of shards and journal, which makes exactly-once accounting simple: a row is an
outcome, and the driver decides when an input is finished.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from . import __version__
from .config import CurateConfig
from .filters import rule_table
from .inputs import InputItem
from .journal import Journal, config_fingerprint
from .progress import CurateProgress
from .shards import AtomicParquetWriter
from .shards import ShardInfo, ShardWriter, atomic_write_bytes, atomic_write_json, build_index, remove_stale_temp_files, write_index
from .stages import SAMPLE_MEMBERS, default_stages, new_row


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


def required_models(config: CurateConfig) -> list[str]:
    """Registry names of the weights a run needs (the smoke profile builds its models in memory)."""
    if config.profile == "smoke":
        return []
    names = ["syncnet", "landmarks3d"]
    if config.detector_backend == "scrfd":
        names.append("scrfd")
    if config.score.identity:
        names.append("arcface")
    if config.features.enabled:
        names += ["sd-vae", "wav2vec2", "dwpose"]
    return names


def required_model_files(config: CurateConfig) -> list[tuple[str, str]]:
    """(registry name, path relative to model_dir) of every weights file the run's loaders open:
    the configured file names (``score.syncnet_model``, ``detect.scrfd_model``, ...), insightface's
    ``buffalo_l/`` layout where the loaders would take it, the single-file VAE when that is used."""
    from .models.registry import FULL_MODELS

    root = Path(config.model_dir or "")
    configured = {"syncnet": config.score.syncnet_model, "landmarks3d": config.score.landmarks3d_model,
                  "scrfd": config.detect.scrfd_model, "arcface": config.score.arcface_model}
    files = []
    for name in required_models(config):
        if name in configured:
            rel = configured[name]
            if name != "syncnet" and not (root / rel).is_file() and (root / "buffalo_l" / rel).is_file():
                rel = f"buffalo_l/{rel}"  # insightface_model_path takes this layout too
            files.append((name, rel))
        elif name == "sd-vae" and config.features.vae_model != "sd-vae":
            vae = root / config.features.vae_model  # one's own VAE: a diffusers directory or one file
            files += ([(name, p.relative_to(root).as_posix()) for p in sorted(vae.rglob("*")) if p.is_file()
                       and p.name != "models.lock.json"] if vae.is_dir() else [(name, config.features.vae_model)])
        elif name == "sd-vae" and (root / "sd-vae.safetensors").is_file() and not (root / "sd-vae").is_dir():
            files.append((name, "sd-vae.safetensors"))  # load_vae's single-file form
        else:
            files += [(name, f.path) for f in FULL_MODELS[name].files]
    return files


def preflight(config: CurateConfig) -> None:
    """Fail before any work (and before Ray starts) when a needed weights file is missing, or is not
    the file its recorded sha256 says (``verified_file``: changed, swapped, never fetched or registered).

    Checked on the driver; on a cluster the model directory must be the same path on every node
    (a shared volume), which the workers check again when they load.
    """
    from .models.registry import UntrustedModelFile, require_file, verified_file

    missing, untrusted = [], []
    for name, rel in required_model_files(config):
        try:
            verified_file(require_file(config.model_dir, rel, name), f"{name} model file")
        except FileNotFoundError as e:
            missing.append(str(e))
        except UntrustedModelFile as e:
            untrusted.append(str(e))
    if missing:
        raise FileNotFoundError("the full profile cannot start:\n  " + "\n  ".join(missing + untrusted))
    if untrusted:
        raise UntrustedModelFile("the full profile cannot start:\n  " + "\n  ".join(untrusted))
    if config.score.learned_iqa:  # optional learned quality model: a local file, never downloaded
        iqa = Path(config.model_dir or "") / config.score.learned_iqa_model
        if not config.model_dir or not iqa.is_file():
            raise FileNotFoundError(f"score.learned_iqa is on but its weights are not at {iqa} "
                                    "(copy pyiqa's file there; the pipeline never downloads)")
        verified_file(iqa, "learned quality model weights file")


def require_ray() -> None:
    """The library takes a Ray that is up: the entry point starts or joins it (jobs/_ray.py)."""
    import ray

    if not ray.is_initialized():
        # Ray would otherwise start a default local instance (every core, a dashboard) behind the caller's back
        raise RuntimeError("Ray is not running: the entry point starts or joins it before run_curation "
                           "(jobs/_ray.py start_ray, or ray.init())")


def build_dataset(items: list[InputItem], config: CurateConfig):
    import ray
    from ray.data import ActorPoolStrategy

    rows = [new_row(it.video_id, it.uri, it.source, "video", {}) for it in items]
    # One input per block (a failed block loses one input), up to a block count the driver's
    # bookkeeping handles comfortably; beyond it a few inputs share a block.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 200_000)))
    # This dataset's own context (the stages below share it), not the process-wide DataContext:
    # the caller's Ray Data settings stay as they were.
    ctx = ds.context
    ctx.execution_options.preserve_order = False
    # A block whose task fails after Ray's retries (a worker killed by a poison input) is skipped
    # instead of failing the job; its inputs become "worker failed" rejects (run_curation).
    ctx.max_errored_blocks = -1
    for spec in default_stages(config):
        cls = spec["cls"]
        method = getattr(ds, spec["kind"])
        kwargs = {"num_cpus": spec.get("num_cpus", config.ray.cpus_per_task)}
        if spec.get("num_gpus"):
            kwargs["num_gpus"] = spec["num_gpus"]
        if spec["kind"] == "map_batches":
            kwargs["batch_size"] = spec["batch_size"]
            kwargs["batch_format"] = "numpy"
        if spec["actor"]:
            # One task in flight per CPU actor: a poison input that kills its actor then takes no
            # other input down with it (GPU feature actors keep a queue to stay busy).
            in_flight = None if spec.get("num_gpus") else 1
            kwargs["compute"] = ActorPoolStrategy(min_size=1, max_size=spec["pool"],
                                                  max_tasks_in_flight_per_actor=in_flight)
            # Ray Data's actor default is to restart and retry forever; a poison input must end, so its
            # task is retried a bounded number of times (a lost node fails a task twice: its socket
            # closes, then its old address refuses). The actor itself is always restarted: a pool whose
            # actor ran out of restarts is never replaced, and the job would wait for it forever.
            kwargs["max_restarts"] = -1
            kwargs["max_task_retries"] = 2
            kwargs["fn_constructor_args"] = (config,)
            with warnings.catch_warnings():
                # Ray 2.60 warns that extra remote args go away in 2.64 but has no named parameter for
                # max_restarts / max_task_retries yet; revisit with the next Ray pin (pyproject.toml).
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                ds = method(cls, **kwargs)
        else:
            ds = method(cls(config), **kwargs)
    return ds


def ray_rows(items: list[InputItem], config: CurateConfig):
    """The pipeline's rows for ``items``, from consecutive datasets of ``ray.inputs_per_dataset`` inputs.

    Each dataset is drained before the next is built, so Ray Data's driver-side state (the blocks
    from_items makes up front, operator and task state) exists for one dataset's inputs at a time
    instead of growing with the run; each block still holds one input.
    """
    require_ray()
    size = config.ray.inputs_per_dataset
    for start in range(0, len(items), size):
        ds = build_dataset(items[start:start + size], config)
        yield from ds.iter_rows()
        del ds


def _manifest_row(meta: dict, shard_url: str, sample_bytes: int) -> dict:
    c, cr = meta["clip"], meta["crop"]
    return {"key": meta["key"], "video_id": meta["video_id"], "clip_index": meta["clip_index"],
            "uri": meta["source"]["uri"], "source": meta["source"].get("source"), "shard": shard_url,
            "start_s": c["start_s"], "end_s": c["end_s"], "duration_s": c["n_frames"] / c["fps"],
            "n_frames": c["n_frames"], "track_id": c["track_id"], "crop_x0": cr["x0"], "crop_y0": cr["y0"],
            "crop_size": cr["size"], "face_size_px": cr["face_size_px"], "sample_bytes": sample_bytes,
            "profile": meta["profile"]}


def _shard_meta(meta: dict) -> dict:
    """meta.json as written into the shard: its scores without the wide scores.parquet-only columns
    (schemas.SCORES_ONLY_COLUMNS, e.g. the 512-value identity embedding)."""
    if not any(k in meta.get("scores", {}) for k in schemas.SCORES_ONLY_COLUMNS):
        return meta
    scores = {k: v for k, v in meta["scores"].items() if k not in schemas.SCORES_ONLY_COLUMNS}
    return dict(meta, scores=scores)


_SCORES_COLUMNS = frozenset(schemas.SCORES_SCHEMA.names)  # (Schema.names builds a new list per call)


def _kept_scores_row(meta: dict, source: str, features: bool) -> dict:
    sc = {k: v for k, v in meta.get("scores", {}).items() if k in _SCORES_COLUMNS}
    return dict(sc, key=meta["key"], video_id=meta["video_id"], clip_index=meta["clip_index"],
                uri=meta["source"]["uri"], source=source, track_id=meta["clip"]["track_id"],
                start_s=meta["clip"]["start_s"], duration_s=meta["clip"]["n_frames"] / meta["clip"]["fps"],
                status="kept", reject_stage=None, reject_reason=None, features_computed=features)


_shards_journaled_this_process = 0


def _fault_kill_after_shard() -> None:
    """SIGKILL this job's process group (the driver and its embedded Ray) once
    $CURATE_FAULT_KILL_AFTER_SHARDS shards are journaled: a kill mid-run at a known point, for the
    tests of kill-and-resume (tests/test_faults.py). Unset in production."""
    global _shards_journaled_this_process
    _shards_journaled_this_process += 1
    limit = os.environ.get("CURATE_FAULT_KILL_AFTER_SHARDS")
    if limit and _shards_journaled_this_process >= int(limit):
        os.killpg(os.getpgrp(), signal.SIGKILL)


class OutputFullError(RuntimeError):
    """The output filesystem ran out of space (or quota): the run stopped, nothing partial was published."""


# Outcomes that say more about the machine than about the video (a crashed worker, a bug, a
# GPU out of memory): journaled, but retried by the next run instead of counted as final.
# A server error (HTTP 5xx) is retried too: the server, not the file, failed. "timed out" is final
# (docs/pipeline.md, "Time limits"): a file that hangs a decoder hangs it again.
RETRYABLE_REASONS = ("internal error", "worker failed")


def _is_retryable(reject: dict) -> bool:
    reason = reject.get("reason") or ""
    return reason in RETRYABLE_REASONS or reason.startswith("HTTP 5") or reject.get("stage") == "features"


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




def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    table = schemas.conform_table(rows, schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _write_tables(out: Path, journal: Journal) -> tuple[dict, list[ShardInfo]]:
    """manifest, rejects, videos and scores.parquet, streamed from the journal (shards in url order,
    then inputs); returns the counts of the run summary and the shards of the index."""
    sinks = {name: AtomicParquetWriter(out / f"{name}.parquet", schemas.TABLE_SCHEMAS[f"{name}.parquet"])
             for name in ("manifest", "rejects", "videos", "scores")}
    counts = {"inputs": 0, "inputs_kept": 0, "clips_kept": 0, "clips_rejected": 0, "kept_s": 0.0, "input_s": 0.0,
              "rejected_by_reason": {}}
    shard_infos = []
    try:
        for e in journal.iter_shards():
            shard_infos.append(ShardInfo(**e["shard"]))
            sinks["manifest"].add(e["manifest"])
            sinks["scores"].add(e.get("scores", []))
            counts["clips_kept"] += len(e["manifest"])
            for r in e["manifest"]:
                counts["kept_s"] += r["duration_s"]
        for v in journal.iter_videos():
            sinks["videos"].add([v["video"]])
            sinks["rejects"].add(v["rejects"])
            sinks["scores"].add(v.get("scores", []))
            counts["inputs"] += 1
            counts["inputs_kept"] += v["video"]["status"] == "kept"
            if v["video"]["status"] != "kept":
                reasons = counts["rejected_by_reason"]
                reasons[v["video"]["reason"]] = reasons.get(v["video"]["reason"], 0) + 1
            counts["clips_rejected"] += sum(1 for r in v["rejects"] if r["clip_index"] >= 0)
            counts["input_s"] += v["video"]["duration_s"] or 0
        for sink in sinks.values():
            sink.close()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    return counts, shard_infos


def run_curation(items: list[InputItem], output: str | Path, config: CurateConfig, *, force_resume: bool = False,
                 progress_every_s: float = 5.0, argv: list[str] | None = None, retry_failed: bool = True,
                 input_stats: dict | None = None, verbose: bool = False, row_source=None) -> dict:
    """Curate ``items`` into ``output`` (a local or shared-filesystem directory).

    ``retry_failed``: inputs whose outcome was a crash, an internal error or a feature failure
    in an earlier run are processed again (their journal entry is replaced).
    ``input_stats``: what ``expand_inputs`` folded away (duplicates, blank list entries), for the summary.
    ``row_source``: ``f(todo) -> iterable of rows`` standing in for the Ray Data pipeline (the rows
    its stages emit): tests and benchmarks/bookkeeping.py drive the driver's bookkeeping with it.
    """
    if "://" in str(output) and not str(output).startswith("file://"):
        raise ValueError(f"--output {output}: write to a local or shared-filesystem directory (object-store "
                         "output is not supported yet; sync the finished directory, index.json last)")
    t_start = time.time()
    preflight(config)
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        journal = Journal(out)
        with journal.lock():
            return _run_locked(items, out, journal, config, t_start, force_resume, progress_every_s, argv,
                               retry_failed, input_stats or {}, verbose, row_source)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" ({e.filename})" if e.filename else ""
        raise OutputFullError(
            f"no space left on device writing the output {out}{where}: the run stopped and nothing partial was "
            "published; free space and run the same command again to resume") from e


def _run_locked(items, out: Path, journal: Journal, config: CurateConfig, t_start: float, force_resume: bool,
                progress_every_s: float, argv, retry_failed: bool, input_stats: dict, verbose: bool = False,
                row_source=None) -> dict:
    cfg_dict = config.model_dump(mode="json")
    journal.check_config(config_fingerprint(cfg_dict), cfg_dict, force=force_resume,
                         defaults=type(config)().model_dump(mode="json"))
    remove_stale_temp_files(out)  # of a killed run: shards, tables, journal entries never published
    # The journal's small columns only (finished uris, shard index entries), each file read once.
    shard_entries = journal.shard_entries()
    journal.remove_orphan_shards(shard_entries)
    first_shard = journal.next_shard_index(shard_entries)

    done_videos = {uri for uri, retryable in journal.finished().items() if not (retry_failed and retryable)}
    todo = [it for it in items if it.uri not in done_videos]
    del done_videos
    # Published keys matter only for inputs still to do (a key is "{video_id}_{clip:04d}").
    todo_ids = {it.video_id for it in todo}
    committed_keys = {k for e in shard_entries for k in e["keys"] if k.rsplit("_", 1)[0] in todo_ids}
    del shard_entries, todo_ids
    progress = CurateProgress(total=len(items), already=len(items) - len(todo), every_s=progress_every_s)

    # An input's state exists from its first row until it is journaled, so the driver holds the
    # inputs in flight, not every input of the run.
    waiting = {it.uri: it for it in todo}  # no row received yet
    states: dict[str, _InFlight] = {}
    open_manifest: dict[str, dict] = {}  # key -> manifest row, for the shard being written
    open_scores: dict[str, dict] = {}  # key -> scores row of a kept clip in that shard
    ready: list[dict] = []
    last_flush = time.monotonic()

    def journal_ready(force: bool = False):
        nonlocal ready, last_flush
        if ready and (force or len(ready) >= 64 or time.monotonic() - last_flush > 10):
            journal.record_videos(ready)
            ready = []
            last_flush = time.monotonic()

    def finish_if_ready(st: _InFlight):
        if st.finished and not st.pending_keys and st.item.uri in states:
            ready.append({"video": _video_row(st), "rejects": ([st.video_reject] if st.video_reject else []) + st.rejects,
                          "scores": st.scores, "retryable": _retryable(st)})
            del states[st.item.uri]

    def on_shard_close(info: ShardInfo):
        rows = [open_manifest.pop(k) for k in info.keys]
        try:
            journal.record_shard(info, rows, [open_scores.pop(k) for k in info.keys])
        except BaseException:
            # Its journal entry publishes a shard: one that could not be journaled (no space left)
            # is removed now rather than left for the next run to find as an orphan.
            (out / info.url).unlink(missing_ok=True)
            raise
        _fault_kill_after_shard()
        closed = set(info.keys)
        for st in list(states.values()):
            if st.pending_keys & closed:
                st.pending_keys -= closed
                finish_if_ready(st)
        writer.closed_shards.clear()  # journaled; the writer's own list of them would grow with the run
        journal_ready()

    writer = ShardWriter(out, config.write.shard_max_bytes, first_index=first_shard, on_close=on_shard_close)
    stage_seconds: dict[str, float] = {}
    nodes_used: set[str] = set()
    written_keys: set[str] = set()
    if todo:
        if row_source is None:
            rows = ray_rows(todo, config)
        else:
            rows = row_source(todo)
        try:
            for row in rows:
                st = states.get(row["uri"])
                if st is None:
                    if row["uri"] not in waiting:
                        continue  # journaled already
                    st = states[row["uri"]] = _InFlight(waiting.pop(row["uri"]))
                payload = json.loads(row["payload"])
                kind = row["kind"]
                if kind == "reject" and row["clip_index"] < 0:
                    st.video_reject = payload
                    progress.rejected_inputs += 1
                    progress.add_probed(payload.get("duration_s"))
                elif kind == "summary":
                    st.summary = payload
                    st.n_candidates = payload["n_candidates"]
                    progress.add_probed(payload["probe"]["duration_s"])
                    for k, v in payload.get("timings", {}).items():
                        stage_seconds[k] = stage_seconds.get(k, 0.0) + v
                    nodes_used.update(n for n in payload.get("nodes", {}).values() if n)
                elif kind == "reject" and payload.get("key") in committed_keys:
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
                elif kind == "clip":
                    st.terminal += 1
                    key = payload["key"]
                    st.kept_keys.append(key)
                    progress.kept_clips += 1
                    progress.kept_seconds += payload["clip"]["n_frames"] / payload["clip"]["fps"]
                    if key in written_keys:
                        raise RuntimeError(f"sample key {key} produced twice in one run ({row['uri']}): "
                                           "two inputs share a video id")
                    written_keys.add(key)
                    if key not in committed_keys:
                        members = {member: bytes(row[col]) for col, member in SAMPLE_MEMBERS.items() if len(row[col])}
                        shard_meta = _shard_meta(payload)
                        members["meta.json"] = json.dumps(shard_meta, indent=1).encode()
                        schemas.validate_meta(shard_meta)
                        url = writer.write(key, members)
                        st.pending_keys.add(key)
                        open_manifest[key] = _manifest_row(payload, url, sum(len(v) for v in members.values()))
                        open_scores[key] = _kept_scores_row(payload, row["source"], config.features.enabled)
                else:
                    raise RuntimeError(f"unexpected row kind {kind!r} from the pipeline for {row['uri']}")
                if st.finished:
                    if not st.counted:
                        progress.done += 1
                        st.counted = True
                    finish_if_ready(st)
                journal_ready()
                progress.tick()
        except BaseException:
            progress.close()  # a live bar gives the terminal back before the error is printed
            writer.abort()  # the open shard was never published; its clips are redone on rerun
            with contextlib.suppress(OSError):  # best effort (the disk may be full): the first error matters
                journal_ready(force=True)
            raise
    try:
        writer.close()
    except BaseException:
        writer.abort()  # e.g. no space left for the last shard's end: it is not published
        raise
    journal_ready(force=True)
    for it in todo:
        if it.uri in waiting:  # not one row of it came back
            states[it.uri] = _InFlight(waiting.pop(it.uri))
        st = states.get(it.uri)
        if st is None:
            continue  # journaled
        # Its block failed in Ray (a worker died: out of memory, a crash in a native decoder)
        # after Ray's retries. Recorded, and retried by the next run.
        st.video_reject = {"uri": st.item.uri, "video_id": st.item.video_id, "clip_index": -1, "key": None,
                           "stage": "ray", "reason": "worker failed", "rule": None, "value": None, "threshold": None,
                           "detail": f"{st.item.uri}: the Ray task processing this input failed "
                                     f"({st.terminal} of {st.n_candidates} candidate outcomes received); "
                                     "it is retried by the next run", "duration_s": None, "source": st.item.source}
        st.rejects, st.scores, st.pending_keys = [], [], set()
        st.kept_keys = [k for k in st.kept_keys if k in committed_keys]
        finish_if_ready(st)
    journal_ready(force=True)

    # ---- tables, run facts, and the index last
    tables, shard_infos = _write_tables(out, journal)
    progress.done = tables["inputs"]
    progress.close()
    elapsed = time.time() - t_start
    summary = {
        "inputs": len(items), "inputs_this_run": len(todo), "inputs_kept": tables["inputs_kept"],
        "inputs_rejected": tables["inputs"] - tables["inputs_kept"], "clips_kept": tables["clips_kept"],
        "clips_rejected": tables["clips_rejected"], "kept_hours": tables["kept_s"] / 3600,
        "input_hours": tables["input_s"] / 3600, "shards": len(shard_infos), "elapsed_s": elapsed,
        # every input accounted for: rejected inputs by reason; list entries folded into another
        "inputs_rejected_by_reason": dict(sorted(tables["rejected_by_reason"].items())),
        "input_duplicates": int(input_stats.get("duplicates", 0)),
        "input_blank_entries": int(input_stats.get("blank_entries", 0)),
    }
    run = {
        "pipeline_version": __version__, "schema_version": schemas.SCHEMA_VERSION, "argv": argv or sys.argv,
        "config": cfg_dict, "config_fingerprint": config_fingerprint(cfg_dict), "summary": summary,
        "timings": {"wall_s": elapsed, "stage_cpu_s": stage_seconds,
                    "inputs_per_s": len(todo) / elapsed if elapsed > 0 else None},
        "filter_rules": rule_table(config.filters, sync_real=config.profile == "full"),
        "sync_rules_applied": config.profile == "full",
        "nodes_used": sorted(nodes_used), "versions": _versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / "run.json", run)
    members = ["video.mp4", "meta.json"] + (
        ["latent.npy", "audio.npy", "kps.npy", "motion.npy"] if config.features.enabled else [])
    index = build_index(shard_infos, profile=config.profile,
                        name=config.write.dataset_name, members=members, pipeline_version=__version__)
    write_index(out, index)
    refilter_state = journal.dir / "refilter.json"
    if refilter_state.exists():
        # jobs/refilter.py changed the thresholds of this output earlier: keep them for the new inputs.
        from .config import FilterConfig
        from .refilter import apply_filters

        report = apply_filters(out, FilterConfig(**json.loads(refilter_state.read_text())["filters"]))
        print(f"[curate] re-applied the refilter thresholds of {refilter_state}: {report['kept']} clips kept",
              file=sys.stderr, flush=True)
    if config.profile == "smoke":
        print("[curate] note: smoke profile: SyncNet has random weights, so the lip-sync rules "
              "(filters.sync_conf_min, filters.sync_offset_abs_max) were not applied; scores are still recorded",
              file=sys.stderr, flush=True)
    print(f"[curate] done: {summary['inputs']} inputs ({summary['input_hours']:.3f} h) -> {summary['clips_kept']} clips "
          f"kept ({summary['kept_hours']:.3f} h) in {summary['shards']} shards; {summary['inputs_rejected']} inputs and "
          f"{summary['clips_rejected']} clips rejected; {elapsed:.1f} s. Output: {out}", file=sys.stderr, flush=True)
    return summary


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("ray", "av", "numpy", "pyarrow", "mediapipe", "onnxruntime", "webdataset", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
