"""Ray start-up for the entry points (jobs/curate.py, jobs/dedup.py).

The library (pipeline/) takes a Ray that is already up: whether to join a cluster or start an
embedded Ray, and how loud Ray and Ray Data are on the console, is the caller's choice, so it
is made here and not as a side effect of run_curation. Tests that call the library directly
start Ray themselves (tests/conftest.py ``ray_local``).
"""
from __future__ import annotations

import logging
import os


def start_ray(config, verbose: bool = False) -> None:
    """Connect to the cluster (``config.ray.address``, RAY_ADDRESS) or start an embedded Ray.

    Not ``verbose``: the workers' own output (TensorFlow Lite / absl banners, library deprecation
    warnings) stays in Ray's worker log files instead of the driver's stream, Ray's INFO lines are
    dropped; Ray Data never draws progress bars (our own progress lines say how far the job is);
    what goes wrong with an input is in its rejects row either way.
    A Ray that is already up (a test's session, a notebook) is used as it is.
    """
    import ray
    import ray.data  # configures the "ray.data" logger on import; adjusted below

    quiet_ray_data(verbose)
    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.WARNING
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
    else:
        # address="local": a Ray of this job's own, not the one `ray start` last left on this machine
        # (ray.init's default attaches to it, and would refuse num_cpus)
        # No usage-stats report (this machine's job is nobody else's business, and it may have no network)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=verbose,
                 logging_level=level,
                 object_store_memory=config.ray.object_store_memory,
                 _system_config=EMBEDDED_SYSTEM_CONFIG)
        resources = ray.cluster_resources()
        size_embedded_pools(config, resources.get("CPU", 1.0), resources.get("memory", 0.0))


# Ray's own work that an embedded Ray does for nobody (measured in docs/benchmarks.md, "Ray overhead,
# pools and memory"): the metrics every worker records and reports to the dashboard agent for a
# Prometheus that is not there; and killing idle workers one second after their task, beyond one
# per CPU, so that each shard-write task (num_cpus=0, beside the stage actors) started a fresh
# Python worker (~1.4 CPU s of imports each, several per round). A cluster is configured by whoever
# started it.
EMBEDDED_SYSTEM_CONFIG = {"enable_metrics_collection": False, "idle_worker_killing_time_threshold_ms": 60_000}


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's console output in this driver process: no progress bars (they garble our progress
    lines and logs), and not ``verbose``: no plan or INFO lines either (its log file, session
    logs/ray-data/ray-data.log, keeps them all)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if verbose:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.ERROR)


# The fields that size the stages' actor pools; a config that sets any of them is taken as it is.
POOL_FIELDS = {"ray": ("full_pools", "detect_actors", "detect_num_cpus", "cpus_per_task"),
               "score": ("actors", "num_cpus")}
CROP_ACTOR_MEMORY = 1.5 * 2**30  # a crop+score actor's peak RSS is ~0.9-1.1 GB (docs/benchmarks.md)


def size_embedded_pools(config, cpus: float, memory: float) -> None:
    """Actor pools for an embedded Ray of ``cpus`` CPUs and ``memory`` bytes for its workers (Ray's
    "memory" resource), unless the config sizes them itself.

    The defaults (one detect and one crop+score actor of one CPU each, grown by Ray Data's
    autoscaler up to ``ray.detect_actors`` / ``score.actors``, both 1) use about two cores
    whatever the machine; on one machine the autoscaler may never add an actor
    (docs/benchmarks.md, "Ray overhead, pools and memory"). Here, from 3 CPUs (after the
    feature actors' own): full pools from the start, ~30% of the CPUs for detect (it takes ~30%
    of the job's CPU), one crop+score actor per remaining CPU, as many as fit in memory. Two CPUs
    keep the defaults: measured there, a second crop+score actor on half a CPU each gained
    nothing (the one crop actor's scoring thread already keeps the second core ~88% busy over
    four rounds) and cost ~5 CPU s of model loading and ~0.9 GB.
    ``config`` is changed in place (run.json shows the sizes used); pool sizes do not change what
    is computed (journal: resource fields).
    """
    if any(set(fields) & getattr(config, section).model_fields_set for section, fields in POOL_FIELDS.items()):
        return
    budget = cpus  # the feature actors (when on) hold their CPUs for the whole run
    if config.features.enabled:
        budget -= config.features.num_cpus * config.features.actors
    if budget < 3:
        return  # the defaults' one actor per stage (see above)
    detect = max(1, round(0.3 * budget))
    rest = budget - detect
    fit = max(1, int((memory - 2**30) // CROP_ACTOR_MEMORY))  # the rest: detect, writers, Ray's own actors
    score = max(1, min(int(rest), fit))
    config.ray = config.ray.model_copy(update={"full_pools": True, "detect_actors": detect})
    config.score = config.score.model_copy(update={"actors": score, "num_cpus": round(rest / score, 3)})
