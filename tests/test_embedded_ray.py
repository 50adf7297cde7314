"""The embedded Ray of jobs/_ray.py (issue 13): Ray's own work that a one-machine run does for
nobody is off, and the stages' pools are sized from the machine unless the config sizes them
(docs/benchmarks.md, "Ray overhead, pools and memory")."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jobs._ray import EMBEDDED_SYSTEM_CONFIG, size_embedded_pools
from pipeline.config import load_config
from pipeline.journal import config_fingerprint

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30


def _pools(config) -> tuple:
    return (config.ray.full_pools, config.ray.detect_actors, config.ray.detect_num_cpus, config.score.actors,
            config.score.num_cpus)


def test_cpus_beyond_two_get_crop_actors_beside_detect():
    config = load_config(None, **{"features.enabled": False})
    before = config_fingerprint(config.model_dump(mode="json"))
    size_embedded_pools(config, 2.0, 8 * GB)
    assert _pools(config) == (False, 1, None, 1, None)  # two CPUs: the defaults (measured, docs/benchmarks.md)
    size_embedded_pools(config, 4.0, 8 * GB)
    # detect keeps one CPU, one crop+score actor per other CPU, started at once
    assert _pools(config) == (True, 1, None, 3, 1.0)
    assert config_fingerprint(config.model_dump(mode="json")) == before  # what is computed is the same
    assert _pools(load_config(None)) == (False, 1, None, 1, None)  # the defaults themselves are untouched


def test_pools_grow_with_cpus_and_stop_at_memory():
    config = load_config(None, **{"features.enabled": False})
    size_embedded_pools(config, 16.0, 64 * GB)
    assert _pools(config) == (True, 5, None, 11, 1.0)
    small = load_config(None, **{"features.enabled": False})
    size_embedded_pools(small, 16.0, 5 * GB)  # (5 - 1) GB / 1.5 GB per crop actor: 2 of them
    assert _pools(small) == (True, 5, None, 2, 5.5)


def test_a_config_that_sizes_pools_or_leaves_no_room_is_kept():
    own = load_config(None, **{"features.enabled": False, "score.actors": 3})
    size_embedded_pools(own, 16.0, 8 * GB)  # room enough to size: the config's own field keeps it as it is
    assert _pools(own) == (False, 1, None, 3, None)
    # the smoke default runs a CPU feature actor: on 2 CPUs one CPU is left, the defaults stay
    features = load_config(None)
    size_embedded_pools(features, 2.0, 8 * GB)
    assert _pools(features) == (False, 1, None, 1, None)
    size_embedded_pools(features, 4.0, 8 * GB)  # 3 CPUs beside the feature actor
    assert _pools(features) == (True, 1, None, 2, 1.0)
    fit = load_config(None)
    size_embedded_pools(fit, 3.0, 8 * GB)  # 2 CPUs beside the feature actor: the defaults
    assert _pools(fit) == (False, 1, None, 1, None)


def test_start_ray_embedded_runs_lean_and_sized(tmp_path):
    """A real embedded Ray from start_ray: metrics collection off, idle workers kept, usage stats
    off, and the config sized for its 4 (logical) CPUs."""
    code = """
import json, os, ray
from jobs._ray import start_ray
from pipeline.config import load_config
config = load_config(None, **{"features.enabled": False, "ray.num_cpus": 4})
start_ray(config)
node = ray._private.worker._global_node
print(json.dumps({"system": node._config, "usage": os.environ.get("RAY_USAGE_STATS_ENABLED"),
                  "pools": [config.ray.full_pools, config.score.actors, config.score.num_cpus]}))
ray.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert {k: got["system"].get(k) for k in EMBEDDED_SYSTEM_CONFIG} == EMBEDDED_SYSTEM_CONFIG
    assert got["usage"] == "0"
    assert got["pools"] == [True, 3, 1.0]
