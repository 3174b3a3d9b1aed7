"""Protecting the source: against a real rsyncd with `max connections = 2`, ten real agents
syncing at once wait and retry (status shows them waiting) and all end ok; the backoff itself
is tested without waiting."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from deploy.source_retry import BACKOFF_MAX, SourceRetry, source_busy
from tests.conftest import Daemons
from tests.harness import ask, make_tree, shared_free_port, tool, wait_until


def test_backoff_doubles_with_jitter_and_stops_at_the_limit() -> None:
    """Delays grow (each within [b/2, b] of a doubling b, at most BACKOFF_MAX) and none is
    given once `limit` seconds have gone by since the source first said it was full."""
    now = [0.0]
    retry = SourceRetry(100.0, monotonic=lambda: now[0], rng=random.Random(3))
    delays = []
    while (delay := retry.delay()) is not None:
        delays.append(delay)
        now[0] += delay
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
    assert all(d <= BACKOFF_MAX for d in delays)
    assert abs(now[0] - 100.0) < 1e-6
    assert source_busy(5, "@ERROR: max connections (2) reached -- try again later")
    assert not source_busy(5, "@ERROR: Unknown module 'X'") and not source_busy(10, "")


def test_ten_agents_against_max_connections_two_all_end_ok(
    daemons: Daemons, tmp_path: Path, home: Path
) -> None:
    """rsyncd with max connections = 2, ten agents syncing at once (--wait): some are turned
    away, status shows them `waiting`, and every sync ends ok (exit 0)."""
    tree = make_tree(tmp_path / "tree", files=20, size=1000)
    rsyncd = daemons.rsyncd({"DEST": tree}, max_connections=2)
    hosts = [f"127.0.0.{30 + i}" for i in range(10)]
    port = shared_free_port(hosts)
    agents = []
    for host in hosts:
        base = tmp_path / host
        (base / "targets").mkdir(parents=True)
        group = rsyncd.group(base / "targets" / "web", "--archive", "--bwlimit=40")
        group["source_retry"] = 120
        agents.append(
            daemons.agent(
                host,
                port,
                groups={"web": group},
                state=base / "state",
                allow_paths=[base / "targets"],
                wait=False,
            )
        )
    for agent in agents:
        agent.wait_listening(agent.host, agent.port)
    client = subprocess.Popen(
        [tool("deploy-client"), "--hosts=" + ",".join(a.address for a in agents)]
        + ["--order=rsync", "--options=web", "--wait", "--format=json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "HOME": str(home)},
    )
    try:

        def someone_waits() -> bool:
            return any(ask(a, "status", "web")[1].get("waiting") for a in agents)

        wait_until(someone_waits, 60, 0.2, what="a sync waiting for the source")
        out, err = client.communicate(timeout=180)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, out.decode() + err.decode()
    assert "max connections" in (tmp_path / "rsyncd.log").read_text()
    for host in hosts:
        assert (tmp_path / host / "targets" / "web" / "d00").is_dir()
