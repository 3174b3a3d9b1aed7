"""The benchmark of issue 9, in one command: builds the trees, starts an rsync daemon, agents, a
proxy and a simulated fleet on loopback, measures items 1-5 and writes bench/RESULTS.md and
bench/fanout.png. Every process it starts is stopped by its pid, also on failure.

    python bench/run.py            # full run (~9 min on 2 quiet cores); writes bench/RESULTS.md
    python bench/run.py --quick    # small trees, few repetitions; writes bench/work/quick/

See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lib import (
    BENCH,
    JOBS,
    NODELAY,
    RSYNC_OPTIONS,
    WORK,
    Processes,
    Samples,
    TreeSpec,
    agent_ini,
    api_ini,
    build_tree,
    cpu_seconds,
    hwm_mb,
    parse_answer,
    proxy_ini,
    python_env,
    raw_order,
    reset_hwm,
    rss_mb,
    rsync_groups,
    run_timed,
    slope,
    timed,
    wait_quiet,
)
from deploy.testing import free_port, tool, wait_until

API_KEY = "benchkey0000000000000000000000001"
# Item 3's simulator processes when no sweep picks them: the fastest of 1, 2, 4, 8, 16 on the
# 2-core machine of RESULTS.md (8 and 16 within 0.01 s of each other).
FLEET_PROCESSES = 16
ECHO = "service:echo,hello"


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    quick: bool
    trees: dict[str, TreeSpec]
    reps_overhead: int
    reps_startup: int
    reps_fanout: int
    reps_fleet: int
    reps_sweep: int
    reps_big: int
    fanout: tuple[int, ...]
    fleet: tuple[int, ...]
    fleet_sweep: tuple[int, ...]
    concurrent: int
    out: Path
    plot: Path
    quiet: float = 0.25
    quiet_wait: float = 300.0
    fleet_processes: int = 0  # 0: the fastest of fleet_sweep


def settings(quick: bool) -> Settings:
    """What a run measures: each value below is (--quick, full)."""

    def pick(fast: Any, full: Any) -> Any:
        return fast if quick else full

    out = pick(WORK / "quick", BENCH)
    return Settings(
        quick=quick,
        trees={
            # the full medium tree is ~50 MB
            "medium": pick(TreeSpec("q2k", 2_000, 5_000), TreeSpec("t10k", 10_000, 5_000)),
            "large": pick(TreeSpec("q5k", 5_000, 2_000), TreeSpec("t40k", 40_000, 2_000)),
            "huge": pick(TreeSpec("q15k", 15_000, 1_000), TreeSpec("t150k", 150_000, 1_000)),
            "small": TreeSpec("small", 100, 1_000),
        },
        reps_overhead=pick(3, 15),
        reps_startup=pick(3, 11),
        reps_fanout=pick(2, 7),
        reps_fleet=pick(2, 5),
        reps_sweep=pick(2, 3),
        reps_big=pick(2, 5),
        fanout=pick((1, 5, 10), (1, 10, 50)),
        fleet=pick((50, 200), (200, 1000)),
        # how many processes simulate the fleet: measured, the fastest kept (item 3)
        fleet_sweep=pick((1, 2), (1, 2, 4, 8, 16)),
        concurrent=pick(20, 50),
        out=out / "RESULTS.md",
        plot=out / "fanout.png",
    )


# --------------------------------------------------------------------------- results


@dataclass
class Figure:
    """One reported number, with its target when the issue sets one (value <= target)."""

    item: str
    what: str
    value: float
    unit: str
    target: float | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.value <= self.target

    def shown(self, value: float | None = None) -> str:
        v = self.value if value is None else value
        if self.unit == "x":
            return f"{v:.2f}×"
        if self.unit == "s":
            return f"{v:.3f} s"
        if self.unit == "ms":
            return f"{v:.2f} ms"
        if self.unit == "MB":
            return f"{v:.1f} MB"
        return f"{v:g} {self.unit}"


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, list[str]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    def table(
        self,
        item: str,
        title: str,
        rows: list[tuple[str, Samples]],
        extras: dict[str, dict[str, Samples]] | None = None,
    ) -> None:
        """Wall-time medians (and min/max) per run; `extras` adds a median column per metric
        (CPU seconds of the client, the proxy...)."""
        extras = extras or {}
        metrics = list(dict.fromkeys(m for name, _ in rows for m in extras.get(name, {})))
        head = "| run | median | min | max | n |" + "".join(f" {m} (median) |" for m in metrics)
        lines = [f"**{title}**", "", head, "|---" * (5 + len(metrics)) + "|"]
        for name, s in rows:
            cells = [
                f"{extras[name][m].median:.3f} s" if m in extras.get(name, {}) else "—"
                for m in metrics
            ]
            lines.append(
                f"| {name} | {s.median:.3f} s | {s.low:.3f} s | {s.high:.3f} s | {s.n} |"
                + "".join(f" {c} |" for c in cells)
            )
        self.details.setdefault(item, []).extend([*lines, ""])

    def text(self, item: str, *lines: str) -> None:
        self.details.setdefault(item, []).extend([*lines, ""])


@dataclass
class Fleet:
    """bench/fleet.py's launcher, and the pids of the processes serving the simulated agents."""

    launcher: Any
    workers: list[int]

    def stop(self) -> None:
        self.launcher.stop()


class Failed(Exception):
    """A measurement whose answers were wrong: its numbers would mean nothing."""


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, cfg: Settings, procs: Processes, deadline: float) -> None:
        self.cfg = cfg
        self.procs = procs
        self.deadline = deadline
        self.results = Results()
        self.run_dir = WORK / ("run-quick" if cfg.quick else "run")
        self.logs = self.run_dir / "logs"
        self.sizes: dict[str, tuple[int, int]] = {}
        self.rsync_port = 0
        self.plain_rsync_port = 0
        self.agent_port = free_port("127.0.0.2")
        self.jobs = self.run_dir / "jobs.ini"
        self.env = dict(os.environ, LC_ALL="C")
        self.load: dict[str, tuple[float, float, float]] = {}
        self.extras: dict[str, dict[str, Samples]] = {}

    def check_time(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise RuntimeError(f"time limit reached before {what}")

    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {message}", file=sys.stderr, flush=True)

    # -- set-up

    def setup(self) -> None:
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.logs.mkdir(parents=True)
        self.jobs.write_text(JOBS)
        for role, spec in self.cfg.trees.items():
            self.log(f"tree {spec.name}: {spec.files} files (built once, then reused)")
            started = time.monotonic()
            self.sizes[role] = build_tree(WORK / "trees" / spec.name, spec)
            self.log(
                f"tree {spec.name}: {self.sizes[role][0]} files, "
                f"{self.sizes[role][1] / 1e6:.1f} MB ({time.monotonic() - started:.1f} s)"
            )
        # rsyncd's listen backlog defaults to 5: with 10-50 dry runs at once the kernel drops
        # SYNs and rsync retries a second later (seen as +1 s and +2 s steps in item 2).
        self.rsync_port = self.start_rsyncd(
            "rsyncd", ["socket options = TCP_NODELAY", "listen backlog = 128"]
        )
        # The same, with rsync's default socket options: only for the Nagle figure of item 1.
        self.plain_rsync_port = self.start_rsyncd("rsyncd-defaults", [])

    def start_rsyncd(self, name: str, options: list[str]) -> int:
        port = free_port()
        conf = self.run_dir / f"{name}.conf"
        lines = ["use chroot = no", "max connections = 0", f"log file = {self.logs}/{name}.log"]
        lines += options
        for spec in self.cfg.trees.values():
            module = spec.name.upper()
            lines += [
                f"[{module}]",
                f"    path = {WORK / 'trees' / spec.name}",
                "    read only = yes",
                "    list = yes",
                "    exclude = /.bench-tree",
            ]
        conf.write_text("\n".join(lines) + "\n")
        rsyncd = self.procs.start(
            name,
            [
                "rsync",
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                f"--port={port}",
                "--address=127.0.0.1",
            ],
            self.logs / f"{name}.out",
        )
        rsyncd.wait_listening("127.0.0.1", port)
        return port

    def modules(self) -> list[str]:
        return [spec.name.upper() for spec in self.cfg.trees.values()]

    def group(self, role: str) -> str:
        return self.cfg.trees[role].name

    def twistd(self, plugin: str, ini: Path, log: str) -> list[str]:
        """`twistd -n` running `plugin` with the config `ini`, its log `log`.log in the logs."""
        logfile = f"--logfile={self.logs / f'{log}.log'}"
        return [tool("twistd"), "-n", "--pidfile=", logfile, plugin, "--path", str(ini)]

    def start_agent(self, host: str, port: int, wait: bool = True) -> Any:
        """A real `twistd -n deploy-agent` on host:port with a group per tree and the jobs file."""
        home = self.run_dir / "agents" / host
        targets = home / "targets"
        groups = rsync_groups(self.rsync_port, self.modules(), targets)
        for g in groups.values():
            Path(g["src"]).mkdir(parents=True, exist_ok=True)  # empty: everything is new
        ini = home / "agent.ini"
        ini.write_text(
            agent_ini(
                host=host,
                port=port,
                state=home / "state",
                allow_paths=[targets],
                groups=groups,
                jobs=self.jobs,
            )
        )
        argv = self.twistd("deploy-agent", ini, f"agent-{host}")
        proc = self.procs.start(
            f"agent {host}", argv, self.logs / f"agent-{host}.out", cwd=home, env=python_env()
        )
        if wait:
            proc.wait_listening(host, port)
        return proc

    def start_proxy(self, groups: dict[str, list[str]], name: str) -> tuple[Any, int]:
        port = free_port()
        api = self.run_dir / f"{name}-api.ini"
        api.write_text(api_ini(API_KEY, groups))
        ini = self.run_dir / f"{name}.ini"
        ini.write_text(proxy_ini(host="127.0.0.1", port=port, agent_port=self.agent_port, api=api))
        argv = self.twistd("deploy-proxy", ini, name)
        proc = self.procs.start(
            name, argv, self.logs / f"{name}.out", cwd=self.run_dir, env=python_env()
        )
        proc.wait_listening("127.0.0.1", port)
        return proc, port

    def bare_argv(self, host: str, role: str, defaults: bool = False) -> list[str]:
        """The agent's own dry-run command line for that group, run by hand (`defaults`: the
        same against the rsync daemon with rsync's default socket options, without NODELAY)."""
        from deploy.rsync import RsyncTarget, build_argv

        spec = self.cfg.trees[role]
        socket = (
            (f"--port={self.plain_rsync_port}",)
            if defaults
            else (
                f"--port={self.rsync_port}",
                NODELAY,
            )
        )
        target = RsyncTarget(
            dest=f"127.0.0.1::{spec.name.upper()}/",
            src=str(self.run_dir / "agents" / host / "targets" / spec.name),
            options=(*socket, *RSYNC_OPTIONS),
        )
        argv = build_argv(target, dry_run=True)
        # the agent passes --sockopts=TCP_NODELAY itself: rsync's defaults are without it
        return [a for a in argv if not a.startswith("--sockopts=")] if defaults else argv

    def bare(self, argv: list[str]) -> float:
        run = run_timed(argv, timeout=600, env=self.env)
        if run.rc != 0:
            raise Failed(f"bare rsync exited {run.rc}: {run.stderr[-500:]!r}")
        return run.seconds

    def agent_order(self, host: str, order: str, options: str, expect_files: int = -1) -> float:
        seconds, raw = timed(lambda: raw_order(host, self.agent_port, order, options))
        status, body = parse_answer(raw)
        if status != 200 or not isinstance(body, dict) or body.get("return") != "true":
            raise Failed(f"{order} {options} on {host}: {status} {str(body)[:300]}")
        if expect_files >= 0:
            count = int(body.get("transferFilesCount", -1))
            if count != expect_files:
                raise Failed(f"{order} {options}: {count} files, expected {expect_files}")
            if order == "rlist" and len(body["transferNewFiles"]) != expect_files:
                raise Failed(f"rlist {options}: {len(body['transferNewFiles'])} names listed")
        return seconds

    def client(self, *args: str, hosts: int = 1, proxy: bool = False, timeout: float = 300) -> Any:
        """Run the real deploy-client; check every host answered and succeeded."""
        run = run_timed([tool("deploy-client"), *args], timeout=timeout, env=python_env())
        if run.rc != 0:
            raise Failed(f"deploy-client {' '.join(args)[:200]} exited {run.rc}: {run.stderr!r}")
        answer = json.loads(run.stdout)
        entries = answer
        if proxy:
            (only,) = answer.values()
            (entry,) = only.values()
            entries = entry["content"]
        if len(entries) != hosts:
            raise Failed(f"deploy-client: {len(entries)} hosts answered, expected {hosts}")
        for host, per_order in entries.items():
            for entry in per_order.values():
                content = entry.get("content")
                if entry.get("serverStatus") != 1 or not isinstance(content, dict):
                    raise Failed(f"deploy-client: {host} {str(entry)[:300]}")
                if content.get("return") != "true":
                    raise Failed(f"deploy-client: {host} {str(content)[:300]}")
        return run

    # -- item 1: overhead over rsync, and client start-up

    def item1(self) -> None:
        cfg, res = self.cfg, self.results
        host = "127.0.0.2"
        agent = self.start_agent(host, self.agent_port)
        for role in ("medium", "large"):
            self.check_time(f"item 1 on {role}")
            files = self.sizes[role][0]
            group = self.group(role)
            argv = self.bare_argv(host, role)
            runs: dict[str, Callable[[], float]] = {
                "bare rsync --dry-run": lambda a=argv: self.bare(a),
                "agent status": lambda g=group, n=files: self.agent_order(host, "status", g, n),
                "agent rlist": lambda g=group, n=files: self.agent_order(host, "rlist", g, n),
            }
            samples = self.interleave(runs, cfg.reps_overhead, f"item 1 {group}")
            bare = samples["bare rsync --dry-run"].median
            label = f"{files:,} files"
            res.table("1", f"Agent side, {label} ({group})", list(samples.items()))
            res.add(
                Figure(
                    "1",
                    f"status / bare rsync, agent side, {label}",
                    samples["agent status"].median / bare,
                    "x",
                    1.10,
                ),
                Figure(
                    "1",
                    f"rlist / bare rsync, agent side, {label}",
                    samples["agent rlist"].median / bare,
                    "x",
                    1.20,
                ),
            )
            res.data.setdefault("overhead", {})[group] = {k: v.values for k, v in samples.items()}
            if role == "medium":
                plain = self.bare_argv(host, role, defaults=True)
                nagle = self.interleave(
                    {
                        "bare rsync --dry-run, TCP_NODELAY (as above)": lambda a=argv: self.bare(a),
                        "bare rsync --dry-run, rsync's default socket options": (
                            lambda a=plain: self.bare(a)
                        ),
                    },
                    cfg.reps_overhead,
                    "item 1 Nagle",
                )
                res.table("1", f"rsync's own Nagle stalls, {label}", list(nagle.items()))
                res.add(
                    Figure(
                        "1",
                        f"bare rsync --dry-run, {label}: default socket options / TCP_NODELAY",
                        nagle["bare rsync --dry-run, rsync's default socket options"].median
                        / nagle["bare rsync --dry-run, TCP_NODELAY (as above)"].median,
                        "x",
                        note="no target; why the benchmark sets TCP_NODELAY",
                    )
                )

        self.check_time("item 1 end to end")
        role = "large"
        files = self.sizes[role][0]
        group = self.group(role)
        argv = self.bare_argv(host, role)
        address = f"--hosts={host}:{self.agent_port}"
        runs = {
            "bare rsync --dry-run": lambda: self.bare(argv),
            "deploy-client status": lambda: self.timed_run(
                self.client(address, "--order=status", f"--options={group}")
            ),
        }
        samples = self.interleave(runs, cfg.reps_overhead, "item 1 end to end")
        res.table(
            "1",
            f"End to end through deploy-client, {files:,} files",
            list(samples.items()),
            self.extras,
        )
        res.add(
            Figure(
                "1",
                f"status / bare rsync, end to end via deploy-client, {files:,} files",
                samples["deploy-client status"].median / samples["bare rsync --dry-run"].median,
                "x",
                1.40,
            )
        )

        self.check_time("item 1 start-up")
        runs = {
            "python -c pass (interpreter floor)": lambda: self.plain(
                [sys.executable, "-c", "pass"]
            ),
            "deploy-client --help": lambda: self.plain([tool("deploy-client"), "--help"]),
            "deploy-client exec, 1 host": lambda: self.timed_run(
                self.client(address, "--order=exec", f"--options={ECHO}")
            ),
        }
        samples = self.interleave(runs, cfg.reps_startup, "item 1 start-up")
        res.table("1", "Client start-up", list(samples.items()), self.extras)
        res.add(
            Figure(
                "1",
                "deploy-client --help",
                samples["deploy-client --help"].median,
                "s",
                note="no target; the old client took >= 1.07 s per order",
            ),
            Figure(
                "1",
                "deploy-client exec, 1 host",
                samples["deploy-client exec, 1 host"].median,
                "s",
                note="no target",
            ),
        )
        res.data["startup"] = {k: v.values for k, v in samples.items()}
        agent.stop()

    @staticmethod
    def timed_run(run: Any) -> tuple[float, dict[str, float]]:
        return run.seconds, {"client CPU": run.cpu}

    @staticmethod
    def with_cpu(fn: Callable[[], Any], pids: dict[str, list[int]]) -> Callable[[], Any]:
        """`fn`, also measuring the CPU seconds the processes in `pids` (a label each) spent
        while it ran, their reaped children included."""

        def measured() -> Any:
            before = {label: sum(map(cpu_seconds, group)) for label, group in pids.items()}
            value = fn()
            seconds, metrics = value if isinstance(value, tuple) else (value, {})
            for label, group in pids.items():
                metrics[label] = sum(map(cpu_seconds, group)) - before[label]
            return seconds, metrics

        return measured

    def bare_concurrently(self, argvs: list[list[str]]) -> float:
        """Wall time until every one of these bare dry runs, started at once, has ended."""
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                a,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=self.env,
            )
            for a in argvs
        ]
        failed = []
        for proc in procs:
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                failed.append("timeout")
                continue
            if proc.returncode != 0:
                failed.append(err[-300:])
        if failed:
            raise Failed(f"{len(failed)} concurrent bare dry runs failed: {failed[0]!r}")
        return time.perf_counter() - start

    def plain(self, argv: list[str]) -> float:
        run = run_timed(argv, timeout=60, env=python_env())
        if run.rc != 0:
            raise Failed(f"{argv} exited {run.rc}")
        return run.seconds

    def interleave(self, runs: dict[str, Callable[[], Any]], reps: int, what: str) -> dict:
        """Each run once to warm up, then `reps` rounds, the order rotating every round. A run
        returns its wall seconds, or (seconds, {metric: value}); the metrics of the last call
        are in `self.extras`."""
        names = list(runs)
        for name in names:
            runs[name]()
        samples = {name: Samples() for name in names}
        self.extras: dict[str, dict[str, Samples]] = {}
        for rep in range(reps):
            self.check_time(what)
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                value = runs[name]()
                if isinstance(value, tuple):
                    value, metrics = value
                    for metric, v in metrics.items():
                        self.extras.setdefault(name, {}).setdefault(metric, Samples()).add(v)
                samples[name].add(value)
        self.log(f"{what}: " + ", ".join(f"{name} {s.median:.3f}s" for name, s in samples.items()))
        return samples

    def quiet(self, item: str) -> None:
        """Wait (bounded) for other work on the machine to calm down; note how busy it was."""
        busy, waited = wait_quiet(self.cfg.quiet, self.cfg.quiet_wait, self.log)
        self.load[item] = (busy, waited, os.getloadavg()[0])

    # -- item 4: a big tree

    def item4(self) -> None:
        cfg, res = self.cfg, self.results
        host = "127.0.0.3"
        self.check_time("item 4")
        agent = self.start_agent(host, self.agent_port)
        files = self.sizes["huge"][0]
        group = self.group("huge")
        argv = self.bare_argv(host, "huge")
        client_rss = Samples()

        def client_rlist() -> float:
            run = self.client(
                f"--hosts={host}:{self.agent_port}",
                "--order=rlist",
                f"--options={group}",
                "--thread-timeout=600",
            )
            listed = json.loads(run.stdout)[f"{host}:{self.agent_port}"]["rlist"]["content"]
            if len(listed["transferNewFiles"]) != files:
                raise Failed(f"rlist listed {len(listed['transferNewFiles'])} of {files} files")
            client_rss.add(run.maxrss_mb)
            return run.seconds

        idle = rss_mb(agent.pid)
        runs = {
            "bare rsync --dry-run": lambda: self.bare(argv),
            "agent rlist (raw socket)": lambda: self.agent_order(host, "rlist", group, files),
            "deploy-client rlist": client_rlist,
        }
        samples = self.interleave(runs, cfg.reps_big, "item 4")
        bare = samples["bare rsync --dry-run"].median
        peak = hwm_mb(agent.pid)
        res.table("4", f"rlist of {files:,} files", list(samples.items()))
        res.text(
            "4",
            f"Agent RSS idle before: {idle:.1f} MB; agent peak (VmHWM): {peak:.1f} MB; "
            f"deploy-client peak RSS (ru_maxrss): median {client_rss.median:.1f} MB, "
            f"max {client_rss.high:.1f} MB.",
        )
        res.add(
            Figure(
                "4",
                f"rlist / bare rsync, end to end via deploy-client, {files:,} files",
                samples["deploy-client rlist"].median / bare,
                "x",
                1.40,
            ),
            Figure(
                "4",
                f"rlist / bare rsync, agent side, {files:,} files",
                samples["agent rlist (raw socket)"].median / bare,
                "x",
                note="no separate target",
            ),
            Figure("4", f"agent peak RSS, rlist of {files:,} files", peak, "MB", 150.0),
            Figure(
                "4",
                f"deploy-client peak RSS, rlist of {files:,} files",
                client_rss.high,
                "MB",
                note="no target",
            ),
        )
        agent.stop()

    # -- item 5: one agent's memory, idle and under concurrent orders

    def item5(self) -> None:
        cfg, res = self.cfg, self.results
        host = "127.0.0.4"
        self.check_time("item 5")
        agent = self.start_agent(host, self.agent_port)
        time.sleep(1.0)  # let start-up garbage settle before reading idle RSS
        idle = rss_mb(agent.pid)
        res.add(Figure("5", "agent idle RSS (after start)", idle, "MB", note="no target"))
        n = cfg.concurrent
        medium = self.group("medium")
        files = self.sizes["medium"][0]
        rows = []
        for label, order, options, expect in (
            ("exec /bin/echo", "exec", ECHO, -1),
            (f"status, {files:,} files", "status", medium, files),
            (f"rlist, {files:,} files", "rlist", medium, files),
        ):
            self.check_time(f"item 5 {label}")
            hwm_reset = reset_hwm(agent.pid)
            peak_sampled, wall = self.concurrently(agent.pid, n, host, order, options, expect)
            peak = hwm_mb(agent.pid) if hwm_reset else peak_sampled
            rows.append((label, peak, peak_sampled, wall))
            res.add(Figure("5", f"agent peak RSS, {n} concurrent {label}", peak, "MB", 80.0))
            self.log(f"item 5 {label}: peak {peak:.1f} MB, {n} answers in {wall:.2f} s")
        time.sleep(1.0)
        after = rss_mb(agent.pid)
        res.text(
            "5",
            f"| {n} concurrent orders | peak RSS (VmHWM) | peak RSS sampled every 10 ms | "
            "all answered in |",
            "|---|---|---|---|",
            *(f"| {label} | {p:.1f} MB | {s:.1f} MB | {w:.2f} s |" for label, p, s, w in rows),
            "",
            f"Idle RSS after start: {idle:.1f} MB; idle again after the load: {after:.1f} MB.",
        )
        agent.stop()

    def concurrently(
        self, pid: int, n: int, host: str, order: str, options: str, expect: int
    ) -> tuple[float, float]:
        """`n` raw-socket orders sent at once; returns (peak sampled RSS, wall seconds)."""
        barrier = threading.Barrier(n + 1)
        errors: list[BaseException] = []
        done = threading.Event()
        peak = [rss_mb(pid)]

        def one() -> None:
            try:
                barrier.wait(30)
                self.agent_order(host, order, options, expect)
            except BaseException as e:  # reported below
                errors.append(e)

        def sample() -> None:
            deadline = time.monotonic() + 600
            while not done.is_set() and time.monotonic() < deadline:
                peak[0] = max(peak[0], rss_mb(pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        barrier.wait(30)
        start = time.perf_counter()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - start
        done.set()
        sampler.join(5)
        if errors:
            raise Failed(f"{len(errors)} of {n} concurrent {order} failed: {errors[0]!r}")
        return peak[0], wall

    # -- item 2: fan-out to real agent processes

    def item2(self) -> None:
        cfg, res = self.cfg, self.results
        biggest = max(cfg.fanout)
        hosts = [f"127.0.0.{10 + i}" for i in range(biggest)]
        self.check_time("item 2")
        self.log(f"item 2: starting {biggest} agents")
        agents = [self.start_agent(h, self.agent_port, wait=False) for h in hosts]
        for h, a in zip(hosts, agents, strict=True):
            a.wait_listening(h, self.agent_port, timeout=180)
        groups = {f"fan{k}": hosts[:k] for k in cfg.fanout}
        proxy, proxy_port = self.start_proxy(groups, "proxy-fanout")
        small = self.group("small")
        runs: dict[str, Callable[[], float]] = {}
        for k in cfg.fanout:
            direct = "--hosts=" + ",".join(f"{h}:{self.agent_port}" for h in hosts[:k])
            via = [
                f"--hosts=127.0.0.1:{proxy_port}",
                f"--args=groups:fan{k}",
                f"--api-key={API_KEY}",
            ]
            agent_pids = [a.pid for a in agents]
            for order, options in (("exec", ECHO), ("status", small)):
                runs[f"{order} direct {k}"] = self.with_cpu(
                    lambda d=direct, o=order, op=options, n=k: self.timed_run(
                        self.client(d, f"--order={o}", f"--options={op}", hosts=n)
                    ),
                    {"agents CPU": agent_pids},
                )
                runs[f"{order} proxy {k}"] = self.with_cpu(
                    lambda v=via, o=order, op=options, n=k: self.timed_run(
                        self.client(*v, f"--order={o}", f"--options={op}", hosts=n, proxy=True)
                    ),
                    {"agents CPU": agent_pids, "proxy CPU": [proxy.pid]},
                )
        # The floor of status to k hosts on this machine: k bare dry runs of the same group at
        # once, every one against the one rsync daemon, all on these CPUs.
        for k in cfg.fanout:
            argvs = [self.bare_argv(h, "small") for h in hosts[:k]]
            runs[f"bare rsync x{k}"] = lambda a=argvs: self.bare_concurrently(a)
        samples = self.interleave(runs, cfg.reps_fanout, "item 2")
        res.table(
            "2",
            f"Fan-out to real agent processes (status: group {small}, "
            f"{self.sizes['small'][0]} files; CPU: user + system seconds, children included)",
            list(samples.items()),
            self.extras,
        )
        res.data["fanout"] = {k: v.values for k, v in samples.items()}
        one, many = min(cfg.fanout), biggest
        self.marginal_costs(samples, one, many)
        res.add(
            Figure(
                "2",
                f"exec to {many} hosts, direct",
                samples[f"exec direct {many}"].median,
                "s",
                0.45 if many == 50 else None,
            ),
            Figure(
                "2",
                f"exec to {many} hosts, via proxy",
                samples[f"exec proxy {many}"].median,
                "s",
                0.55 if many == 50 else None,
            ),
        )
        floor = samples[f"bare rsync x{many}"].median
        res.add(
            Figure(
                "2",
                f"status to {many} hosts, direct / {many} bare dry runs at once (this machine's "
                "floor)",
                samples[f"status direct {many}"].median / floor,
                "x",
                note="no target; what deploy adds above the floor",
            )
        )
        res.text(
            "2",
            f"`bare rsync xK`: K bare dry runs of the same group started at once, no deploy at "
            f"all: the floor of a status fan-out when every host shares these {os.cpu_count()} "
            f"CPUs and one rsync daemon. Proxy peak RSS after these runs: "
            f"{hwm_mb(proxy.pid):.1f} MB.",
        )
        proxy.stop()
        for a in agents:
            a.stop()

    def marginal_costs(self, samples: dict[str, Samples], one: int, many: int) -> None:
        """Item 2's figures: the marginal cost of one more host per order and path, and for
        status also above the floor (K bare dry runs at once)."""
        res, ks = self.results, self.cfg.fanout
        targets = {"direct": 2.5, "proxy": 3.0}

        def costs(name: Callable[[int], str]) -> tuple[float, float]:
            fitted = slope({k: samples[name(k)] for k in ks})
            two_point = (samples[name(many)].median - samples[name(one)].median) / (many - one)
            return 1000 * fitted, 1000 * two_point

        runs = [f"{o} {m}" for o in ("exec", "status") for m in targets]
        cost = {run: costs(lambda k, r=run: f"{r} {k}") for run in runs}
        cost["bare rsync xK"] = costs(lambda k: f"bare rsync x{k}")
        floor = cost["bare rsync xK"][0]
        fit = f"least-squares slope over every run at {'/'.join(map(str, ks))} hosts"
        for mode, target in targets.items():
            res.add(
                Figure(
                    "2",
                    f"exec {mode}: marginal cost per extra host ({fit})",
                    cost[f"exec {mode}"][0],
                    "ms",
                    target,
                )
            )
        for mode, target in targets.items():
            raw = cost[f"status {mode}"][0]
            res.add(
                Figure(
                    "2",
                    f"status {mode}: marginal cost per extra host, raw (one more real rsync "
                    "dry run per host on the same CPUs)",
                    raw,
                    "ms",
                    note=f"judged on the next row; raw against ≤ {target:g} ms: "
                    + ("met" if raw <= target else "**not met**"),
                ),
                Figure(
                    "2",
                    f"status {mode}: marginal cost per extra host above the floor (raw − "
                    f"`bare rsync xK` slope {floor:.2f} ms)",
                    raw - floor,
                    "ms",
                    target,
                ),
            )
        res.text(
            "2",
            f"Marginal cost per extra host (ms): the {fit} (the Summary's figure), and "
            f"(median at {many} − median at {one}) / {many - one} as a check.",
            "",
            "| run | least-squares slope | two-point slope | target |",
            "|---|---|---|---|",
            *(
                f"| {run} | {ls:.2f} ms | {two:.2f} ms | "
                + (f"≤ {targets[run.split()[1]]:g} ms" if run in runs else "— (the floor)")
                + " |"
                for run, (ls, two) in cost.items()
            ),
        )

    # -- item 3: a simulated fleet behind the proxy

    def start_fleet(self, home: Path, ini: Path, count: int, processes: int) -> Fleet:
        """bench/fleet.py serving `count` simulated agents from `processes` processes."""
        ready = home / "ready"
        ready.unlink(missing_ok=True)
        self.log(f"item 3: {processes} process(es) serving {count} simulated agents")
        launcher = self.procs.start(
            f"fleet x{processes}",
            [
                sys.executable,
                str(BENCH / "fleet.py"),
                f"--ini={ini}",
                f"--count={count}",
                f"--processes={processes}",
                f"--port={self.agent_port}",
                f"--ready={ready}",
                f"--log={self.logs / f'fleet-x{processes}.log'}",
                f"--state={home / 'state'}",
                "--lifetime=1800",
            ],
            self.logs / f"fleet-x{processes}.out",
            cwd=home,
            env=python_env(),
        )

        def fleet_ready() -> bool:
            if launcher.proc.poll() is not None:
                raise RuntimeError(f"fleet exited: {launcher.log_text()[-2000:]}")
            return ready.exists() and ready.read_text().endswith("\n")

        wait_until(fleet_ready, 180, what="the simulated fleet to listen")
        return Fleet(launcher, [int(line) for line in ready.read_text().split()])

    def fleet_runs(
        self, fleet: Fleet, proxy: Any, proxy_port: int, hosts: dict[int, list[str]], orders: dict
    ) -> dict[str, Callable[[], Any]]:
        """For each k in `hosts` and each order: deploy-client to the k simulated agents via
        the proxy (`<order> proxy k`) and straight to them (`<order> direct k`), with the CPU
        of every process involved."""
        via = [f"--hosts=127.0.0.1:{proxy_port}", f"--api-key={API_KEY}", "--thread-timeout=120"]
        runs: dict[str, Callable[[], Any]] = {}
        for k, addresses in hosts.items():
            direct = "--hosts=" + ",".join(f"{a}:{self.agent_port}" for a in addresses)
            for order, options in orders.items():
                for mode, args, extra in (
                    ("proxy", [*via, f"--args=groups:fleet{k}"], [proxy.pid]),
                    ("direct", [direct, "--thread-timeout=120"], []),
                ):
                    runs[f"{order} {mode} {k}"] = self.fleet_cpu(
                        lambda a=args, o=order, op=options, n=k, m=mode: self.timed_run(
                            self.client(
                                *a, f"--order={o}", f"--options={op}", hosts=n, proxy=m == "proxy"
                            )
                        ),
                        fleet.workers,
                        extra,
                    )
        return runs

    @staticmethod
    def fleet_cpu(fn: Callable[[], Any], workers: list[int], proxy: list[int]) -> Callable[[], Any]:
        """`fn`, also measuring the CPU seconds spent while it ran by the fleet's processes
        (their reaped children included, and without them), its busiest process, the proxy."""

        def measured() -> Any:
            before = [(cpu_seconds(w), cpu_seconds(w, children=False)) for w in workers]
            before_proxy = sum(map(cpu_seconds, proxy))
            seconds, metrics = fn()
            spent = [
                (cpu_seconds(w) - b, cpu_seconds(w, children=False) - o)
                for w, (b, o) in zip(workers, before, strict=True)
            ]
            metrics["fleet CPU"] = sum(s for s, _ in spent)
            metrics["fleet own CPU (no children)"] = sum(o for _, o in spent)
            metrics["busiest fleet process CPU"] = max(s for s, _ in spent)
            if proxy:
                metrics["proxy CPU"] = sum(map(cpu_seconds, proxy)) - before_proxy
            return seconds, metrics

        return measured

    def item3(self) -> None:
        from bench.fleet import fleet_address

        cfg, res = self.cfg, self.results
        biggest = max(cfg.fleet)
        self.check_time("item 3")
        home = self.run_dir / "fleet"
        targets = home / "targets"
        targets.mkdir(parents=True)
        ini = home / "agent.ini"
        ini.write_text(
            agent_ini(
                host="127.0.1.1",
                port=self.agent_port,
                state=home / "state",
                allow_paths=[targets],
                # rkill of this idle group answers without starting any process
                groups={"noop": {"dest": "127.0.0.1::SMALL/", "src": targets / "noop"}},
                jobs=self.jobs,
            )
        )
        addresses = [fleet_address(i) for i in range(biggest)]
        hosts = {k: addresses[:k] for k in cfg.fleet}
        proxy, proxy_port = self.start_proxy(
            {f"fleet{k}": a for k, a in hosts.items()}, "proxy-fleet"
        )
        proxy_idle = rss_mb(proxy.pid)

        # How many processes the simulator needs: exec to the biggest fleet with each count.
        sweep: dict[int, dict[str, float]] = {}
        direct, via = f"exec direct {biggest}", f"exec proxy {biggest}"
        for processes in cfg.fleet_sweep:
            self.check_time(f"item 3 sweep x{processes}")
            fleet = self.start_fleet(home, ini, biggest, processes)
            runs = self.fleet_runs(
                fleet, proxy, proxy_port, {biggest: addresses}, {"exec": ECHO, "rkill": "noop"}
            )
            s, x = self.interleave(runs, cfg.reps_sweep, f"item 3 x{processes}"), self.extras
            fleet.stop()
            sweep[processes] = {
                "direct": s[direct].median,
                "via": s[via].median,
                "fleet direct": x[direct]["fleet CPU"].median,
                "busiest direct": x[direct]["busiest fleet process CPU"].median,
                "fleet proxy": x[via]["fleet CPU"].median,
                "proxy CPU": x[via]["proxy CPU"].median,
                "rkill direct": s[f"rkill direct {biggest}"].median,
                "rkill via": s[f"rkill proxy {biggest}"].median,
            }
            res.data.setdefault("fleet_sweep", {})[str(processes)] = {
                k: v.values for k, v in s.items()
            }
        chosen = cfg.fleet_processes or min(sweep, key=lambda p: sweep[p]["direct"])
        if sweep:
            res.text(
                "3",
                f"**How many simulator processes: exec /bin/echo (and rkill, no child) to "
                f"{biggest} simulated agents served by P processes (medians of "
                f"{cfg.reps_sweep}; CPU: user + system seconds, children included)**",
                "",
                "| P | direct (the simulator's ceiling) | via proxy | fleet CPU, direct | "
                "busiest fleet process CPU, direct | fleet CPU, via proxy | proxy CPU | "
                "rkill direct | rkill via proxy |",
                "|---|---|---|---|---|---|---|---|---|",
                *(
                    f"| {p} | {m['direct']:.3f} s | {m['via']:.3f} s | {m['fleet direct']:.2f} s "
                    f"| {m['busiest direct']:.2f} s | {m['fleet proxy']:.2f} s "
                    f"| {m['proxy CPU']:.2f} s | {m['rkill direct']:.3f} s "
                    f"| {m['rkill via']:.3f} s |"
                    for p, m in sweep.items()
                ),
                "",
                f"Kept: P = {chosen}"
                + (
                    " (given by --fleet-processes)."
                    if cfg.fleet_processes
                    else ", the fastest direct run (the simulator's own ceiling) of this sweep."
                ),
            )

        fleet = self.start_fleet(home, ini, biggest, chosen)
        reset_hwm(proxy.pid)
        runs = self.fleet_runs(fleet, proxy, proxy_port, hosts, {"exec": ECHO, "rkill": "noop"})
        samples = self.interleave(runs, cfg.reps_fleet, "item 3")
        proxy_peak = hwm_mb(proxy.pid)
        fleet_peak = max(hwm_mb(w) for w in fleet.workers)
        res.table(
            "3",
            f"Simulated fleet ({chosen} process{'es' if chosen > 1 else ''}, {biggest} "
            "listening addresses, the real agent code answering): exec /bin/echo (the real "
            "exec handler: one `setsid /bin/echo` child per host), and rkill of an idle group "
            "(the real rkill handler; it starts no child). `proxy`: one deploy-client order to "
            "the proxy, which fans out; `direct`: deploy-client straight to the simulated "
            "agents, the simulator's own ceiling for that order. CPU: user + system seconds, "
            "children included unless said",
            list(samples.items()),
            self.extras,
        )
        res.text(
            "3",
            f"Proxy RSS idle {proxy_idle:.1f} MB, peak (VmHWM, reset before this table) "
            f"{proxy_peak:.1f} MB; the biggest fleet process's peak {fleet_peak:.1f} MB. Proxy "
            "`max_parallel` = 64 (the default), deploy-client `--max-parallel` = 64 (the default).",
        )
        res.data["fleet"] = {k: v.values for k, v in samples.items()}
        proxy_exec = samples[f"exec proxy {biggest}"].median
        direct_exec = samples[f"exec direct {biggest}"].median
        res.add(
            Figure(
                "3",
                f"exec to {biggest} simulated hosts via proxy ({chosen} simulator process"
                + ("es)" if chosen > 1 else ")"),
                proxy_exec,
                "s",
                2.0 if biggest == 1000 else None,
            ),
            Figure(
                "3",
                f"exec to {biggest} simulated hosts, direct: the simulator's own ceiling",
                direct_exec,
                "s",
                note="no target; the floor under the figure above",
            ),
            Figure(
                "3",
                f"exec to {biggest}: what the proxy adds (via proxy − direct)",
                proxy_exec - direct_exec,
                "s",
                note="no target",
            ),
            Figure(
                "3",
                f"rkill (no child process) to {biggest} simulated hosts via proxy",
                samples[f"rkill proxy {biggest}"].median,
                "s",
                note="no target; the fan-out without a fork+exec per host",
            ),
            Figure(
                "3",
                f"rkill (no child process) to {biggest} simulated hosts, direct",
                samples[f"rkill direct {biggest}"].median,
                "s",
                note="no target; the simulator's own ceiling for rkill",
            ),
            Figure("3", f"proxy peak RSS, fan-out to {biggest}", proxy_peak, "MB", 150.0),
        )
        proxy.stop()
        fleet.stop()


# --------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    rsync = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import twisted
    from deploy import __version__

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu or "unknown",
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version() + f" ({sys.executable})",
        "twisted": twisted.__version__,
        "rsync": rsync.splitlines()[0] if rsync else "unknown",
        "deploy": f"{__version__}, {code_version()}",
    }


def code_version() -> str:
    """The commit measured, and which files of the package differed from it (uncommitted)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(BENCH.parent), "status", "--porcelain", "--", "deploy", "twisted"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"commit {head or '?'}" + (f" + uncommitted {', '.join(changed)}" if changed else "")


def write_report(cfg: Settings, bench: Bench, info: dict[str, str], seconds: float) -> None:
    res = bench.results
    out = cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Benchmark results (issue 9)",
        "",
        "Written by `python bench/run.py`"
        + (" --quick (NOT the reference figures)" if cfg.quick else "")
        + f"; the run took {seconds / 60:.1f} min. Every process ran on loopback on this machine:",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        "## Summary",
        "",
        "| item | measurement | result | target | met |",
        "|---|---|---|---|---|",
    ]
    for f in res.figures:
        target = f"≤ {f.shown(f.target)}" if f.target is not None else (f.note or "—")
        met = {True: "yes", False: "**NO**", None: "—"}[f.met]
        lines.append(f"| {f.item} | {f.what} | {f.shown()} | {target} | {met} |")
    trees = ", ".join(
        f"{spec.name}: {bench.sizes[role][0]:,} files / {bench.sizes[role][1] / 1e6:.1f} MB"
        for role, spec in cfg.trees.items()
    )
    lines += [
        "",
        "## Method",
        "",
        f"- Trees (generated deterministically under bench/work/trees): {trees}. Each agent "
        "syncs into an empty directory, so a dry run lists every file (the most output the "
        "agent has to parse).",
        "- `bare rsync --dry-run` is the exact command line the agent runs for that group "
        "(`deploy.rsync.build_argv`: `--stats --itemize-changes --sockopts=TCP_NODELAY "
        "--archive --delete --force --dry-run`), run with LC_ALL=C, its output read through a "
        "pipe. The rsync daemon has `socket options = TCP_NODELAY` and every group passes "
        "`--sockopts=TCP_NODELAY`: with rsync's defaults its protocol stalls on Nagle/delayed "
        "ACK (40 ms at a time, see item 1), noise that would hide the agent's overhead. It also "
        "has `listen backlog = 128`: the default, 5, drops the SYNs of simultaneous dry runs "
        "and rsync retries 1 s later (status to 10-50 hosts took +1 s or +2 s).",
        "- Python children (agents, proxy, fleet, deploy-client) run with their bytecode "
        "cached (PYTHONPYCACHEPREFIX=bench/work/pycache), as an installed package is, even if "
        "the calling shell sets PYTHONDONTWRITEBYTECODE.",
        "- Agent side: a raw socket client sends the signed request that `deploy-client` "
        "would send and times connect → last byte of the answer (the agent closes).",
        "- End to end: wall time of the `deploy-client` process (interpreter start included), "
        "its answer checked (every host 200 and `return` true).",
        "- Every comparison is interleaved (the order rotates every round) after one warm-up "
        "round; figures are medians; a ratio is the ratio of medians.",
        "- Peak RSS: `VmHWM` of /proc/PID/status (reset through /proc/PID/clear_refs between "
        "phases of item 5); a client's peak RSS is `ru_maxrss` from wait4.",
        "",
    ]
    titles = {
        "1": "1. Overhead over rsync, and client start-up",
        "2": "2. Fan-out to real agent processes",
        "3": "3. Scale: a simulated fleet behind the proxy",
        "4": "4. Big tree",
        "5": "5. Concurrency: one agent's memory",
    }
    if bench.load:
        lines += [
            "Other work on this (shared) machine before each item — every figure is a wall "
            "time, so it counts:",
            "",
            "| item | CPUs busy with other work | waited for quiet | load average (1 min) |",
            "|---|---|---|---|",
            *(
                f"| {item} | {busy:.0%} | {waited:.0f} s | {load:.2f} |"
                for item, (busy, waited, load) in bench.load.items()
            ),
            "",
        ]
    lines.append("## Details")
    lines.append("")
    for item in sorted(res.details):
        lines += [f"### {titles[item]}", "", *res.details[item]]
    if cfg.plot.exists():
        lines += [f"![fan-out latency]({cfg.plot.name})", ""]
    analysis = BENCH / "analysis.md"
    if analysis.exists() and not cfg.quick:
        lines += [analysis.read_text().rstrip(), ""]
    out.write_text("\n".join(lines))
    (out.parent / (out.stem + ".json")).write_text(
        json.dumps(
            {"machine": info, "data": res.data, "figures": [f.__dict__ for f in res.figures]},
            indent=1,
        )
    )


def plot(cfg: Settings, data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import statistics

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    series: dict[str, dict[int, float]] = {}
    for source in ("fanout", "fleet"):
        for name, values in data.get(source, {}).items():
            if name.startswith("bare rsync x"):
                key, k = "bare rsync --dry-run, k at once", name.rsplit("x", 1)[1]
                series.setdefault(key, {})[int(k)] = statistics.median(values)
                continue
            order, mode, k = name.split()
            key = f"{order} {'via proxy' if mode == 'proxy' else 'direct'}"
            series.setdefault(key, {})[int(k)] = statistics.median(values)
    styles = {
        "exec direct": ("tab:blue", "-", "o"),
        "exec via proxy": ("tab:orange", "-", "s"),
        "status direct": ("tab:green", "--", "o"),
        "status via proxy": ("tab:red", "--", "s"),
        "rkill via proxy": ("tab:purple", ":", "^"),
        "rkill direct": ("tab:purple", "-", "v"),
        "bare rsync --dry-run, k at once": ("grey", ":", "x"),
    }
    for key, points in series.items():
        xs = sorted(points)
        color, line, marker = styles.get(key, ("black", "-", "x"))
        ax.plot(xs, [points[x] for x in xs], line, marker=marker, color=color, label=key)
    real = max(cfg.fanout)
    ax.axvspan(real * 1.5, max(cfg.fleet) * 1.3, color="grey", alpha=0.08)
    ax.text(real * 1.7, ax.get_ylim()[1] * 0.92, "simulated fleet\n(real agent code)", fontsize=8)
    if not cfg.quick:
        ax.plot([50], [0.45], "v", color="tab:blue", alpha=0.5, label="target exec 50 direct")
        ax.plot([50], [0.55], "v", color="tab:orange", alpha=0.5, label="target exec 50 proxy")
        ax.plot([1000], [2.0], "v", color="tab:orange", alpha=0.5, label="target 1000 via proxy")
    ax.set_xscale("log")
    ax.set_xlabel("hosts")
    ax.set_ylabel("deploy-client wall time, median (s)")
    ax.set_title("deploy-client fan-out: exec /bin/echo, status (100 files), rkill (no child)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(cfg.plot)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def ensure_requirements() -> None:
    """Install bench/requirements.txt into this interpreter's environment when missing."""
    if importlib.util.find_spec("matplotlib") is not None:
        return
    print("bench: installing bench/requirements.txt", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")],
        check=True,
        timeout=600,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the deploy benchmarks of issue 9.")
    p.add_argument("--quick", action="store_true", help="small trees, few repetitions")
    p.add_argument("--items", default="1,4,5,2,3", help="which items, in this order (default: all)")
    p.add_argument("--time-limit", type=float, default=40.0, help="minutes before giving up")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="before each item, wait until other work leaves the CPUs at most this busy "
        "(0..1, default 0.25)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="most seconds to wait for that before each item (default 300; --quick 20)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the report here (default: bench/RESULTS.md for a full run of every item; "
        "bench/work/items-<items>/RESULTS.md for a subset, so it never overwrites the full one)",
    )
    p.add_argument(
        "--fleet-processes",
        type=int,
        default=0,
        help="item 3: serve the simulated fleet from this many processes (default: the fastest "
        "of --fleet-sweep)",
    )
    p.add_argument(
        "--fleet-sweep",
        default=None,
        help="item 3: process counts to measure first (default 1,2,4,8,16; --quick 1,2); "
        "'' to skip",
    )
    args = p.parse_args(argv)
    ensure_requirements()
    if importlib.util.find_spec("deploy") is None:
        print("bench: deploy is not installed in this interpreter", file=sys.stderr)
        return 1
    cfg = settings(args.quick)
    cfg.quiet = args.quiet
    cfg.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (20 if args.quick else 300)
    items = [i.strip() for i in args.items.split(",") if i.strip()]
    if not set(items) <= {"1", "2", "3", "4", "5"}:
        p.error("--items: choose among 1,2,3,4,5")
    if args.fleet_sweep is not None:
        cfg.fleet_sweep = tuple(int(n) for n in args.fleet_sweep.split(",") if n.strip())
    cfg.fleet_processes = args.fleet_processes
    if not cfg.fleet_sweep and not cfg.fleet_processes:
        cfg.fleet_processes = FLEET_PROCESSES
    if args.out is not None:
        cfg.out = args.out
    elif sorted(items) != ["1", "2", "3", "4", "5"]:
        cfg.out = WORK / f"items-{'-'.join(items)}" / "RESULTS.md"
    cfg.plot = cfg.out.parent / cfg.plot.name
    procs = Processes()

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    bench = Bench(cfg, procs, started + args.time_limit * 60)
    try:
        info = machine()
        bench.setup()
        for item in items:
            bench.quiet(item)
            getattr(bench, f"item{item}")()
        # Processes stop before the report so a failed plot cannot leave them running.
        procs.stop_all()
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        if "fanout" in bench.results.data or "fleet" in bench.results.data:
            plot(cfg, bench.results.data)
        at_end = code_version()
        if at_end not in info["deploy"]:
            info["deploy at the end"] = f"{at_end} (the code changed during the run)"
        write_report(cfg, bench, info, time.monotonic() - started)
    finally:
        procs.stop_all()
    print(cfg.out.read_text())
    misses = [f for f in bench.results.figures if f.met is False]
    print(f"bench: {len(misses)} target(s) missed; report in {cfg.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
