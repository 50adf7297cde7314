"""The curation driver: Ray Data stages in, shards + tables + run facts out.

The driver builds the Ray Data pipeline from the stage list, ending in the write stage (the
shards are written on the workers: pipeline/writer.py), streams its small records (``iter_rows``:
execution is streaming, nothing waits for a full stage) into the Bookkeeper
(pipeline/bookkeeper.py), the single writer of the journal, which makes exactly-once accounting
simple: a record is an outcome, and the driver decides when an input is finished.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from schemas import SHARD_DIR

from .bookkeeper import Bookkeeper, write_error
from .config import CurateConfig
from .finalize import RunFacts, finalize_curation
from .inputs import InputItem
from .journal import JOURNAL_DIR, Journal, config_fingerprint
from .progress import CurateProgress
from .shards import remove_stale_temp_files
from .stages import default_stages, new_row
from .store import open_store
from .writer import (LocalWriter, NodeWriters, ShardSink, abort_writers, add_write_stage, close_writers, start_writers,
                     stop_writers, write_rows)


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
    ctx.target_max_block_size = config.ray.max_block_mb * 2**20  # a long input's clips are not one block
    # Ray Data fails a dataset after 30 min without any block moving, but the crop stage emits an
    # input's rows only when the input is done: a 5-minute input whose crop+score took over 30 min
    # (2 loaded cores, docs/benchmarks.md) failed the job. Each stage call is bounded by the
    # per-input watchdog instead (probe.input_timeout_s, input_timeout_per_video_s: 10 s per s).
    ctx.execution_no_progress_timeout_s = -1
    if config.ray.full_pools:  # every actor of a pool up before its first input (config.py says why)
        ctx.wait_for_min_actors_s = config.ray.full_pools_wait_s
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
            # (a full pool is never larger than the dataset: an actor with no input to take only loads models)
            min_size = max(1, min(spec["pool"], len(rows))) if config.ray.full_pools else 1
            kwargs["compute"] = ActorPoolStrategy(min_size=min_size,
                                                  max_size=spec["pool"],
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


def ray_rows(items: list[InputItem], config: CurateConfig, write_stage=None):
    """The pipeline's rows for ``items``, from consecutive datasets of ``ray.inputs_per_dataset`` inputs.

    Each dataset is drained before the next is built, so Ray Data's driver-side state (the blocks
    from_items makes up front, operator and task state) exists for one dataset's inputs at a time
    instead of growing with the run; each block still holds one input. ``write_stage(ds)`` adds the
    last stage (writer.add_write_stage: the shards are written on the workers, records come back).
    """
    require_ray()
    size = config.ray.inputs_per_dataset
    for start in range(0, len(items), size):
        ds = build_dataset(items[start:start + size], config)
        if write_stage is not None:
            ds = write_stage(ds)
        yield from ds.iter_rows()
        del ds


_shards_journaled_this_process = 0


def _fault_kill_after_shard(info=None) -> None:
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


def run_curation(items: list[InputItem], output: str | Path, config: CurateConfig, *, force_resume: bool = False,
                 progress_every_s: float = 5.0, argv: list[str] | None = None, retry_failed: bool = True,
                 input_stats: dict | None = None, row_source=None) -> dict:
    """Curate ``items`` into ``output``: a local or shared-filesystem directory, or an object-store
    URL (``s3://bucket/prefix``, ``gs://``; credentials from the environment or ``storage_options``).

    ``retry_failed``: inputs whose outcome was a crash, an internal error or a feature failure
    in an earlier run are processed again (their journal entry is replaced).
    ``input_stats``: what ``expand_inputs`` folded away (duplicates, blank list entries), for the summary.
    ``row_source``: ``f(todo) -> iterable of rows`` standing in for the Ray Data pipeline (the rows
    its stages emit, blobs included; their samples are written in-process by the same writer
    code): tests and benchmarks/bookkeeping.py drive the driver's bookkeeping with it.
    """
    t_start = time.time()
    preflight(config)
    store = open_store(output, config.storage_options)
    out = store.local_path()  # None on an object store
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        journal = Journal(store)
        with journal.lock(lease_s=config.write.lock_lease_s):
            return _run_locked(items, store, journal, config, t_start, force_resume, progress_every_s, argv,
                               retry_failed, input_stats or {}, row_source)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" ({e.filename})" if e.filename else ""
        raise OutputFullError(
            f"no space left on device writing the output {store.url}{where}: the run stopped and nothing partial was "
            "published; free space and run the same command again to resume") from e


def refuse_if_locked(output: str | Path, config: CurateConfig) -> None:
    """``OutputLocked`` when another run is writing ``output`` (its journal's lock is held), before
    the caller starts Ray; an output without a journal yet is left untouched (nothing is created)."""
    store = open_store(output, config.storage_options)
    local = store.local_path()
    if local is not None and not (local / JOURNAL_DIR / "lock").exists():
        return
    Journal(store).refuse_if_held()


def _remove_unjournaled_shards(store, run_number: int, journaled: set[str]) -> list[str]:
    """Delete this run's shard objects that have no journal entry, once its writers are stopped: a
    shard whose record was lost with its write task, or closed while the run was stopping, and the
    temp file of a writer that died. Other runs' objects are left to the next run's orphan cleanup."""
    tag = f"shard-r{run_number:04d}-"
    removed = [n for n in store.list(SHARD_DIR) if tag in n.rsplit("/", 1)[-1] and n not in journaled]
    for name in removed:
        store.delete(name)
    return removed


def _row_nbytes(row: dict) -> int:
    """Bytes of one row the driver receives: its strings and binary columns (8 per other value)."""
    return sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row.values())


def _run_locked(items, store, journal: Journal, config: CurateConfig, t_start: float, force_resume: bool,
                progress_every_s: float, argv, retry_failed: bool, input_stats: dict,
                row_source=None) -> dict:
    cfg_dict = config.model_dump(mode="json")
    journal.check_config(config_fingerprint(cfg_dict), cfg_dict, force=force_resume,
                         defaults=type(config)().model_dump(mode="json"))
    remove_stale_temp_files(store)  # of a killed run: shards, tables, journal entries never published
    # The journal's small columns only (finished uris, shard index entries), each file read once.
    shard_entries = journal.shard_entries()
    journal.remove_orphan_shards(shard_entries)
    run_number = journal.begin_run()  # for shard names unique per run and writer

    done_videos = {uri for uri, retryable in journal.finished().items() if not (retry_failed and retryable)}
    todo = [it for it in items if it.uri not in done_videos]
    del done_videos
    # Published keys matter only for inputs still to do (a key is "{video_id}_{clip:04d}").
    todo_ids = {it.video_id for it in todo}
    committed_keys = frozenset(k for e in shard_entries for k in e["keys"] if k.rsplit("_", 1)[0] in todo_ids)
    del shard_entries, todo_ids
    progress = CurateProgress(total=len(items), already=len(items) - len(todo), every_s=progress_every_s)
    books = Bookkeeper(journal, todo, committed_keys, progress=progress, after_shard=_fault_kill_after_shard,
                       discard_shard=store.delete)
    driver = {"rows": 0, "row_bytes": 0}  # what the driver received: records, never sample bytes
    writers: list = []
    node_writers = None  # NodeWriters: writers of nodes that join during the run are added to ``writers``
    if todo:
        try:
            writers, rows = _start_writing(todo, store, config, run_number, committed_keys, row_source)
            if isinstance(writers, NodeWriters):
                node_writers, writers = writers, writers.writers
            for row in rows:
                driver["rows"] += 1
                driver["row_bytes"] += _row_nbytes(row)
                books.add(row)
                progress.tick()
            if node_writers is not None:
                node_writers.stop()  # no writer starts after the list below is closed
            # End of the stream: every writer closes its open shard (a tail shard).
            records, failed, error = close_writers(writers)
            for record in records:
                books.add_shard(record)
            if error is not None:
                raise write_error(error)  # e.g. no space left for a tail shard: it is not published
            for line in failed:
                print(f"[curate] a shard writer failed at the end of the run: {line}; the inputs of its open shard "
                      "are journaled as \"worker failed\" and redone by the next run", file=sys.stderr, flush=True)
        except BaseException:
            progress.close()  # a live bar gives the terminal back before the error is printed
            if node_writers is not None:
                node_writers.stop()  # no writer is added that the abort below would miss
            abort_writers(writers)  # their open shards are never published; their clips are redone on rerun
            with contextlib.suppress(OSError):  # best effort (the disk may be full): the first error matters
                books.flush()
            raise
        finally:
            if node_writers is not None:
                node_writers.kill()
            else:
                stop_writers(writers)
            with contextlib.suppress(OSError):  # best effort: the next run deletes orphans too
                _remove_unjournaled_shards(store, run_number, {s.url for s in books.shards})
    books.finish()  # inputs without every outcome: "worker failed", retried by the next run

    # ---- tables, run facts, and the index last
    facts = RunFacts(started=t_start, inputs=len(items), inputs_this_run=len(todo), argv=argv,
                     stage_seconds=books.stage_seconds, nodes_used=books.nodes_used, input_stats=input_stats,
                     driver_rows=driver, writers=_writers_facts(writers, books))
    return finalize_curation(store, journal, config, facts, progress=progress)


def _start_writing(todo, store, config: CurateConfig, run_number: int, committed_keys, row_source):
    """The writers of this run and the records the driver iterates: the Ray Data pipeline ending in
    the write stage, with a writer actor per node; or ``row_source``'s rows through one in-process writer."""
    features = config.features.enabled
    if row_source is not None:
        writers = [LocalWriter(ShardSink(store, config.write.shard_max_bytes, run_number, 0))]
        return writers, write_rows(row_source(todo), writers, committed_keys=committed_keys, features=features)
    require_ray()
    if config.write.writers is None:  # one per node, nodes that join during the run included
        node_writers = NodeWriters(store.url, config.storage_options, config.write.shard_max_bytes, run_number,
                                   poll_s=config.write.node_poll_s)
        # On a cluster (nodes may join), room from the start for the write tasks of the writers that
        # joining nodes add: as many as the last stage has actors. An embedded Ray is one machine:
        # its one writer's two, not a worker process per actor waiting on that one writer.
        on_cluster = bool(config.ray.address or os.environ.get("RAY_ADDRESS"))
        producers = (config.features.actors if features else config.score.actors) if on_cluster else 1
        return node_writers, ray_rows(todo, config, lambda ds: add_write_stage(
            ds, node_writers.writers, committed_keys, features, directory=node_writers.directory, producers=producers))
    writers = start_writers(store.url, config.storage_options, config.write.shard_max_bytes, run_number,
                            config.write.writers)
    return writers, ray_rows(todo, config, lambda ds: add_write_stage(ds, writers, committed_keys, features))


def _writers_facts(writers: list, books: Bookkeeper) -> dict:
    """run.json "writers": this run's shard writers and the shards they closed (tail shards: at the end)."""
    by_writer: dict[int, dict] = {}
    for info in books.shards:
        w = by_writer.setdefault((info.writer or {}).get("writer", 0), {"shards": 0, "tail_shards": 0, "bytes": 0})
        w["shards"] += 1
        w["tail_shards"] += info.closed_by == "end"
        w["bytes"] += info.filesize
    return {"count": len(writers), "node_ids": sorted({w.node_id or "local" for w in writers}),
            "joined_node_ids": sorted({w.node_id for w in writers if getattr(w, "joined", False)}),
            "shards_this_run": len(books.shards), "tail_shards_this_run": sum(w["tail_shards"] for w in by_writer.values()),
            "by_writer": {str(k): v for k, v in sorted(by_writer.items())},
            "worker_failed_this_run": len(books.worker_failed)}
