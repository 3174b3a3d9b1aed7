"""`deploy-client --order=rsync --wait`: start the syncs, follow each by polling `status` until it
ends (live progress on a terminal), print each host's `lastRsync`, exit by the syncs' outcomes —
directly and through a proxy, against a real rsync daemon with a slowed transfer."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from deploy.client import ClientOptions, HostResult, Order
from deploy.follow import WAIT_LOST_CONTACT, SyncWaiter
from tests.harness import wait_until
from tests.test_cli_formats import (
    TtyClient,
    clean_env,
    client,
    down_host,
    fleet_proxy,
    through,
)


def add_big_file(tree: Path, size: int) -> None:
    """Make the `webslow` sync (200 KB/s) last about size/200000 seconds."""
    (tree / "big.bin").write_bytes(os.urandom(size))


def test_wait_follows_a_slow_sync_to_ok(site, home):
    """--wait polls status while the sync runs (percent shown on the terminal), then prints
    the rsync answer with the sync's lastRsync and exits 0."""
    add_big_file(site.tree, 500_000)
    run = TtyClient(
        [f"--hosts={site.agent.address}", "--order=rsync", "--options=webslow", "--wait"],
        clean_env(HOME=str(home)),
    )
    rc, out, tty = run.finish()
    assert rc == 0, out + tty
    content = json.loads(out)[site.agent.address]["rsync"]["content"]
    last = content["lastRsync"]
    assert last["outcome"] == "ok" and last["exitCode"] == 0
    assert last["checksum"] == content["checksum"]
    assert last["transferFilesCount"] == 41
    assert content["outcome"] == "ok" and content["return"] == "true"
    # issue 15: the line sums the syncs up instead of listing hosts
    assert "0/1 syncing, 0 done, 0 failed" in tty
    assert "1/1 syncing, 0 done, 0 failed" in tty
    assert re.search(r"1/1 syncing, 0 done, 0 failed, \d+% of bytes", tty), tty
    assert "0/1 syncing, 1 done, 0 failed, 100% of bytes" in tty
    assert (site.targets / "webslow" / "big.bin").stat().st_size == 500_000


def test_wait_on_a_refused_sync_exits_2(site, home):
    """A sync the agent refuses (empty source with --delete) is outcome refused: exit 2."""
    r = client(home, f"--hosts={site.agent.address}", "--order=rsync", "--options=empty", "--wait")
    assert r.rc == 2, r.stdout
    content = r.content(site.agent.address, "rsync")
    assert content["outcome"] == "refused" and content["return"] == "false"


def test_wait_timeout_then_a_busy_target(site, home):
    """--wait-timeout ends the wait with outcome timeout (exit 3) while the sync goes on; a
    second --wait meanwhile is `busy` naming the first run (never adopted as its own: exit 2),
    and rkill ends the first run: lastRsync killed, with that run's id."""
    add_big_file(site.tree, 2_000_000)
    args = [f"--hosts={site.agent.address}", "--order=rsync", "--options=webslow", "--wait"]
    short = client(home, *args, "--wait-timeout=1", "--format=ndjson")
    assert short.rc == 3, short.stdout
    # the result line, after the progress events (issue 15)
    line = [json.loads(x) for x in short.stdout.splitlines() if '"event"' not in x][0]
    assert line["outcome"] == "timeout"
    assert line["content"]["message"] == "still running after --wait-timeout 1s"
    run = line["content"]["runId"]
    second = client(home, *args)
    assert second.rc == 2, second.stdout
    content = second.content(site.agent.address, "rsync")
    assert content["outcome"] == "busy" and content["return"] == "false"
    assert content["alreadyRsync"] == "true" and run in content["message"]
    killed = client(home, f"--hosts={site.agent.address}", "--order=rkill", "--options=webslow")
    assert killed.rc == 0 and killed.content(site.agent.address, "rkill")["process"]

    def last() -> dict | None:
        status = client(
            home, f"--hosts={site.agent.address}", "--order=status", "--options=webslow"
        )
        found = status.content(site.agent.address, "status").get("lastRsync")
        return found if found and found.get("runId") == run else None

    ended = wait_until(last, 30, what="the killed run's lastRsync")
    assert ended["outcome"] == "killed"


def test_wait_through_a_proxy(site, daemons, home, tmp_path):
    """Through a proxy, --wait polls the proxy with status for the agents whose sync runs and
    shows each agent's lastRsync; an agent that is down makes the exit code 3."""
    add_big_file(site.tree, 300_000)
    down = down_host()
    proxy = fleet_proxy(daemons, tmp_path, [site.agent.address, down])
    r = client(home, *through(proxy), "--order=rsync", "--options=webslow", "--wait")
    assert r.rc == 3, r.stdout + r.stderr
    agents = r.content(proxy.address, "rsync")
    ok = agents[site.agent.address]["rsync"]["content"]
    assert ok["lastRsync"]["outcome"] == "ok" and ok["lastRsync"]["checksum"] == ok["checksum"]
    assert agents[down]["rsync"]["serverStatus"] == 0
    polled = f"status 'webslow' for hosts:{site.agent.address} (1 hosts)"
    wait_until(lambda: polled in proxy.log_text(), 10, what="the proxy to log the status polls")
    assert (site.targets / "webslow" / "big.bin").stat().st_size == 300_000


# ------------------------------------------------------------------------- SyncWaiter on a Clock


class ScriptedClient:
    """A sender whose answers come from `script(order, call number)`."""

    def __init__(self, script: Callable[[Order, int], HostResult]) -> None:
        self.options = ClientOptions()
        self.script = script
        self.sent: list[Order] = []

    def send(self, host: str, order: Order) -> defer.Deferred[HostResult]:
        self.sent.append(order)
        return defer.succeed(self.script(order, len(self.sent)))


def answer(order: str, content: Any, status: int = 1) -> HostResult:
    if status == 0:
        return HostResult("h", order, 0, content=content)
    return HostResult("h", order, 1, 200, "OK", content)


STARTED = {"checksum": "c1", "return": "true"}
RUNNING = {"return": "true", "alreadyRsync": "true", "process": ["7"], "checksum": "c1"}


def follow(script: Callable[[Order, int], HostResult], seconds: float, timeout: float = 3600):
    """Run a SyncWaiter over `script` for `seconds` of fake time; its result (or None)."""
    clock = Clock()
    fake = ScriptedClient(script)
    waiter = SyncWaiter(fake, clock, timeout)
    results: list[HostResult] = []
    waiter.send("h", Order("rsync", "web")).addCallback(results.append)
    for _ in range(int(seconds / 0.25)):
        clock.advance(0.25)
    return (results[0] if results else None), fake


def test_waiter_gives_up_after_losing_contact_for_long():
    """A host that stops answering while its sync runs is tolerated for a while (an agent
    restart), then reported unreachable."""

    def script(order: Order, n: int) -> HostResult:
        if order.order == "rsync":
            return answer("rsync", STARTED)
        return answer("status", RUNNING) if n < 4 else answer("status", "can't connect", 0)

    result, fake = follow(script, WAIT_LOST_CONTACT - 5)
    assert result is None, "gave up while the agent might be restarting"
    result, fake = follow(script, WAIT_LOST_CONTACT + 10)
    assert result is not None
    assert result.content["outcome"] == "unreachable"
    assert result.content["message"] == "lost contact while waiting: can't connect"
    assert all(o.order == "status" and o.options == "web" for o in fake.sent[1:])


def test_waiter_needs_the_lastrsync_of_its_own_sync():
    """A sync that ended but whose status shows another job's lastRsync is a failure, not
    someone else's ok; the wait timeout ends a sync that never ends."""

    def other(order: Order, n: int) -> HostResult:
        if order.order == "rsync":
            return answer("rsync", STARTED)
        last = {"checksum": "OTHER", "outcome": "ok"}
        return answer("status", {"return": "true", "alreadyRsync": "false", "lastRsync": last})

    result, _ = follow(other, 2)
    assert result is not None and result.content["outcome"] == "failed"
    assert "no lastRsync" in result.content["message"]

    def forever(order: Order, n: int) -> HostResult:
        return answer("rsync", STARTED) if order.order == "rsync" else answer("status", RUNNING)

    result, _ = follow(forever, 10, timeout=5)
    assert result is not None and result.content["outcome"] == "timeout"


def test_waiter_needs_the_lastrsync_of_its_own_run():
    """With run ids (issue 15), a lastRsync of the same target but another run is not this
    sync's end; the one of its own run is."""

    def script(run_id: str):
        def answers(order: Order, n: int) -> HostResult:
            if order.order == "rsync":
                return answer("rsync", {**STARTED, "runId": "r1"})
            last = {"checksum": "c1", "runId": run_id, "outcome": "ok"}
            return answer("status", {"return": "true", "alreadyRsync": "false", "lastRsync": last})

        return answers

    result, _ = follow(script("r2"), 2)
    assert result is not None and result.content["outcome"] == "failed"
    result, _ = follow(script("r1"), 2)
    assert result is not None and result.content["outcome"] == "ok"
    assert result.content["lastRsync"]["runId"] == "r1"
