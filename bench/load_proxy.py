"""Load on the proxy (issue 12, point 8): one order through a real `twistd -n deploy-proxy` with
its default [client] settings to 400 agents that accept and never answer and, behind them, one
real `twistd -n deploy-agent`; sent by the real `deploy-client` with its default wait for a proxy
(60 s). Measures when the answer comes, what it says for each agent, the proxy's peak RSS, and
(`--compare`) the same order with `deadline = 0`, as before the deadline existed.

The silent agents listen in this process (127.0.1.1 and up, one port); the proxy and the agent
are stopped by their pids at the end. Run by `python bench/load.py --scenario proxy-dead-hosts`;
the figures go in their own section of bench/LOAD.md."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.utils import getProcessOutputAndValue

from bench.lib import hwm_mb
from deploy.testing import AgentProcess, ProxyProcess, agent_ini, free_port, tool

SECTION = "proxy-dead-hosts"
KEY = "benchkey00000000000000000000000001"
FIRST_SILENT = ipaddress.IPv4Address("127.0.1.1")
JOBS = "[application]\napp:true = /bin/true\n"
CLIENT_WAIT = 60  # deploy-client's default wait for a proxy (deploy.clientrun)


class Silent(protocol.Protocol):
    """Accepts, reads the order, never answers; notes when the proxy closes."""

    factory: SilentFactory

    def connectionMade(self) -> None:
        self.factory.accepted += 1

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.closed += 1


class SilentFactory(protocol.Factory):
    protocol = Silent
    noisy = False

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = 0


@dataclass
class Run:
    """One order through one proxy: what deploy-client said and when."""

    label: str
    deadline: float | None  # None: the proxy's default (50 s), not written in its config
    seconds: float = 0.0
    rc: int | None = None
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    proxy_entry: dict[str, Any] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    silent_accepted: int = 0
    silent_closed: int = 0

    def timeouts(self) -> list[float]:
        """The N of every agent's `Process Timeout(N)!`."""
        found = []
        for entry in self.agents.values():
            match = re.match(r"Process Timeout\(([0-9.]+)\)!", str(entry.get("content")))
            if match and entry.get("serverStatus") == 0:
                found.append(float(match.group(1)))
        return found

    def reasons(self) -> Counter[str]:
        """How many agents got each kind of answer (the numbers in the text folded)."""
        found: Counter[str] = Counter()
        for entry in self.agents.values():
            content = entry.get("content")
            if entry.get("serverStatus") == 1:
                found["answered"] += 1
            elif isinstance(content, str):
                found[re.sub(r"\([0-9.]+\)", "(N)", content)] += 1
        return found


def peak_rss_mib(pid: int) -> float | None:
    try:
        return hwm_mb(pid)
    except (OSError, KeyError):
        return None


def proxy_ini(port: int, agent_port: int, api: Path, deadline: float | None) -> str:
    """The proxy's defaults ([client] thread_timeout 10, socket_timeout 5, max_parallel 64,
    deadline 50), only the deadline set when compared."""
    client = f"port = {agent_port}\n"
    if deadline is not None:
        client += f"deadline = {deadline:g}\n"
    return (
        f"[server]\naddr = 127.0.0.1\nport = {port}\n"
        f"[client]\n{client}"
        "[allow::hosts]\nhost[] = 127.0.0.0/8\n"
        f"[api]\npath = {api}\n"
    )


@defer.inlineCallbacks
def order_through(
    reactor: Any, work: Path, run: Run, api: Path, agent_port: int, silent: SilentFactory
) -> Any:
    """Start a proxy, send the order with deploy-client, stop the proxy."""
    port = free_port()
    proxy = ProxyProcess(work, proxy_ini(port, agent_port, api, run.deadline), "127.0.0.1", port)
    accepted, closed = silent.accepted, silent.closed
    try:
        started = time.monotonic()
        out, err, rc = yield getProcessOutputAndValue(
            tool("deploy-client"),
            (
                f"--hosts=127.0.0.1:{port}",
                f"--api-key={KEY}",
                "--args=groups:fleet",
                "--order=exec",
                "--options=app:true",
            ),
            env=dict(os.environ),
            reactor=reactor,
        )
        run.seconds = time.monotonic() - started
        run.rc = rc
        try:
            entry = json.loads(out)[f"127.0.0.1:{port}"]["exec"]
        except (ValueError, KeyError):
            entry = {"content": (out + err).decode(errors="replace")[-500:]}
        run.proxy_entry = entry
        if isinstance(entry.get("content"), dict):
            run.agents = {h: per["exec"] for h, per in entry["content"].items()}
        run.peak_rss_mib = peak_rss_mib(proxy.pid)
        # the proxy drops what it gave up on: wait (bounded) for the silent side to see it
        give_up = time.monotonic() + 70
        while silent.closed - closed < silent.accepted - accepted and time.monotonic() < give_up:
            yield deferLater(reactor, 0.2)
        run.silent_accepted = silent.accepted - accepted
        run.silent_closed = silent.closed - closed
    finally:
        proxy.stop()


def deferLater(reactor: Any, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@defer.inlineCallbacks
def main(reactor: Any, args: argparse.Namespace, work: Path, started: list[Any]):
    """Run the scenario; returns (section text, errors)."""
    agent_port = free_port()
    silent = SilentFactory()
    listening = []
    hosts = []
    try:
        for i in range(args.hosts):
            address = str(FIRST_SILENT + i)
            listening.append(reactor.listenTCP(agent_port, silent, interface=address))
            hosts.append(address)
        (work / "jobs.ini").write_text(JOBS)
        good_port = free_port()
        ini = agent_ini(
            host="127.0.0.1",
            port=good_port,
            state=work / "state",
            allow_paths=[work],
            jobs=work / "jobs.ini",
        )
        agent = AgentProcess(work, ini, "127.0.0.1", good_port)
        started.append(agent)
        good = f"127.0.0.1:{good_port}"
        api = work / "api.ini"
        api.write_text(
            f"[keys]\n{KEY}[] = fleet\n[servers]\n"
            + "".join(f"fleet[] = {h}\n" for h in [*hosts, good])
        )
        runs = [Run("deadline 50 s (the default)", None)]
        if args.compare:
            runs.append(Run("deadline = 0 (as before: no deadline)", 0))
        for run in runs:
            yield order_through(reactor, work, run, api, agent_port, silent)
            print(
                f"{run.label}: answered in {run.seconds:.1f} s, rc {run.rc}, "
                f"{len(run.agents)} agents, {dict(run.reasons())}, "
                f"proxy peak RSS {run.peak_rss_mib or 0:.0f} MiB",
                flush=True,
            )
    finally:
        for port in listening:
            yield port.stopListening()
    errors = check(runs[0], good, args.hosts)
    return report(runs, args, good, errors), errors


def check(run: Run, good: str, silent: int) -> list[str]:
    """What the default run must show: an answer within the client's wait, the good agent's
    result, a reason for every silent agent, every silent connection closed."""
    errors = []
    if run.seconds >= CLIENT_WAIT:
        errors.append(f"answered after {run.seconds:.1f} s, not within {CLIENT_WAIT} s")
    if run.agents.get(good, {}).get("serverStatus") != 1:
        errors.append(f"the good agent's result is missing: {run.agents.get(good)!r}"[:300])
    if len(run.agents) != silent + 1:
        errors.append(f"{len(run.agents)} agents in the answer, expected {silent + 1}")
    if run.silent_closed != run.silent_accepted:
        errors.append(f"{run.silent_accepted - run.silent_closed} silent connections left open")
    return errors


def report(runs: list[Run], args: argparse.Namespace, good: str, errors: list[str]) -> str:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## A proxy order to {args.hosts} agents that never answer (issue 12, point 8)",
        "",
        f"Written by `python bench/load.py --scenario {SECTION}"
        f"{'' if args.compare else ' --no-compare'}` on {date}. One `twistd -n deploy-proxy` "
        "with its default [client] settings (thread_timeout 10 s, socket_timeout 5 s, "
        f"max_parallel 64, deadline 50 s); {args.hosts} agents on 127.0.1.1 and up that accept "
        "the connection, read the order and never answer; behind them, last in the group, one "
        f"real `twistd -n deploy-agent` ({good}). The real `deploy-client` sends `exec "
        f"app:true` to the group with its default wait for a proxy ({CLIENT_WAIT} s).",
        "",
        "| run | answer after | deploy-client exit | agents in the answer | the real agent | "
        "what the others got | silent connections closed | proxy peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        got = run.agents.get(good, {})
        real = "answered" if got.get("serverStatus") == 1 else "no result"
        if not run.agents:
            real = "no result"
        others = Counter(run.reasons())
        if got.get("serverStatus") == 1:
            others["answered"] -= 1
        shown = ", ".join(f"{n} × `{reason}`" for reason, n in others.most_common() if n) or (
            f"none: `{str(run.proxy_entry.get('content'))[:60]}`"
        )
        seconds = run.timeouts()
        if seconds:
            shown += f" (N: {min(seconds):g} to {max(seconds):g})"
        rss = f"{run.peak_rss_mib:.0f} MiB" if run.peak_rss_mib is not None else "unknown"
        lines.append(
            f"| {run.label} | {run.seconds:.1f} s | {run.rc} | {len(run.agents)} | {real} | "
            f"{shown} | {run.silent_closed}/{run.silent_accepted} | {rss} |"
        )
    lines += [
        "",
        "Required: the answer within the client's wait, with the real agent's result and a"
        " reason for every other agent, every silent connection closed"
        + (f": **FAILED** ({'; '.join(errors)})." if errors else ": met."),
        "",
        "With thread_timeout alone, 401 agents 64 at once take 7 rounds of 10 s: the client",
        "gives up at 60 s with no result at all while the proxy still waits. With the deadline,",
        "each agent ordered gets its share of the time left (50 s over the 7 rounds: about 7 s)",
        "instead of 10 s, so the agent at the back is ordered too, and whatever has not",
        "answered by 50 s is reported `Process Timeout(50)!` (or not ordered) at 50 s.",
        "",
    ]
    return "\n".join(lines)
