"""A Ray head started with `ray start --head` on loopback, for the tests of `ray job submit`
(tests/test_ray_cluster.py, tests/test_object_store_output.py)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


# Two 2-CPU nodes with placement forced by resources, not left to timing: two detection actors of
# 1.5 CPU cannot share a node, and the 0.5 CPU left on each takes one crop+score actor. Full pools
# wait for all their actors (ray.full_pools_wait_s) before the first input, detection's before
# crop's (Ray Data starts the operators in order), so each node crops clips from the first input on,
# and the write task hands them to its own node's writer (it runs where its block is). Features off.
# tests/test_object_store_output.py and tests/test_ray_cluster.py.
TWO_NODE_PLACEMENT = ("features:\n  enabled: false\n"
                      "ray:\n  full_pools: true\n  full_pools_wait_s: 300\n  detect_actors: 2\n  detect_num_cpus: 1.5\n"
                      "score:\n  actors: 2\n  num_cpus: 0.5\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env(**extra) -> dict:
    """The environment of the head and the `ray` CLI: no AWS_* (a job's storage environment must
    come from its runtime env), no RAY_ADDRESS; Ray 2.5x+ heads require a token by default, and the
    CLI client only sends one in token mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}",
            **extra}


@contextlib.contextmanager
def loopback_ray_head(log: Path, env: dict, num_cpus: int = 2):
    """`ray start --head` on 127.0.0.1 with its own ports (another Ray on this machine, the suite's
    embedded one, holds the defaults), stopped after; yields the job API address once it answers."""
    port, dash = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--num-cpus={num_cpus}", f"--temp-dir={ray_tmp}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            # Ray prints the job API address it actually serves (it may differ from the dashboard port).
            m = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", log.read_text(errors="replace"))
            address = m.group(1) if m else address
            r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the Ray head did not come up: {log.read_text()[-3000:]}")
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def submit(address: str, entrypoint: list[str], env: dict, cwd: Path, runtime_env: dict | None = None,
           timeout: float = 500) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir .` (the documented command), retried while the head's job agent
    is not up yet (the job API answers before it; Ray asks to try again)."""
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    deadline = time.time() + 180  # on a loaded 2-core machine the agent can take a minute or more
    while True:
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", *extra,
                            "--", *entrypoint], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in r.stderr + r.stdout or time.time() > deadline:
            return r
        time.sleep(3)
