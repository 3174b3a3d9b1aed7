"""Load on one agent (issue 7, item 4): rounds of 500 concurrent orders, `exec` of /bin/true,
`status` (a real rsync dry run against a real rsync daemon) and both mixed, sent at once with
the real `OrderClient`. Zero errors are required; prints and writes the latency percentiles to
bench/LOAD.md. Loopback only; every count and wait is bounded; the rsync daemon and the agent it
starts are stopped by pid at the end.

    python bench/load.py [--requests 500] [--backlog 128] [--output bench/LOAD.md]

Other scenarios, each writing its own section of bench/LOAD.md:

    python bench/load.py --scenario proxy-dead-hosts [--hosts 400] [--no-compare]
        a proxy order to 400 agents that never answer and one real agent (bench/load_proxy.py)
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, task

from bench import load_proxy
from deploy.client import ClientOptions, HostResult, Order, OrderClient
from deploy.testing import AgentProcess, RsyncDaemon, agent_ini, free_port, make_tree

BENCH = Path(__file__).resolve().parent
JOBS = "[application]\napp:true = /bin/true\n"
TREE_FILES = 200
PER_REQUEST_TIMEOUT = 120.0  # the client gives a host up after this: counted as an error
AGENT_LOG_TAIL = 2000


@dataclass
class Round:
    """One round: its orders, the latency of each answer, and what went wrong."""

    name: str
    orders: list[Order]
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
        return ordered[index]


def check(order: Order, result: HostResult, files: int) -> str | None:
    """What is wrong with one answer, or None."""
    if not result.http_ok:
        return f"{order.order}: {result.code} {result.content!r}"[:300]
    content = result.content
    if not isinstance(content, dict) or content.get("return") != "true":
        return f"{order.order}: {content!r}"[:300]
    if order.order == "exec" and content.get("exitCode") != 0:
        return f"exec: exit code {content.get('exitCode')}"
    if order.order == "status" and content.get("transferFilesCount") != str(files):
        return f"status: {content.get('transferFilesCount')} files, expected {files}"
    return None


@defer.inlineCallbacks
def run_round(reactor: Any, client: OrderClient, address: str, round_: Round, files: int):
    """Send every order of the round at once; wait for all of them."""

    def timed(order: Order) -> defer.Deferred[None]:
        started = time.monotonic()

        def done(result: HostResult) -> None:
            round_.latencies.append(time.monotonic() - started)
            problem = check(order, result, files)
            if problem:
                round_.errors.append(problem)

        return client.send(address, order).addCallback(done)

    started = time.monotonic()
    results = yield defer.DeferredList([timed(o) for o in round_.orders], consumeErrors=True)
    round_.wall = time.monotonic() - started
    for ok, failure in results:
        if not ok:
            round_.errors.append(f"client failure: {failure.getErrorMessage()}")


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def report(rounds: list[Round], args: argparse.Namespace, facts: dict[str, Any]) -> str:
    lines = [
        "# Load on one agent (issue 7)",
        "",
        f"Written by `python bench/load.py --requests {args.requests} --backlog {args.backlog}`"
        f" on {facts['date']}. One `twistd -n deploy-agent` on 127.0.0.1, one rsync daemon, and",
        "this script's `OrderClient` sending every order of a round at once (one connection",
        "each, signed as deploy-client signs). `exec` runs `/bin/true` from the jobs file;",
        f"`status` is a real `rsync --dry-run --stats` of a {facts['files']}-file tree against",
        "the rsync daemon. Latency is from the send to the parsed answer, connect included.",
        "",
        "| machine | |",
        "|---|---|",
        f"| nproc | {os.cpu_count()} |",
        f"| python | {platform.python_version()} |",
        f"| kernel | {platform.release()} |",
        f"| rsync | {facts['rsync']} |",
        f"| agent config | socket_timeout = 5, backlog = {args.backlog} (128 is the default), "
        "max_prefork = 0 (no limit) |",
        "",
        "| round | requests at once | errors | p50 | p90 | p99 | max | wall | requests/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        rate = len(r.latencies) / r.wall if r.wall else 0.0
        lines.append(
            f"| {r.name} | {len(r.orders)} | {len(r.errors)} | {r.percentile(50):.3f} s "
            f"| {r.percentile(90):.3f} s | {r.percentile(99):.3f} s | {max(r.latencies):.3f} s "
            f"| {r.wall:.2f} s | {rate:.0f} |"
        )
    lines += [
        "",
        f"Agent peak RSS (VmHWM): {facts['rss']}. Errors in total: {facts['errors']}"
        + (" (zero required: **FAILED**)." if facts["errors"] else " (zero required: met)."),
    ]
    for r in rounds:
        for problem in r.errors[:5]:
            lines.append(f"- {r.name}: {problem}")
    lines += [
        "",
        "The answers of a round come in one wave (p50 close to max): the agent forks the",
        "children of a burst one after another in its event loop, each fork blocking it for a",
        "moment, so every answer waits for the last fork of the burst (about 2.5 ms per `exec`",
        "here). `max_prefork` bounds a burst: beyond it the agent answers 503 at once.",
        "",
    ]
    return "\n".join(lines)


def rsync_version() -> str:
    """The first line of `rsync --version`."""
    out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.partition("\n")[0].strip()


def raise_fd_limit(needed: int) -> None:
    """This process holds one socket per request in flight."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def write_section(path: Path, name: str, text: str) -> None:
    """Put `text` in `path` between `<!-- name -->` and `<!-- /name -->`, replacing what was
    there, keeping the other scenarios' sections."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        before, _, rest = old.partition(start)
        _, _, after = rest.partition(end)
        new = before + block.rstrip("\n") + after
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    path.write_text(new)


@defer.inlineCallbacks
def proxy_dead_hosts(reactor: Any, args: argparse.Namespace):
    raise_fd_limit(4 * args.hosts + 256)
    work = Path(tempfile.mkdtemp(prefix="deploy-load-proxy-"))
    started: list[Any] = []
    try:
        text, errors = yield load_proxy.main(reactor, args, work, started)
        write_section(Path(args.output), load_proxy.SECTION, text)
        print(f"written to {args.output}; {len(errors)} errors: {errors}")
        return 0 if not errors else 1
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)


@defer.inlineCallbacks
def main(reactor: Any, args: argparse.Namespace):
    if args.scenario == load_proxy.SECTION:
        return (yield proxy_dead_hosts(reactor, args))
    raise_fd_limit(4 * args.requests + 256)
    work = Path(tempfile.mkdtemp(prefix="deploy-load-"))
    started: list[Any] = []
    exit_code = 1
    try:
        tree = make_tree(work / "tree", files=TREE_FILES, size=1000)
        targets = work / "targets"
        targets.mkdir()
        (work / "jobs.ini").write_text(JOBS)
        rsyncd = RsyncDaemon(work, {"DEST": tree})
        started.append(rsyncd)
        port = free_port()
        ini = agent_ini(
            host="127.0.0.1",
            port=port,
            state=work / "state",
            allow_paths=[targets],
            groups={
                "web": {
                    "dest": rsyncd.url("DEST"),
                    "src": targets / "web",
                    "option": [f"--port={rsyncd.port}", "--archive", "--delete"],
                }
            },
            jobs=work / "jobs.ini",
            server={"backlog": args.backlog},
        )
        agent = AgentProcess(work, ini, "127.0.0.1", port)
        started.append(agent)
        client = OrderClient(
            reactor, ClientOptions(port=port, thread_timeout=PER_REQUEST_TIMEOUT, socket_timeout=10)
        )
        address = f"127.0.0.1:{port}"
        n = args.requests
        exec_order, status_order = Order("exec", "app:true"), Order("status", "web")
        rounds = [
            Round("warm-up (not counted)", [exec_order, status_order] * 5),
            Round("exec /bin/true", [exec_order] * n),
            Round("status (rsync dry run)", [status_order] * n),
            Round("exec + status mixed", [exec_order, status_order] * (n // 2)),
        ]
        for r in rounds:
            yield run_round(reactor, client, address, r, TREE_FILES)
            print(
                f"{r.name:24} {len(r.orders):4} at once: {len(r.errors)} errors, "
                f"p50 {r.percentile(50):.3f} s  p90 {r.percentile(90):.3f} s  "
                f"p99 {r.percentile(99):.3f} s  max {max(r.latencies):.3f} s  "
                f"wall {r.wall:.2f} s",
                flush=True,
            )
        counted = rounds[1:]
        errors = sum(len(r.errors) for r in counted) + len(rounds[0].errors)
        alive = agent.proc.poll() is None
        if not alive:
            errors += 1
            print(f"the agent died:\n{agent.log_text()[-AGENT_LOG_TAIL:]}")
        rss = peak_rss_mib(agent.pid)
        facts = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "files": TREE_FILES,
            "rsync": rsync_version(),
            "rss": f"{rss:.0f} MiB" if rss is not None else "unknown",
            "errors": errors,
        }
        text = report(counted, args, facts)
        write_section(Path(args.output), "agent", text)
        print(f"written to {args.output}; {errors} errors")
        exit_code = 0 if errors == 0 else 1
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)
    return exit_code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="orders at once per round")
    parser.add_argument("--backlog", type=int, default=128, help="the agent's listen backlog")
    parser.add_argument("--output", default=str(BENCH / "LOAD.md"))
    parser.add_argument(
        "--scenario", choices=["agent", load_proxy.SECTION], default="agent", help="what to load"
    )
    parser.add_argument(
        "--hosts", type=int, default=400, help="proxy-dead-hosts: agents that never answer"
    )
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="proxy-dead-hosts: also run with deadline = 0, as before (+60 s)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 5000:
        parser.error("--requests must be between 1 and 5000")
    if not 1 <= args.hosts <= 4000:
        parser.error("--hosts must be between 1 and 4000")
    return args


if __name__ == "__main__":
    options = parse_args()
    task.react(lambda reactor: main(reactor, options))
