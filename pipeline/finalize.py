"""Finalising a curation output: its tables, ``run.json``, and ``index.json`` last.

Everything is written through the output store (pipeline/store.py), so an object-store output
gets the same files as a local directory:

- ``manifest``, ``rejects``, ``videos`` and ``scores.parquet``, streamed from the journal (shards
  in url order, then inputs) into one upload each: pyarrow's ParquetWriter writes row groups into
  the upload, so a table of 100,000s of rows is never held whole, and it appears whole or not at all;
- ``run.json``: the run's facts (summary counts, config, timings, nodes, versions);
- ``index.json`` last: the commit marker a reader trusts, written once everything it lists is in place.
  A failure before it (a bad journal row, no space left) publishes no index.

Two callers: the curation driver at the end of a run (``finalize_curation``) and the refilter and
dedup jobs (``refilter``, ``apply_filters``: new thresholds over the stored scores, decided by
pipeline/refilter.py). A curation run into an output whose thresholds were refiltered earlier
applies those thresholds while it builds the tables, so each table is written once per run.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from schemas import records
from . import __version__
from .config import CurateConfig, FilterConfig
from .dedup import read_duplicates
from .filters import rule_table
from .journal import Journal, config_fingerprint
from .refilter import NEEDS_RERUN_SCHEMA, REFILTER_STATE, Selection, record_in_run, select
from .shards import ShardInfo, build_index
from .store import OutputStore, TableWriter, open_store

TABLES = ("manifest", "rejects", "videos", "scores")
INDEX = "index.json"
RUN = "run.json"
REFILTER_STATE_NAME = f"_journal/{REFILTER_STATE}"  # the thresholds a refilter left for later curation runs


# ---- writing through the store ------------------------------------------------------------------

def write_table(store: OutputStore, name: str, rows: Iterable[dict], schema: pa.Schema) -> None:
    """``rows`` as the parquet table ``name`` (columns exactly ``schema``'s, missing fields null)."""
    with TableWriter(store, name, schema) as table:
        table.add(rows)


def write_tables(store: OutputStore, tables: dict[str, tuple[Iterable[dict], pa.Schema]]) -> None:
    """Several tables (name -> (rows, schema)), each complete before any is published."""
    sinks = []
    try:
        for name, (rows, schema) in tables.items():
            sinks.append(TableWriter(store, name, schema))
            sinks[-1].add(rows)
        for sink in sinks:
            sink.finish()
        for sink in sinks:
            sink.commit()
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise


def read_table(store: OutputStore, name: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(store.read_bytes(name)), columns=columns)


def write_json(store: OutputStore, name: str, obj) -> None:
    store.put_bytes(name, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(store: OutputStore, name: str):
    try:
        return json.loads(store.read_bytes(name))
    except FileNotFoundError:
        raise FileNotFoundError(f"{store.uri(name)} is missing: not a finished curation output") from None


def read_index(store: OutputStore) -> dict:
    """index.json of the output; refuses schema versions this code does not read."""
    index = read_json(store, INDEX)
    refusal = schemas.version_refusal(index.get("schema_version"), store.uri(INDEX))
    if refusal:
        raise ValueError(refusal)
    return index


def publish_index(store: OutputStore, shards: list[ShardInfo], *, profile: str, name: str, members: list[str],
                  selection: dict | None = None) -> dict:
    """Write index.json, the commit marker: call it last, once every shard and table it names is in place."""
    index = build_index(shards, profile=profile, name=name, members=members, pipeline_version=__version__)
    if selection is not None:
        index["selection"] = selection  # refilter: the manifest is a subset of the shards' samples
    write_json(store, INDEX, index)
    return index


def open_journal(store: OutputStore) -> Journal:
    """The output's journal, on the same store."""
    return Journal(store)


# ---- the tables of a curation run ---------------------------------------------------------------

def _entry_field(entry: dict, name: str):
    """A shard entry's optional writer facts ("writer", "closed_by"): beside its index entry, or in it."""
    return entry.get(name, entry["shard"].get(name))


def shard_info(index_entry: dict) -> ShardInfo:
    """The index fields of a journaled shard (other fields of its entry stay out of index.json)."""
    return ShardInfo(url=index_entry["url"], nsamples=index_entry["nsamples"], filesize=index_entry["filesize"],
                     sha256=index_entry["sha256"], keys=list(index_entry.get("keys", [])))


@dataclass
class TableCounts:
    """What run.json's summary counts, gathered while the tables stream by."""

    inputs: int = 0
    inputs_kept: int = 0
    clips_kept: int = 0
    clips_rejected: int = 0
    kept_s: float = 0.0
    input_s: float = 0.0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    shards_by_node: dict[str, int] = field(default_factory=dict)  # node id -> shards its writer committed
    tail_shards: int = 0  # shards closed by the end of the stream rather than by the byte cap

    def add_shard(self, entry: dict) -> None:
        self.shards.append(shard_info(entry["shard"]))
        self.clips_kept += len(entry["manifest"])
        self.kept_s += sum(r["duration_s"] for r in entry["manifest"])
        writer = _entry_field(entry, "writer")  # absent in entries of runs before distributed writers
        if writer and writer.get("node_id"):
            self.shards_by_node[writer["node_id"]] = self.shards_by_node.get(writer["node_id"], 0) + 1
        self.tail_shards += _entry_field(entry, "closed_by") == "end"

    def add_input(self, entry: dict) -> None:
        video = entry["video"]
        self.inputs += 1
        self.inputs_kept += video["status"] == "kept"
        if video["status"] != "kept":
            self.rejected_by_reason[video["reason"]] = self.rejected_by_reason.get(video["reason"], 0) + 1
        self.clips_rejected += sum(1 for r in entry["rejects"] if r["clip_index"] >= 0)
        self.input_s += video["duration_s"] or 0


def stream_tables(store: OutputStore, journal: Journal, *, write: bool = True) -> TableCounts:
    """manifest, rejects, videos and scores.parquet streamed from the journal (shards in url order, then
    inputs), and the counts of the run summary; ``write`` False: the counts only."""
    counts = TableCounts()
    sinks = {name: TableWriter(store, f"{name}.parquet", schemas.TABLE_SCHEMAS[f"{name}.parquet"])
             for name in (TABLES if write else ())}
    try:
        for entry in journal.iter_shards():
            counts.add_shard(entry)
            if sinks:
                sinks["manifest"].add(entry["manifest"])
                sinks["scores"].add(entry.get("scores", []))
        for entry in journal.iter_videos():
            counts.add_input(entry)
            if sinks:
                sinks["videos"].add([entry["video"]])
                sinks["rejects"].add(entry["rejects"])
                sinks["scores"].add(entry.get("scores", []))
        # every table complete before any is published: a bad row leaves none of them half-replaced
        for sink in sinks.values():
            sink.finish()
        for sink in sinks.values():
            sink.commit()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    return counts


# ---- refilter -----------------------------------------------------------------------------------

def saved_filters(store: OutputStore) -> FilterConfig | None:
    """The thresholds a refilter (or dedup) left for this output, None when it was never refiltered."""
    if not store.exists(REFILTER_STATE_NAME):
        return None
    return FilterConfig(**json.loads(store.read_bytes(REFILTER_STATE_NAME))["filters"])


def save_filters(store: OutputStore, filters: FilterConfig) -> None:
    write_json(store, REFILTER_STATE_NAME, {"filters": filters.model_dump(mode="json")})


def _write_selection(store: OutputStore, journal: Journal, filters: FilterConfig,
                     before: set[str] | None) -> tuple[Selection, list[dict]]:
    """The tables under ``filters`` (pipeline/refilter.py decides), written; ``before``: the keys of
    the manifest they replace (None: every clip in a shard, as a curation run's own tables)."""
    shard_entries = journal.shards()
    if before is None:
        before = {r["key"] for e in shard_entries for r in e["manifest"]}
    selection = select(shard_entries, journal.videos(), filters, duplicates=read_duplicates(store), before=before)
    write_tables(store, {"manifest.parquet": (selection.manifest, schemas.MANIFEST_SCHEMA),
                         "rejects.parquet": (selection.rejects, schemas.REJECTS_SCHEMA),
                         "scores.parquet": (selection.scores, schemas.SCORES_SCHEMA),
                         "videos.parquet": (selection.videos, schemas.VIDEOS_SCHEMA),
                         "needs_rerun.parquet": (selection.needs_rerun, NEEDS_RERUN_SCHEMA)})
    return selection, shard_entries


def _selection_entry(selection: Selection) -> dict:
    return {"manifest": "manifest.parquet", "nsamples": len(selection.manifest),
            "refiltered": selection.report["time"]}


def apply_filters(root: str | Path | OutputStore, filters: FilterConfig, *, journal: Journal | None = None) -> dict:
    """Apply ``filters`` to the finished output at ``root`` (a path, URL or store): new tables, run.json
    noting the refilter, and a new index.json last. The caller holds the output's lock."""
    store = root if isinstance(root, OutputStore) else open_store(root)
    index = read_index(store)
    if not store.exists("scores.parquet"):
        raise FileNotFoundError(f"{store.uri('scores.parquet')} is missing: this output has no stored scores to refilter")
    before = set(read_table(store, "manifest.parquet", columns=["key"]).column("key").to_pylist())
    selection, shard_entries = _write_selection(store, journal or open_journal(store), filters, before)
    run = read_json(store, RUN)
    record_in_run(run, selection, filters, sync_real=index["profile"] == "full")
    write_json(store, RUN, run)
    publish_index(store, [shard_info(e["shard"]) for e in shard_entries], profile=index["profile"],
                  name=index.get("name", ""), members=index.get("members", []), selection=_selection_entry(selection))
    return selection.report


def refilter(root: str | Path, filters: FilterConfig, storage_options: dict | None = None) -> dict:
    """jobs/refilter.py: apply ``filters`` to the output at ``root`` (holding its lock) and remember
    them, so a later curation run into the same output (adding inputs) applies them too instead of
    undoing them."""
    store = open_store(root, storage_options)
    journal = open_journal(store)
    with journal.lock():
        report = apply_filters(store, filters, journal=journal)
        save_filters(store, filters)
    return report


# ---- the end of a curation run ------------------------------------------------------------------

@dataclass
class RunFacts:
    """What only the driver knows about a run, for run.json."""

    started: float  # time.time() when the run started
    inputs: int  # inputs in this run's list
    inputs_this_run: int  # of them, those not finished by an earlier run
    argv: list[str] | None = None  # the command line (default: sys.argv)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds summed over inputs
    nodes_used: Iterable[str] = ()  # Ray node ids that ran a stage
    input_stats: dict = field(default_factory=dict)  # expand_inputs: "duplicates", "blank_entries"
    driver_rows: dict | None = None  # what the driver received: {"rows", "row_bytes"} (records, never samples)
    writers: dict | None = None  # this run's shard writers and the shards each closed


def finalize_curation(store: OutputStore, journal: Journal, config: CurateConfig, facts: RunFacts, *,
                      progress=None) -> dict:
    """The end of a curation run (the output's lock held, every input journaled): the tables from
    the journal (under the thresholds of an earlier refilter, if any), run.json, then index.json.
    ``progress`` (pipeline/progress.py) is closed once the inputs are counted. Returns run.json's summary."""
    filters = saved_filters(store)
    counts = stream_tables(store, journal, write=filters is None)
    selection = None
    if filters is not None:
        selection, _ = _write_selection(store, journal, filters, before=None)
    if progress is not None:
        progress.done = counts.inputs
        progress.close()
    elapsed = time.time() - facts.started
    summary = {
        "inputs": facts.inputs, "inputs_this_run": facts.inputs_this_run, "inputs_kept": counts.inputs_kept,
        "inputs_rejected": counts.inputs - counts.inputs_kept, "clips_kept": counts.clips_kept,
        "clips_rejected": counts.clips_rejected, "kept_hours": counts.kept_s / 3600,
        "input_hours": counts.input_s / 3600, "shards": len(counts.shards), "elapsed_s": elapsed,
        # every input accounted for: rejected inputs by reason; list entries folded into another
        "inputs_rejected_by_reason": dict(sorted(counts.rejected_by_reason.items())),
        "input_duplicates": int(facts.input_stats.get("duplicates", 0)),
        "input_blank_entries": int(facts.input_stats.get("blank_entries", 0)),
        # where shards were written (node id -> shards) and how many closed below the byte cap at the end
        "shards_by_node": dict(sorted(counts.shards_by_node.items())), "tail_shards": counts.tail_shards,
    }
    cfg_dict = config.model_dump(mode="json")
    run = {
        "pipeline_version": __version__, "schema_version": schemas.SCHEMA_VERSION, "argv": facts.argv or sys.argv,
        "config": cfg_dict, "config_fingerprint": config_fingerprint(cfg_dict), "summary": summary,
        "timings": {"wall_s": elapsed, "stage_cpu_s": facts.stage_seconds,
                    "inputs_per_s": facts.inputs_this_run / elapsed if elapsed > 0 else None},
        "writers": facts.writers,
        "filter_rules": rule_table(config.filters, sync_real=config.profile == "full"),
        "sync_rules_applied": config.profile == "full",
        "nodes_used": sorted(facts.nodes_used), "versions": _versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if facts.driver_rows is not None:
        # the rows the driver iterated: small records, however many bytes the writers wrote
        run["timings"]["driver_rows"] = facts.driver_rows["rows"]
        run["timings"]["driver_row_bytes"] = facts.driver_rows["row_bytes"]
    if selection is not None:
        record_in_run(run, selection, filters, sync_real=config.profile == "full")
    write_json(store, RUN, run)
    publish_index(store, counts.shards, profile=config.profile, name=config.write.dataset_name,
                  members=records.sample_members(config.features.enabled),
                  selection=None if selection is None else _selection_entry(selection))
    if selection is not None:
        # jobs/refilter.py changed the thresholds of this output earlier: kept for the new inputs.
        print(f"[curate] re-applied the refilter thresholds of {store.uri(REFILTER_STATE_NAME)}: "
              f"{selection.report['kept']} clips kept", file=sys.stderr, flush=True)
    if config.profile == "smoke":
        print("[curate] note: smoke profile: SyncNet has random weights, so the lip-sync rules "
              "(filters.sync_conf_min, filters.sync_offset_abs_max) were not applied; scores are still recorded",
              file=sys.stderr, flush=True)
    print(f"[curate] done: {summary['inputs']} inputs ({summary['input_hours']:.3f} h) -> {summary['clips_kept']} clips "
          f"kept ({summary['kept_hours']:.3f} h) in {summary['shards']} shards; {summary['inputs_rejected']} inputs and "
          f"{summary['clips_rejected']} clips rejected; {elapsed:.1f} s. Output: {store.url}", file=sys.stderr, flush=True)
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
