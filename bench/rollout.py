"""Rollouts (issue 13), on loopback, kept out of the CI run: `deploy` of a FILES-file release
to AGENTS real agents in release mode through a real deploy-proxy with --batch=BATCH, against
the same `deploy` to one host, measured in the same run (target: total <= 3x one host for three
batches).

    .venv/bin/python bench/rollout.py [--agents 30] [--batch 10] [--files 200]

Appends its figures to bench/RESULTS.md (section "Rollouts")."""

from __future__ import annotations

import argparse
import json
import os
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


def deploy(via: list[str], args: str, release: str) -> tuple[float, int, dict[str, float]]:
    started = time.perf_counter()
    run = subprocess.run(
        [tool("deploy-client"), *via, f"--args={args}", "--order=deploy", "--options=web"]
        + [f"--release={release}", "--format=json", "--batch=10"],
        capture_output=True,
        timeout=900,
    )
    took = time.perf_counter() - started
    result = json.loads(run.stdout) if run.stdout.startswith(b"{") else {}
    seconds = {h: e["deploy"]["content"]["seconds"] for h, e in result.items()}
    return took, run.returncode, seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--agents", type=int, default=30)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--files", type=int, default=200)
    args = p.parse_args()
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
        deploy(via, "groups:one", "warm")  # the first release of host 0: conversion, caches
        (tree / "VERSION").write_text("one\n")
        one, rc1, _ = deploy(via, "groups:one", "one")
        (tree / "VERSION").write_text("all\n")
        total, rc, seconds = deploy(via, "groups:grp", "all")
        ratio = total / one
        line = (
            f"\n## Rollouts ({time.strftime('%Y-%m-%d')})\n\n"
            f"`deploy` of a {args.files}-file release through a real proxy, release mode, "
            f"--batch={args.batch}: one host {one:.2f}s (exit {rc1}); {args.agents} hosts "
            f"{total:.2f}s (exit {rc}) = {ratio:.2f}x one host (target <= 3x). Per-host times "
            f"(each host's own, from the proxy): min {min(seconds.values()):.2f}s, "
            f"max {max(seconds.values()):.2f}s. Machine: {os.cpu_count()} cores, shared.\n"
        )
        print(line)
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(line)
        return 0 if rc == 0 and ratio <= 3 else 1
    finally:
        for d in reversed(started):
            d.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
