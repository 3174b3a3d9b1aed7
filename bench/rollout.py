"""Rollouts (issue 13), on loopback, kept out of the CI run: `deploy` of a FILES-file release
to AGENTS real agents in release mode through a real deploy-proxy with --batch=BATCH, against
the same `deploy` to one host, measured in the same run (target: total <= 3x one host for three
batches). Every host first gets one release (its first: the conversion of the live directory, a
full copy), so that the one-host and the all-hosts deploys are the same work: a new release over
one the host already has; one host's time is the median of three such deploys. The CPU time of
the daemons' processes (and of their children: each sync's supervisor and rsync, rsyncd's
connections) is added up per phase.

    .venv/bin/python bench/rollout.py [--agents 30] [--batch 10] [--files 200]

Appends its figures to bench/RESULTS.md (section "Rollouts")."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.testing import (
    AgentProcess,
    ProxyProcess,
    RsyncDaemon,
    agent_ini,
    free_port,
    make_tree,
    tool,
)

HERE = Path(__file__).resolve().parent


TICK = os.sysconf("SC_CLK_TCK")
ONE_HOST_RUNS = 3


def cpu_seconds(pids: list[int], children: bool) -> float:
    """CPU time (user + system) of `pids`, or of their reaped children, so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        first = 13 if children else 11  # cutime cstime, or utime stime
        total += int(fields[first]) + int(fields[first + 1])
    return total / TICK


class Deploys:
    """Runs `deploy-client ... --order=deploy` and keeps the CPU time each run cost."""

    def __init__(
        self, via: list[str], batch: int, daemons: dict[str, tuple[list[int], bool]]
    ) -> None:
        self.via = via
        self.batch = batch
        self.daemons = daemons
        self.cpu: dict[str, float] = {}

    def run(self, args: str, release: str) -> tuple[float, int, dict[str, float]]:
        before = {name: cpu_seconds(*d) for name, d in self.daemons.items()}
        client = os.times()
        started = time.perf_counter()
        run = subprocess.run(
            [tool("deploy-client"), *self.via, f"--args={args}", "--order=deploy"]
            + ["--options=web", f"--release={release}", "--format=json", f"--batch={self.batch}"],
            capture_output=True,
            timeout=900,
        )
        took = time.perf_counter() - started
        after = os.times()
        time.sleep(0.5)  # a supervisor reaped after the answer: its time reaches the agent's
        self.cpu = {n: cpu_seconds(*d) - before[n] for n, d in self.daemons.items()}
        self.cpu["client"] = after.children_user + after.children_system
        self.cpu["client"] -= client.children_user + client.children_system
        result = json.loads(run.stdout) if run.stdout.startswith(b"{") else {}
        seconds = {h: e["deploy"]["content"]["seconds"] for h, e in result.items()}
        return took, run.returncode, seconds

    def cpu_text(self, hosts: int) -> str:
        per_host = sum(v for k, v in self.cpu.items() if k != "client") / hosts
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.cpu.items())
        return f"CPU-s {parts}; {per_host * 1000:.0f} ms per host without the client"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--agents", type=int, default=30)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--files", type=int, default=200)
    args = p.parse_args()
    load = os.getloadavg()[0]  # before our own daemons start
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    started: list[object] = []
    try:
        tree = make_tree(work / "tree", files=args.files, size=4000)
        rsyncd = RsyncDaemon(work, {"DEST": tree})
        started.append(rsyncd)
        hosts = [f"127.0.0.{50 + i}" for i in range(args.agents)]
        port = free_port(hosts[0])
        agents = []
        for host in hosts:
            base = work / host
            (base / "targets").mkdir(parents=True)
            group = rsyncd.group(base / "targets" / "web", "--archive", "--delete")
            group["releases"] = 3
            text = agent_ini(
                host=host,
                port=port,
                state=base / "state",
                allow_paths=[base / "targets"],
                groups={"web": group},
            )
            agents.append(AgentProcess(work, text, host, port, wait=False))
        started.extend(agents)
        for a in agents:
            a.wait_listening(a.host, a.port, timeout=120)
        api = work / "api.ini"
        api.write_text(
            "[keys]\nk = grp,one\n[servers]\n"
            + "".join(f"grp[] = {h}\n" for h in hosts)
            + f"one[] = {hosts[0]}\n"
        )
        pport = free_port()
        proxy = ProxyProcess(
            work,
            f"[server]\naddr = 127.0.0.1\nport = {pport}\nstate_path = {work / 'proxy'}\n"
            f"[client]\nport = {port}\n[allow::hosts]\nhost[] = 127.0.0.0/8\n[api]\npath = {api}\n",
            "127.0.0.1",
            pport,
        )
        started.append(proxy)
        via = [f"--hosts=127.0.0.1:{pport}", "--api-key=k"]
        daemons = {
            "agents": ([a.pid for a in agents], False),
            "their children": ([a.pid for a in agents], True),  # supervisors, with their rsyncs
            "rsyncd": ([rsyncd.pid], True),  # a child per connection
            "proxy": ([proxy.pid], False),
        }
        deploys = Deploys(via, args.batch, daemons)
        # every host's first release (conversion, a full copy), and the daemons' first orders
        first, rc0, _ = deploys.run("groups:grp", "first")
        first_cpu = deploys.cpu_text(args.agents)
        ones = []  # one host's time: the median of ONE_HOST_RUNS (its polls make it jumpy)
        for n in range(ONE_HOST_RUNS):
            (tree / "VERSION").write_text(f"one {n}\n")
            ones.append(deploys.run("groups:one", f"one-{n}")[:2])
        one, rc1 = sorted(ones)[len(ones) // 2]
        one_cpu = deploys.cpu_text(1)
        (tree / "VERSION").write_text("all\n")
        total, rc, seconds = deploys.run("groups:grp", "all")
        ratio = total / one
        line = (
            f"\n### bench/rollout.py, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
            f"`deploy` of a {args.files}-file release through a real proxy, release mode, "
            f"--batch={args.batch}: one host {one:.2f}s (exit {rc1}; the median of "
            f"{', '.join(f'{t:.2f}' for t, _ in ones)}); {args.agents} hosts "
            f"{total:.2f}s (exit {rc}) = {ratio:.2f}x one host (target <= 3x). Per-host times "
            f"(each host's own, from the proxy): min {min(seconds.values()):.2f}s, "
            f"max {max(seconds.values()):.2f}s. Machine: {os.cpu_count()} cores, shared, "
            f"load average {load:.2f} before the bench.\n"
            f"CPU: one host {one_cpu}; {args.agents} hosts {deploys.cpu_text(args.agents)}. "
            f"Before them, every host's first release (cold): {first:.2f}s (exit {rc0}), "
            f"{first_cpu}.\n"
        )
        print(line)
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(line)
        return 0 if rc == 0 and ratio <= 3 else 1
    finally:
        for d in reversed(started):
            d.stop()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
