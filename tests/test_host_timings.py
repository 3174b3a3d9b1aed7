"""Each host's own time (issue 13): through a proxy every agent's answer carries its own round
trip (`seconds`), which deploy-client shows per row (the proxy's total only from an older proxy);
and `--wait` follows a sync naming its run, so no status poll costs the agent a dry run — against
a real proxy, real agents and a counting rsync, and on a Clock."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from deploy.client import HostResult, Order, TimedSender
from deploy.errors import BadRequest
from deploy.follow import SyncWaiter
from deploy.orders import ClientOptions, FanOutResult
from deploy.output import rows_for
from deploy.proxy import followed_runs, timed_answer
from deploy.table import render_table
from tests.conftest import Daemons
from tests.harness import AgentProcess, ProxyProcess, RsyncDaemon, make_tree
from tests.test_cli_formats import SLOW_JOBS, client, down_host, fleet_proxy, through

FAST_JOBS = "[service]\nservice:echo = /bin/echo %s\n"

# An rsync that notes each run's arguments in its log, then is the real rsync.
COUNTING_RSYNC = '#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nexec {rsync} "$@"\n'


class Fleet:
    """Two agents (`fast`, and `slow` whose echo sleeps), each pulling its groups through a
    counting rsync, and a proxy granting k1 both and a host that is down."""

    def __init__(self, daemons: Daemons) -> None:
        work = self.work = daemons.workdir
        tree = make_tree(work / "tree", files=8, size=500)
        self.rsyncd: RsyncDaemon = daemons.rsyncd({"DEST": tree})
        self.targets = work / "targets"
        self.targets.mkdir()
        self.fast = self._agent(daemons, "fast", FAST_JOBS)
        self.slow = self._agent(daemons, "slow", SLOW_JOBS)
        self.down = down_host()
        servers = [self.fast.address, self.slow.address, self.down]
        self.proxy: ProxyProcess = fleet_proxy(daemons, work, servers)

    def _agent(self, daemons: Daemons, name: str, jobs_text: str) -> AgentProcess:
        work = daemons.workdir
        jobs = work / f"{name}-jobs.ini"
        jobs.write_text(jobs_text)
        rsync = work / f"{name}-rsync"
        rsync.write_text(
            COUNTING_RSYNC.format(log=work / f"{name}-rsync.log", rsync=shutil.which("rsync"))
        )
        rsync.chmod(0o755)
        groups = {
            group: {
                **self.rsyncd.group(self.targets / f"{name}-{group}", "--archive", "--delete"),
                "rsync": rsync,
            }
            for group in ("direct", "proxied")
        }
        return daemons.agent(
            groups=groups, jobs=jobs, state=work / f"state-{name}", allow_paths=[self.targets]
        )

    def rsync_runs(self, name: str, group: str) -> list[str]:
        """The argument lines of the rsyncs agent `name` ran for `group`."""
        path = self.work / f"{name}-rsync.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line for line in lines if f"/{name}-{group}" in line]


@pytest.fixture(scope="module")
def fleet(module_daemons: Daemons) -> Fleet:
    return Fleet(module_daemons)


def test_through_a_proxy_each_agent_row_has_its_own_time(fleet, home):
    """An exec through the proxy where one agent takes a second: each row's seconds is its own
    agent's (the fast one well below the slow one), the down host has its own too, and the
    proxy's answer carries them as `seconds` beside the original keys."""
    args = (*through(fleet.proxy), "--order=exec", "--options=service:echo,1")
    r = client(home, *args, "--format=ndjson")
    assert r.rc == 3, r.stdout + r.stderr
    lines = {d["host"]: d for d in map(json.loads, r.stdout.splitlines()) if "host" in d}
    fast, slow, down = (lines[h] for h in (fleet.fast.address, fleet.slow.address, fleet.down))
    assert (fast["outcome"], slow["outcome"], down["outcome"]) == ("ok", "ok", "unreachable")
    assert slow["seconds"] >= 1.0, slow
    assert fast["seconds"] < slow["seconds"] / 2, (fast, slow)
    assert 0 <= down["seconds"] < slow["seconds"] / 2, down
    assert all(d["via"] == fleet.proxy.address for d in (fast, slow, down))

    raw = client(home, *args).content(fleet.proxy.address, "exec")
    timed = {host: per_order["exec"]["seconds"] for host, per_order in raw.items()}
    assert set(timed) == {fleet.fast.address, fleet.slow.address, fleet.down}
    assert timed[fleet.slow.address] >= 1.0 > timed[fleet.fast.address]
    assert raw[fleet.down]["exec"]["serverStatus"] == 0 and timed[fleet.down] >= 0


def test_wait_polls_without_a_dry_run(fleet, home):
    """--wait names the run it follows in its status polls: the agent answers from its records,
    so the sync is the only rsync it runs (a plain status afterwards is a dry run, counted)."""
    r = client(home, f"--hosts={fleet.fast.address}", "--order=rsync", "--options=direct", "--wait")
    assert r.rc == 0, r.stdout + r.stderr
    content = r.content(fleet.fast.address, "rsync")
    assert content["outcome"] == "ok" and content["lastRsync"]["runId"] == content["runId"]
    polls = fleet.fast.log_text().count("status 'direct' from")
    assert polls >= 1, "--wait never polled status"
    runs = fleet.rsync_runs("fast", "direct")
    assert len(runs) == 1 and "--dry-run" not in runs[0], runs
    status = client(home, f"--hosts={fleet.fast.address}", "--order=status", "--options=direct")
    assert status.rc == 0, status.stdout
    assert ["--dry-run" in line for line in fleet.rsync_runs("fast", "direct")] == [False, True]


def test_wait_through_a_proxy_polls_each_agent_without_a_dry_run(fleet, home):
    """Through the proxy, --wait's polls give each agent its own run (run=AGENT=RUNID,...): no
    agent runs a dry run; each agent's row has its own time until its sync ended."""
    r = client(home, *through(fleet.proxy), "--order=rsync", "--options=proxied", "--wait")
    assert r.rc == 3, r.stdout + r.stderr  # the down host
    agents = r.content(fleet.proxy.address, "rsync")
    for name, agent in (("fast", fleet.fast), ("slow", fleet.slow)):
        entry = agents[agent.address]["rsync"]
        assert entry["content"]["outcome"] == "ok", entry
        assert entry["seconds"] > 0, entry
        runs = fleet.rsync_runs(name, "proxied")
        assert len(runs) == 1 and "--dry-run" not in runs[0], runs
    assert "status 'proxied' for hosts:" in fleet.proxy.log_text()


# ------------------------------------------------------------------- the client's rows, no daemons


def agent_entry(content: Any, seconds: Any = ...) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "return": 1,
        "serverStatus": 1,
        "returnCode": 200,
        "returnString": "OK",
        "content": content,
    }
    if seconds is not ...:
        entry["seconds"] = seconds
    return entry


def proxy_entry(agents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "return": 1,
        "serverStatus": 1,
        "returnCode": "200",
        "returnString": "OK",
        "content": {agent: {"status": entry} for agent, entry in agents.items()},
    }


def test_rows_take_each_agents_seconds_else_the_proxys():
    """A proxy's `seconds` per agent is that row's time (null: none, `-` in the table); from an
    older proxy, without the key, every row falls back to the proxy's own round trip."""
    ok = {"return": "true"}
    answer = proxy_entry(
        {"a": agent_entry(ok, 0.0123), "b": agent_entry(ok, 2.5), "c": agent_entry(ok, None)}
    )
    rows = rows_for("proxy", "status", answer, seconds=3.0)
    assert [(r.host, r.seconds) for r in rows] == [("a", 0.0123), ("b", 2.5), ("c", None)]
    assert all("seconds" not in r.entry for r in rows)  # the original keys, the time apart
    line = rows[0].to_json()
    assert line["seconds"] == 0.012 and list(line).count("seconds") == 1
    assert "seconds" not in rows[2].to_json()
    table = render_table(rows, now=0).splitlines()
    assert [row.split()[8] for row in table[1:4]] == ["0.01s", "2.50s", "-"]

    older = proxy_entry({"a": agent_entry(ok), "b": agent_entry(ok)})
    assert [r.seconds for r in rows_for("proxy", "status", older, seconds=3.0)] == [3.0, 3.0]
    odd = proxy_entry({"a": agent_entry(ok, "fast"), "b": agent_entry(ok, -1)})
    assert [r.seconds for r in rows_for("proxy", "status", odd, seconds=3.0)] == [None, None]


def test_timed_answer_gives_every_agent_its_own_time_or_null():
    """The proxy's answer: each agent's seconds, rounded; null for one never ordered."""
    results = {
        "a": HostResult("a", "exec", 1, 200, "OK", {"return": "true"}),
        "b": HostResult("b", "exec", 0, content="can't connect to b:3440"),
        "c": HostResult("c", "exec", 0, content="skipped", skipped=True),
    }
    answer = timed_answer(FanOutResult(results), {"a": 1.23456, "b": 0.01})
    assert {h: e["exec"]["seconds"] for h, e in answer.items()} == {
        "a": 1.235,
        "b": 0.01,
        "c": None,
    }
    assert answer["a"]["exec"]["returnCode"] == 200 and answer["c"]["exec"]["skipped"] is True


def test_followed_runs_gives_each_host_its_own_run():
    """`run=HOST=RUNID,...`: each host of the order its own run id, others none; malformed: 400."""
    hosts = ["10.0.0.1:3440", "web2"]
    text = "10.0.0.1:3440=a1, web2=b2,other=c3"
    assert followed_runs(text, hosts) == {"10.0.0.1:3440": "a1", "web2": "b2"}
    assert followed_runs("", hosts) == {}
    for bad in ("a1", "=a1", "web2=", "web2=r1", "web2=a1;x"):
        with pytest.raises(BadRequest):
            followed_runs(bad, hosts)


def test_timed_sender_times_each_host_on_its_clock_until_cancelled():
    """TimedSender keeps each host's own time, an answer's or a cancel's (the deadline's)."""

    class Pending:
        options = ClientOptions()

        def __init__(self) -> None:
            self.waiting: dict[str, defer.Deferred[HostResult]] = {}

        def send(self, host: str, order: Order) -> defer.Deferred[HostResult]:
            d: defer.Deferred[HostResult] = defer.Deferred()
            d.addErrback(lambda _f: HostResult(host, order.order, 0, content="cancelled"))
            self.waiting[host] = d
            return d

    clock = Clock()
    inner = Pending()
    timed = TimedSender(inner, clock.seconds)
    sent = {h: timed.send(h, Order("exec")) for h in ("a", "b")}
    clock.advance(0.5)
    inner.waiting["a"].callback(HostResult("a", "exec", 1, 200, "OK", {}))
    clock.advance(1.5)
    sent["b"].cancel()
    assert timed.seconds == {"a": 0.5, "b": 2.0}


# ------------------------------------------------------------------- --wait's polls, on a Clock


class Agents:
    """A sender answering rsync with `started` and status with each run's end; keeps the orders."""

    def __init__(self, started: dict[str, Any], proxy: bool = False) -> None:
        self.options = ClientOptions()
        self.started = started
        self.proxy = proxy
        self.sent: list[Order] = []

    def send(self, host: str, order: Order) -> defer.Deferred[HostResult]:
        self.sent.append(order)
        if order.order == "rsync":
            per_agent = {
                a: {"checksum": "c", "return": "true", **s} for a, s in self.started.items()
            }
        else:
            per_agent = {
                a: {
                    "return": "true",
                    "alreadyRsync": "false",
                    "lastRsync": {"checksum": "c", "outcome": "ok", **s},
                }
                for a, s in self.started.items()
            }
        if not self.proxy:
            return defer.succeed(HostResult(host, order.order, 1, 200, "OK", per_agent["h"]))
        content = {a: {order.order: agent_entry(c, 0.01)} for a, c in per_agent.items()}
        return defer.succeed(HostResult(host, order.order, 1, 200, "OK", content))


def wait_with(sender: Agents, seconds: float = 2.0) -> HostResult:
    clock = Clock()
    results: list[HostResult] = []
    SyncWaiter(sender, clock, 60).send("h", Order("rsync", "web")).addCallback(results.append)
    clock.pump([0.25] * int(seconds / 0.25))
    assert results, "the wait did not end"
    return results[0]


def test_wait_polls_name_the_run_directly_and_through_a_proxy():
    """Status polls carry run=RUNID (directly) or run=AGENT=RUNID,... (to a proxy, only agents
    that named their run); without a runId (an older agent) no run field: a dry run, as before.
    Through a proxy each followed agent's time is its own: its order, then until its sync ended
    (not the proxy's wait for a slot or for the other agents)."""
    direct = Agents({"h": {"runId": "a1"}})
    assert wait_with(direct).content["outcome"] == "ok"
    assert [o.extra.get("run") for o in direct.sent] == [None, "a1"]

    older = Agents({"h": {}})
    assert wait_with(older).content["outcome"] == "ok"
    assert all("run" not in o.extra for o in older.sent)

    proxied = Agents({"a": {"runId": "a1"}, "b": {}, "c": {"runId": "c3"}}, proxy=True)
    result = wait_with(proxied)
    assert [o.extra.get("run") for o in proxied.sent] == [None, "a=a1,c=c3"]
    entries = {a: per_order["rsync"] for a, per_order in result.content.items()}
    assert all(e["content"]["outcome"] == "ok" for e in entries.values())
    # its rsync order's own round trip (the proxy's 0.01), then until its sync's end was seen
    assert {a: e["seconds"] for a, e in entries.items()} == {"a": 0.51, "b": 0.51, "c": 0.51}
