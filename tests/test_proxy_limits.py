"""Issue 12, points 8 and 9, end to end: a real `twistd -n deploy-proxy` and the real
`deploy-client` in front of fake agents on 127.0.0.x — agents that accept and never answer, one
whose answer is larger than its order's limit, one answering 200,000 nested `[` — and an
in-process proxy whose total answer budget is small enough to reach on loopback.

The proxy answers by its [client] deadline, before its client gives up, with a result for every
agent; what an agent sends cannot exhaust the proxy nor crash the client."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from deploy.config import load_proxy_config
from deploy.proxy import ProxyFactory, ProxyService
from tests.conftest import Daemons
from tests.harness import (
    DATA,
    ProxyProcess,
    ScriptedServer,
    free_port,
    run_client,
    tool,
    wait_until,
)
from tests.test_client import FakeAgent, answer, json_response, response

KEY = "limitskey0000000000000000000000001"
SILENT = [f"127.0.0.{i}" for i in range(20, 32)]  # accept, read, never answer
GOOD = "127.0.0.32"  # answers a captured status at once
BIG = "127.0.0.33"  # a status answer of 1.5 MiB: over the proxy's 1 MiB for a status
NESTED = "127.0.0.34"  # 200,000 nested `[`
NESTED_BODY = b"[" * 200_000
PROCESS_TIMEOUT = re.compile(r"Process Timeout\([0-9.]+\)!")
NOT_ORDERED = "(not ordered before the deadline)"


def proxy_ini(port: int, api: Path, client: str) -> str:
    return (
        f"[server]\naddr = 127.0.0.1\nport = {port}\nsocket_timeout = 5\n"
        f"[client]\nsocket_timeout = 2\n{client}\n"
        "[allow::hosts]\nhost[] = 127.0.0.0/8\n"
        f"[api]\npath = {api}\n"
    )


@dataclass
class Agents:
    silent: list[ScriptedServer]
    good: ScriptedServer
    big: ScriptedServer
    nested: ScriptedServer

    def address(self, server: ScriptedServer) -> str:
        return f"{server.host}:{server.port}"


@dataclass
class Proxies:
    agents: Agents
    shares: ProxyProcess  # deadline 4 s, 4 agents at once
    cut: ProxyProcess  # deadline 2.5 s, 2 agents at once: not every agent can be ordered


@pytest.fixture(scope="module")
def proxies(module_daemons: Daemons):
    work = module_daemons.workdir
    good_reply = (DATA / "wire" / "agent-status-in-sync.response").read_bytes()
    big_reply = json_response({"return": "true", "content": "x" * (1536 * 1024)})
    servers: list[ScriptedServer] = []
    try:
        agents = Agents(
            silent=[ScriptedServer(host, 0, None) for host in SILENT],
            good=ScriptedServer(GOOD, 0, good_reply),
            big=ScriptedServer(BIG, 0, big_reply),
            nested=ScriptedServer(NESTED, 0, response(200, NESTED_BODY)),
        )
        servers += [*agents.silent, agents.good, agents.big, agents.nested]
        late = [agents.address(s) for s in agents.silent] + [agents.address(agents.good)]
        api = work / "api.ini"
        api.write_text(
            f"[keys]\n{KEY}[] = late,big,nested\n[servers]\n"
            + "".join(f"late[] = {h}\n" for h in late)
            + f"big[] = {agents.address(agents.big)}\nbig[] = {agents.address(agents.good)}\n"
            + f"nested[] = {agents.address(agents.nested)}\n"
            + f"nested[] = {agents.address(agents.good)}\n"
        )
        started = []
        for client in (
            "deadline = 4\nthread_timeout = 30\nmax_parallel = 4",
            "deadline = 2.5\nthread_timeout = 30\nmax_parallel = 2",
        ):
            port = free_port()
            started.append(
                module_daemons.proxy(proxy_ini(port, api, client), "127.0.0.1", port, wait=False)
            )
        for proxy in started:
            proxy.wait_listening(proxy.host, proxy.port)
        yield Proxies(agents, *started)
    finally:
        for s in servers:
            s.close()


def order(proxy: ProxyProcess, group: str, *extra: str) -> tuple[Any, float]:
    """deploy-client's status of `group` through `proxy`, with its default wait for a proxy
    (60 s): (the run, seconds it took)."""
    start = time.monotonic()
    run = run_client(
        f"--hosts={proxy.address}",
        f"--api-key={KEY}",
        f"--args=groups:{group}",
        "--order=status",
        "--options=web",
        *extra,
        timeout=90,
    )
    return run, time.monotonic() - start


def agents_of(run: Any, proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    entry = run.entry(proxy.address, "status")
    assert entry["returnCode"] == "200", entry
    return {host: per_order["status"] for host, per_order in entry["content"].items()}


# -------------------------------------------------------------------------------- point 8


def test_silent_agents_ahead_of_a_good_one_share_the_deadline(proxies):
    """Twelve agents that accept and never answer ahead of a good one, 4 at once, thread_timeout
    30 s, deadline 4 s: with thread_timeout alone the good agent would be ordered after 90 s and
    deploy-client would give up at 60 s with nothing. Each silent agent gets its share of the
    deadline instead: the proxy answers within it, the good agent's status is there, every
    silent agent is a `Process Timeout(N)!` and its connection is closed."""
    agents, proxy = proxies.agents, proxies.shares
    accepted = [len(s.accepted) for s in agents.silent]
    run, seconds = order(proxy, "late")
    assert run.rc == 3, run.stdout + run.stderr  # some agents timed out, none failed
    assert seconds < 4 + 4, f"answered after {seconds:.1f} s"
    got = agents_of(run, proxy)
    assert list(got) == [agents.address(s) for s in [*agents.silent, agents.good]]
    good = got[agents.address(agents.good)]
    assert good["serverStatus"] == 1 and good["content"]["return"] == "true"
    for server in agents.silent:
        entry = got[agents.address(server)]
        assert entry["serverStatus"] == 0 and PROCESS_TIMEOUT.fullmatch(entry["content"]), entry
    for server, before in zip(agents.silent, accepted, strict=True):
        assert len(server.accepted) == before + 1
        wait_until(
            lambda s=server: len(s.closed) == len(s.accepted),
            10,
            what=f"the proxy to close its connection to {server.host}",
        )


def test_agents_still_waiting_for_a_slot_at_the_deadline_are_reported_not_ordered(proxies):
    """2 at once and a 2.5 s deadline for 13 agents: a share is at least 1 s, so some agents
    are never ordered. The proxy still answers at its deadline with a reason for every agent:
    `Process Timeout(2.5)!` for those in flight, `... (not ordered before the deadline)` for
    the rest, which were never connected to."""
    agents, proxy = proxies.agents, proxies.cut
    accepted = {s.host: len(s.accepted) for s in [*agents.silent, agents.good]}
    run, seconds = order(proxy, "late", "--format=json")
    assert run.rc == 3, run.stdout + run.stderr
    assert seconds < 2.5 + 4, f"answered after {seconds:.1f} s"
    got = agents_of(run, proxy)
    assert len(got) == 13
    assert all(e["serverStatus"] == 0 for e in got.values())
    assert all(PROCESS_TIMEOUT.match(e["content"]) for e in got.values()), got
    not_ordered = [h for h, e in got.items() if e["content"].endswith(NOT_ORDERED)]
    assert agents.address(agents.good) in not_ordered
    assert len(not_ordered) >= 5, got
    for server in [*agents.silent, agents.good]:
        ordered = len(server.accepted) - accepted[server.host]
        assert ordered == (0 if agents.address(server) in not_ordered else 1), server.host


# -------------------------------------------------------------------------------- point 9


def bad_agents_answer(proxies: Proxies, group: str, bad: ScriptedServer) -> str:
    """deploy-client's status of `group`, `bad` and the good agent, through the proxy: exit 2
    (failed), `bad` without an answer (serverStatus 0), the good agent's status there; what
    `bad` got instead."""
    agents, proxy = proxies.agents, proxies.shares
    run, _ = order(proxy, group)
    assert run.rc == 2, run.stdout + run.stderr
    got = agents_of(run, proxy)
    assert got[agents.address(agents.good)]["content"]["return"] == "true"
    assert got[agents.address(bad)]["serverStatus"] == 0
    return got[agents.address(bad)]["content"]


def test_an_agents_answer_over_its_orders_limit_is_its_error_and_the_others_arrive(proxies):
    """A status answer of 1.5 MiB (the proxy keeps at most 1 MiB of one): that agent's
    `bad answer`, the good agent's status arrives; deploy-client says failed (exit 2)."""
    big = proxies.agents.big
    assert bad_agents_answer(proxies, "big", big) == (
        f"bad answer from {big.host}:{big.port}: a status answer larger than 1048576 bytes"
    )


def test_two_hundred_thousand_nested_brackets_are_that_agents_error_through_the_proxy(proxies):
    """200,000 nested `[` from one agent: its error in the proxy's answer; the other agent's
    status arrives; the table names it failed, without a traceback."""
    content = bad_agents_answer(proxies, "nested", proxies.agents.nested)
    assert content.endswith("JSON nested more than 64 levels deep")
    proxy = proxies.shares
    table, _ = order(proxy, "nested", "--format=table")
    assert table.rc == 2 and "Traceback" not in table.stderr, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(NESTED))
    assert row.split()[3] == "failed", table.stdout


@pytest.mark.parametrize("client", ["plain", "twisted"])
def test_two_hundred_thousand_nested_brackets_straight_to_deploy_client(proxies, client):
    """The same answer straight from an agent, to both clients (--debug takes the Twisted one):
    that host's error, the other host's answer printed, exit 2, no traceback."""
    agents = proxies.agents
    nested, good = agents.address(agents.nested), agents.address(agents.good)
    extra = ["--debug"] if client == "twisted" else []
    run = run_client(f"--hosts={nested},{good}", "--order=status", "--options=web", *extra)
    assert run.rc == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert run.entry(nested, "status")["content"] == (
        f"bad answer from {nested}: JSON nested more than 64 levels deep"
    )
    assert run.content(good, "status")["return"] == "true"


@pytest_twisted.ensureDeferred
async def test_the_proxys_total_budget_refuses_the_answer_that_would_pass_it(tmp_path) -> None:
    """A proxy holding at most 3 MiB of answers at once, four agents answering 0.9 MiB each:
    three are kept, the fourth is that agent's error, and once the order is answered the
    budget is whole again. (The proxy runs in this process, to set a budget loopback can
    reach; deploy-client is the real one.)"""
    size = 900 * 1024
    reply = json_response({"return": "true", "content": "x" * size})
    fakes = [FakeAgent(answer(reply)) for _ in range(4)]
    api = tmp_path / "api.ini"
    api.write_text(
        f"[keys]\n{KEY}[] = four\n[servers]\n" + "".join(f"four[] = {f.address}\n" for f in fakes)
    )
    ini = tmp_path / "proxy.ini"
    ini.write_text(proxy_ini(3441, api, "thread_timeout = 30"))  # it listens below
    service = ProxyService(load_proxy_config(str(ini)), reactor, answers_total=3 * 1024 * 1024)
    listening = reactor.listenTCP(0, ProxyFactory(service), interface="127.0.0.1")
    port = listening.getHost().port
    try:
        out, err, rc = await getProcessOutputAndValue(
            tool("deploy-client"),
            (
                f"--hosts=127.0.0.1:{port}",
                f"--api-key={KEY}",
                "--args=groups:four",
                "--order=status",
                "--options=web",
            ),
            env=dict(os.environ),
            reactor=reactor,
        )
    finally:
        await listening.stopListening()
        for f in fakes:
            await f.stop()
    assert rc == 2, out + err
    got = json.loads(out)[f"127.0.0.1:{port}"]["status"]["content"]
    refused = [h for h, e in got.items() if e["status"]["serverStatus"] == 0]
    assert len(refused) == 1, got.keys()
    assert got[refused[0]]["status"]["content"] == (
        f"bad answer from {refused[0]}: the answers held at once would pass 3145728 bytes"
    )
    kept = [e["status"]["content"]["content"] for h, e in got.items() if h not in refused]
    assert sorted(len(c) for c in kept) == [size] * 3
    assert service.answers.held == 0, "the order's answers were not given back"
