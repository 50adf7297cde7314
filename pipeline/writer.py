"""Shards written on the workers, straight to the output store; the driver gets small records only.

The last stage of the Ray Data pipeline (``add_write_stage``) hands every kept clip's members to a
shard writer on its own node (a ``ShardSink`` in a Ray actor, one per node or ``write.writers`` of
them, created by the driver: ``start_writers``). The blobs go to the actor through the node's object
store; the stage passes on, instead of the clip row, a ``written`` record (key, duration, shard
url, sample bytes), and a ``shard`` record each time a writer closes a shard at the byte cap (its
index entry with ``writer`` and ``closed_by``, and the manifest and scores rows of its samples).
No blob column travels past this stage. At the end of the stream the driver closes every writer
(``close_writers``): their tail shards' records ("closed_by": "end"). pipeline/bookkeeper.py turns
the records into journal entries.

Shard names are unique per run and writer (``shards/shard-r0003-w001-000012.tar``: run 3, writer
1, its 13th shard), so writers never coordinate and a rerun never overwrites a killed run's
objects. A shard is visible only once complete (``store.open_write``): a writer that dies
leaves no shard behind, only its temp file or an uncompleted multipart upload, and the samples
it held were never journaled, so their inputs end as "worker failed" and the next run redoes them.

``row_source`` runs (tests, benchmarks/bookkeeping.py) go through the same code in-process:
``write_rows`` over ``LocalWriter``s.
"""
from __future__ import annotations

import json
import sys
import threading
import zlib
from collections.abc import Iterable, Iterator

import schemas
from schemas.records import manifest_row_from_meta
from .bookkeeper import SHARD, WRITE_ERROR, WRITTEN, _kept_scores_row, _shard_meta, write_error_payload
from .shards import ShardInfo, ShardWriter
from .stages import SAMPLE_MEMBERS
from .store import OutputStore, open_store

# The columns of the records the driver receives (no blob column).
RECORD_COLUMNS = ("video_id", "uri", "source", "kind", "clip_index", "payload")


def shard_name_format(run: int, writer: int) -> str:
    """``shard-r{run}-w{writer}-{n}.tar``: unique per run and writer."""
    return f"shard-r{run:04d}-w{writer:03d}-{{:06d}}.tar"


class WriterUnavailable(RuntimeError):
    """A writer that can take no more samples (its actor died, or it was closed)."""


class ShardSink:
    """One writer's shards for one run: samples in, ``shard`` records out.

    ``write(sample)`` takes {"key", "members": {member: bytes}, "manifest": row, "scores": row} and
    returns {"shard": url, "closed": [records of the shards it closed at the cap]}; when the write
    failed, {"error": payload} (the output could not be written: no space left, the run stops) or
    {"failed": {"message"}} (another error: the sample may go to another writer), with "closed" as
    well. A failed write drops the open shard, unpublished: its samples' inputs become "worker
    failed" at the end of the run.
    """

    def __init__(self, store: OutputStore | str, max_bytes: int, run: int, writer: int, *,
                 storage_options: dict | None = None, node: dict | None = None):
        self.store = store if isinstance(store, OutputStore) else open_store(store, storage_options)
        self.info = {"node_id": None, "node_ip": None, **(node or {}), "writer": writer}
        self._shards = ShardWriter(self.store, max_bytes, name_format=shard_name_format(run, writer),
                                   writer=self.info, on_close=self._on_close)
        self._rows: dict[str, tuple[dict, dict]] = {}  # key -> (manifest row, scores row), open shard
        self._closed_records: list[dict] = []
        self._done = False

    def node(self) -> dict:
        return dict(self.info)

    def _on_close(self, info: ShardInfo) -> None:
        rows = [self._rows.pop(k) for k in info.keys]
        self._closed_records.append({"shard": info.as_index_entry(), "manifest": [m for m, _ in rows],
                                     "scores": [s for _, s in rows]})

    def write(self, sample: dict) -> dict:
        if self._done:
            raise WriterUnavailable(f"shard writer {self.info['writer']} is closed")
        key = sample["key"]
        try:
            url = self._shards.write(key, sample["members"])
        except Exception as e:  # noqa: BLE001 - reported as a value: the shards it closed still count
            where = self.store.uri(self._shards.current_url or "shards")
            self._shards.abort()  # the open shard is dropped, unpublished
            self._rows.clear()
            failure = (write_error_payload(e, where) if isinstance(e, OSError)
                       else {"message": f"writer {self.info['writer']}: {type(e).__name__}: {e}"})
            return {"error" if isinstance(e, OSError) else "failed": failure, "closed": self._take_closed()}
        self._rows[key] = (dict(sample["manifest"], shard=url), sample["scores"])
        return {"shard": url, "closed": self._take_closed()}

    def _take_closed(self) -> list[dict]:
        closed, self._closed_records = self._closed_records, []
        return closed

    def close(self) -> dict:
        """Close the open shard (a tail shard, "closed_by": "end"); no write is taken after.
        Returns {"closed": records}, with "error" when the tail shard could not be written."""
        if not self._done:
            self._done = True
            try:
                self._shards.close()
            except OSError as e:
                where = self.store.uri(self._shards.current_url or "shards")
                self._shards.abort()
                return {"closed": self._take_closed(), "error": write_error_payload(e, where)}
        return {"closed": self._take_closed()}

    def abort(self) -> None:
        """Drop the open shard, unpublished; no write is taken after."""
        self._done = True
        self._shards.abort()
        self._rows.clear()


class LocalWriter:
    """A ShardSink called in-process (no Ray): the row_source path."""

    def __init__(self, sink: ShardSink):
        self.sink, self.node_id, self.node_ip, self.index = sink, None, None, sink.info["writer"]

    def write(self, sample: dict) -> dict:
        return self.sink.write(sample)

    def close(self) -> dict:
        return self.sink.close()

    def abort(self) -> None:
        self.sink.abort()


# ---- the write stage (runs on the workers; in-process for row_source)

def _record(kind: str, payload: dict, row: dict | None = None) -> dict:
    row = row or {}
    return {"video_id": row.get("video_id", ""), "uri": row.get("uri", ""), "source": row.get("source", ""),
            "kind": kind, "clip_index": int(row.get("clip_index", -1)), "payload": json.dumps(payload)}


def _small(row: dict) -> dict:
    return {c: row[c] for c in RECORD_COLUMNS}


def _sample(row: dict, meta: dict, features: bool) -> dict:
    members = {member: bytes(row[col]) for col, member in SAMPLE_MEMBERS.items() if len(row[col])}
    shard_meta = _shard_meta(meta)
    schemas.validate_meta(shard_meta)
    members["meta.json"] = json.dumps(shard_meta, indent=1).encode()
    size = sum(len(v) for v in members.values())
    return {"key": meta["key"], "members": members,
            "manifest": manifest_row_from_meta(meta, shard=None, sample_bytes=size),  # shard: set by the writer
            "scores": _kept_scores_row(meta, row["source"], features), "sample_bytes": size}


def _write_failed(row: dict, meta: dict, detail: str, reason: str = "worker failed") -> dict:
    """A clip whose sample was not written: a retryable reject of the clip (its input is redone)."""
    payload = {"uri": row["uri"], "video_id": row["video_id"], "clip_index": int(row["clip_index"]),
               "key": meta.get("key"), "stage": "write", "reason": reason, "rule": None, "value": None,
               "threshold": None, "detail": f"{row['uri']}: {detail}; it is retried by the next run",
               "duration_s": None, "source": row["source"], "retryable": True}
    return _record("reject", payload, row)


def write_rows(rows: Iterable[dict], writers: list, *, committed_keys=frozenset(),
               features: bool = False) -> Iterator[dict]:
    """The records of ``rows`` (stage rows, blobs included): every ``clip`` row's sample goes to the
    first writer of ``writers`` that takes it, and becomes a ``written`` record, followed by the
    ``shard`` records of the shards that write closed; other rows pass without their blob columns.
    A clip already published by an earlier run (``committed_keys``) is not written again."""
    for row in rows:
        if row["kind"] != "clip":
            yield _small(row)
            continue
        meta = json.loads(row["payload"])
        key = meta["key"]
        written = {"key": key, "duration_s": meta["clip"]["n_frames"] / meta["clip"]["fps"], "shard": None,
                   "sample_bytes": None, "timings": meta.get("timings", {})}
        if key in committed_keys:
            yield _record(WRITTEN, written, row)
            continue
        try:
            sample = _sample(row, meta, features)
        except Exception as e:  # noqa: BLE001 - a bad record is the clip's outcome, not the job's end
            yield _write_failed(row, meta, f"its sample could not be built ({type(e).__name__}: {e})",
                                "internal error")
            continue
        result, failures = None, []
        for writer in writers:
            try:
                result = writer.write(sample)
            except WriterUnavailable as e:
                failures.append(str(e))
                continue
            for record in result["closed"]:  # shards the write closed, whatever became of the sample
                yield _record(SHARD, record)
            if "failed" not in result:
                break
            failures.append(result["failed"]["message"])  # that writer dropped its open shard; try the next
            result = None
        if result is None:
            yield _write_failed(row, meta, "no shard writer could take its sample (" + "; ".join(failures) + ")")
        elif "error" in result:  # the output cannot be written (no space left): the driver stops the run
            yield _record(WRITE_ERROR, result["error"], row)
        else:
            yield _record(WRITTEN, dict(written, shard=result["shard"], sample_bytes=sample["sample_bytes"]), row)


def preferred_order(writers: list, node_id: str | None, key: str = "") -> list:
    """The writers on ``node_id`` first (their samples never leave the node), then the others; in
    each group starting at one picked by ``key``, so that a node's samples spread over its writers
    and nodes without a writer spread theirs."""
    def rotated(ws: list) -> list:
        start = zlib.crc32(key.encode()) % len(ws) if ws else 0
        return ws[start:] + ws[:start]

    local = [w for w in writers if w.node_id is not None and w.node_id == node_id]
    return rotated(local) + rotated([w for w in writers if w not in local])


# ---- Ray: writer actors and the stage

class RayWriter:
    """A writer actor's handle, with the node it runs on (picklable: goes to the write tasks)."""

    def __init__(self, handle, node: dict, joined: bool = False):
        self.handle, self.node_id, self.node_ip, self.index = handle, node["node_id"], node["node_ip"], node["writer"]
        self.joined = joined  # started for a node that joined the cluster during the run

    def write(self, sample: dict) -> dict:
        import ray

        try:
            return ray.get(self.handle.write.remote(sample))
        except ray.exceptions.RayActorError as e:
            raise WriterUnavailable(f"writer {self.index} on node {self.node_ip} is gone ({type(e).__name__})") from e
        except ray.exceptions.RayTaskError as e:  # a closed writer refuses writes
            raise WriterUnavailable(f"writer {self.index} on node {self.node_ip}: {e.cause or e}") from e

    def close(self) -> dict:
        import ray

        return ray.get(self.handle.close.remote())

    def abort(self) -> None:
        import ray

        ray.get(self.handle.abort.remote(), timeout=60)


class _RaySink(ShardSink):
    """A ShardSink in a Ray actor: knows its node."""

    def __init__(self, store_url: str, storage_options: dict, max_bytes: int, run: int, writer: int):
        import ray

        node = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
        super().__init__(store_url, max_bytes, run, writer, storage_options=storage_options, node=node)


def writer_nodes() -> list[str]:
    """Ids of the alive nodes that run tasks (have CPUs): each gets a writer by default."""
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)


def start_writers(store_url: str, storage_options: dict | None, max_bytes: int, run: int,
                  count: int | None = None, *, nodes: list[str] | None = None, first_index: int = 0,
                  timeout_s: float = 300.0) -> list[RayWriter]:
    """Writer actors for this run: one pinned to each node that runs tasks (``count`` None; or to
    each of ``nodes``), or ``count`` of them spread over the nodes; numbered from ``first_index``.
    They take no CPU from the stages (they mostly wait on the store), and are not restarted: a
    restarted writer would have lost its open shard anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(_RaySink)
    if count is None:
        strategies = [NodeAffinitySchedulingStrategy(node_id, soft=False) for node_id in (nodes or writer_nodes())]
    else:
        strategies = ["SPREAD"] * count
    handles = [actor_cls.options(scheduling_strategy=s).remote(store_url, storage_options or {}, max_bytes, run,
                                                               first_index + i)
               for i, s in enumerate(strategies)]
    try:
        nodes_of = ray.get([h.node.remote() for h in handles], timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
        for h in handles:
            ray.kill(h, no_restart=True)
        raise RuntimeError(f"the {len(handles)} shard writer actors did not start within {timeout_s:.0f} s (a node "
                           f"gone, or no room for an actor on it: {type(e).__name__}); see the Ray dashboard") from None
    return [RayWriter(h, node, joined=nodes is not None) for h, node in zip(handles, nodes_of)]


class _WriterDirectory:
    """The run's writers as the write tasks see them (a small actor): grows when a node joins."""

    def __init__(self, writers: list):
        self._writers = list(writers)

    def add(self, writers: list) -> None:
        self._writers.extend(writers)

    def get(self) -> list:
        return self._writers


class NodeWriters:
    """One writer per node for the whole run, nodes that join the cluster meanwhile included (an
    autoscaled GPU group starts empty: without this, every sample its feature actors make would
    cross the network to the writers of the nodes that were there at the start, the very ceiling
    the workers' writers remove). The driver looks for new nodes every ``poll_s`` in a thread and
    starts their writers; the write tasks read the current list from the directory actor, once per
    block. ``writers`` is the list of every writer started, growing; ``stop()`` before closing them."""

    def __init__(self, store_url: str, storage_options: dict | None, max_bytes: int, run: int, poll_s: float = 10.0):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._args = (store_url, storage_options or {}, max_bytes, run)
        self.writers = start_writers(*self._args)
        # On the driver's node, which lives as long as the run: an actor that asks for no resources
        # is otherwise placed on any node, and an autoscaled node taking it down would fail every
        # later write task.
        driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        try:
            self.directory = ray.remote(num_cpus=0)(_WriterDirectory).options(
                scheduling_strategy=driver_node).remote(self.writers)
        except Exception:
            stop_writers(self.writers)
            raise
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(poll_s,), name="shard-writer-nodes", daemon=True)
        self._thread.start()

    def refresh(self) -> list[RayWriter]:
        """Start the writers of the nodes that have none yet; returns them."""
        import ray

        with self._lock:
            have = {w.node_id for w in self.writers}
            new = [n for n in writer_nodes() if n not in have]
            if not new or self._stop.is_set():
                return []
            started = start_writers(*self._args, nodes=new, first_index=len(self.writers), timeout_s=60.0)
            try:
                ray.get(self.directory.add.remote(started), timeout=60)
            except Exception:
                stop_writers(started)  # never seen by a write task: nothing of theirs to keep
                raise
            self.writers.extend(started)
            return started

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                for w in self.refresh():
                    print(f"[curate] node {w.node_ip} joined: shard writer {w.index} started on it", flush=True)
            except Exception as e:  # noqa: BLE001 - a node that left again; the next poll sees the cluster anew
                print(f"[curate] warning: no shard writer started on a new node: {e}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """No writer is added after this returns (a refresh under way finishes first)."""
        self._stop.set()
        self._thread.join(timeout=120)
        with self._lock:
            pass

    def kill(self) -> None:
        import ray

        self.stop()
        stop_writers(self.writers)
        ray.kill(self.directory, no_restart=True)


def _write_batch(batch, writers: list, committed_keys, features: bool, directory=None):
    """The write stage's function (a pyarrow block in, a pyarrow table of records out); ``directory``:
    the run's current writers come from it (NodeWriters), not from ``writers``."""
    import pyarrow as pa
    import ray

    if directory is not None:
        try:
            writers = ray.get(directory.get.remote())
        except ray.exceptions.RayActorError:  # the directory is gone: the writers known when the dataset began
            pass
    node_id = ray.get_runtime_context().get_node_id()
    records = []
    for row in batch.to_pylist():
        order = preferred_order(writers, node_id, str(row.get("video_id", "")))
        records.extend(write_rows([row], order, committed_keys=committed_keys, features=features))
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA())


def RECORD_SCHEMA():  # noqa: N802 - a constant, built lazily (pyarrow import)
    import pyarrow as pa

    return pa.schema([("video_id", pa.string()), ("uri", pa.string()), ("source", pa.string()),
                      ("kind", pa.string()), ("clip_index", pa.int64()), ("payload", pa.string())])


def add_write_stage(ds, writers: list[RayWriter], committed_keys, features: bool, directory=None,
                    producers: int = 1):
    """The dataset's last stage: samples to the writers, small records on.

    No CPU reserved (the tasks wait on their writer; reserving one could starve them behind the
    stages' actor pools on a small node), hence a bounded number of tasks at once (two per writer,
    or per actor of the stage before (``producers``) when there are more of those: writers that
    nodes joining the run add (``directory``: NodeWriters) then have tasks to feed them; one
    waiting on its writer, one being scheduled; each is a worker process); no retry: a retried
    task would write its samples twice (a failed one's inputs end as "worker failed", redone by the
    next run)."""
    import warnings

    from ray.data import TaskPoolStrategy

    # Ray Data warns at execution when a dataset has fewer blocks than the tasks allowed (a few inputs).
    warnings.filterwarnings("ignore", message=r"The maximum number of concurrent tasks for 'MapBatches\(_write_batch\)'")
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_retries yet (runner.build_dataset says the same).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(_write_batch, fn_kwargs={"writers": writers, "committed_keys": committed_keys,
                                                       "features": features, "directory": directory},
                              batch_size=None, batch_format="pyarrow", num_cpus=0,
                              compute=TaskPoolStrategy(size=2 * max(len(writers), producers if directory is not None else 1)),
                              max_retries=0,
                              # where the block is (Ray's locality-aware default), not Ray Data's SPREAD:
                              # then its node's writer takes the samples, which never cross the network again
                              scheduling_strategy="DEFAULT")


def close_writers(writers: list) -> tuple[list[dict], list[str], dict | None]:
    """Close every writer: the records of their tail shards, a line per writer that failed (its
    open shard is lost: the inputs of its samples end as "worker failed"), and the first
    ``write error`` (the output could not be written: the driver stops the run once the records
    are journaled)."""
    records, failed, error = [], [], None
    for w in writers:
        try:
            result = w.close()
        except Exception as e:  # noqa: BLE001 - one lost writer does not lose the others' shards
            failed.append(f"writer {w.index}: {type(e).__name__}: {e}")
            continue
        records += result["closed"]
        error = error or result.get("error")
    return records, failed, error


def abort_writers(writers: list) -> None:
    """Best effort after a failed run: drop the open shards (nothing partial is published)."""
    for w in writers:
        try:
            w.abort()
        except Exception:  # noqa: BLE001, S110 - a dead writer's open shard was never published either
            pass


def stop_writers(writers: list) -> None:
    import ray

    for w in writers:
        if isinstance(w, RayWriter):
            ray.kill(w.handle, no_restart=True)
