"""`deploy-client --order=deploy` run by the client against a real rsync daemon and real agents
in release mode on 127.0.0.x: batches that wait for the previous batch's syncs to end, the
cumulative budget (unreachable, timed out, check failed, busy), rollback of exactly the switched
hosts with exit 4, the canary stop, and `busy` instead of adopting another run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deploy.jobstate import read_state
from tests.conftest import Daemons
from tests.harness import (
    AgentProcess,
    ClientRun,
    RsyncDaemon,
    ScriptedServer,
    ask,
    make_tree,
    run_client,
    shared_free_port,
    wait_until,
)

# `check:once` passes the first time on a host, then fails: a canary that breaks after a while
JOBS = """\
[release]
check:ok = /bin/true
check:fail = /bin/false
check:once = /bin/sh -c 'if [ -e "$1" ]; then exit 1; fi; touch "$1"' sh %s
"""


class Fleet:
    """An rsync daemon serving one tree and agents (one per 127.0.0.x, one port) whose group
    `web` pulls it in release mode; `check` per agent names its check job."""

    def __init__(
        self, daemons: Daemons, work: Path, checks: list[str], *options: str, files: int = 20
    ) -> None:
        self.daemons = daemons
        self.work = work
        self.tree = make_tree(work / "tree", files=files, size=1000)
        (self.tree / "VERSION").write_text("v1\n")
        self.rsyncd: RsyncDaemon = daemons.rsyncd({"DEST": self.tree})
        self.jobs = work / "jobs.ini"
        self.jobs.write_text(JOBS)
        self.hosts = [f"127.0.0.{10 + i}" for i in range(len(checks))]
        self.port = shared_free_port(self.hosts)
        self.agents: list[AgentProcess] = []
        for host, check in zip(self.hosts, checks, strict=True):
            base = work / host
            (base / "targets").mkdir(parents=True)
            group = self.rsyncd.group(base / "targets" / "web", "--archive", "--delete", *options)
            group.update(releases=3)
            if check:
                group["check"] = check.replace("FLAG", str(base / "flag"))
            self.agents.append(
                daemons.agent(
                    host,
                    self.port,
                    groups={"web": group},
                    jobs=self.jobs,
                    state=base / "state",
                    allow_paths=[base / "targets"],
                )
            )

    def addresses(self, extra: list[str] | None = None) -> str:
        return ",".join([*(a.address for a in self.agents), *(extra or [])])

    def deploy(self, *args: str, hosts: str | None = None, home: Path) -> ClientRun:
        env = {**os.environ, "HOME": str(home)}
        return run_client(
            f"--hosts={hosts or self.addresses()}",
            "--order=deploy",
            "--options=web",
            "--format=ndjson",
            *args,
            env=env,
        )

    def live(self, i: int) -> str:
        return (self.work / self.hosts[i] / "targets" / "web" / "VERSION").read_text().strip()

    def record(self, i: int) -> dict[str, Any]:
        """The agent's own record of its last sync (start and end times from the agent)."""
        state = self.work / self.hosts[i] / "state"
        files = [p for p in state.glob("*.json") if not p.name.startswith("releases-")]
        return read_state(str(files[0])) or {}


def rows(out: ClientRun) -> dict[str, dict[str, Any]]:
    """host → its final NDJSON row (events and the summary left out)."""
    import json

    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return {d["host"]: d for d in lines if "outcome" in d and "event" not in d and "host" in d}


def events(out: ClientRun) -> list[dict[str, Any]]:
    import json

    return [d for d in map(json.loads, out.stdout.splitlines()) if "event" in d]


def set_version(tree: Path, text: str, stamp: int) -> None:
    (tree / "VERSION").write_text(text + "\n")
    os.utime(tree / "VERSION", (stamp, stamp))


def test_batches_start_after_the_previous_batch_synced_and_activated(
    daemons: Daemons, tmp_path: Path, home: Path
) -> None:
    """--batch=2 over 4 agents: the agents' own records show batch 2's syncs started after
    batch 1's ended; every host ends ok on the new release, exit 0, one event per step."""
    fleet = Fleet(daemons, tmp_path, ["check:ok"] * 4, "--bwlimit=100")
    out = fleet.deploy("--batch=2", "--release=v1", home=home)
    assert out.rc == 0, out.stdout + out.stderr
    got = rows(out)
    assert {h: r["outcome"] for h, r in got.items()} == {
        a: "ok" for a in fleet.addresses().split(",")
    }
    records = [fleet.record(i) for i in range(4)]
    assert min(r["started"] for r in records[2:]) >= max(r["ended"] for r in records[:2])
    assert all(fleet.live(i) == "v1" for i in range(4))
    steps = [(e["host"], e["step"]) for e in events(out)]
    first = fleet.agents[0].address
    assert [s for h, s in steps if h == first] == ["start", "rsync", "sync", "activate"]
    assert all(r["seconds"] > 0 for r in got.values())
    assert got[first]["content"]["release"]


def test_budget_counts_every_failure_over_batches_and_rolls_back_switched_hosts(
    daemons: Daemons, tmp_path: Path, home: Path
) -> None:
    """--batch=2 --max-fail=1: a check_failed host (batch 1) and an unreachable one (batch 2)
    spend the budget across batches; the last host is skipped; exactly the two hosts the
    rollout switched are rolled back to their release before; exit 4."""
    fleet = Fleet(daemons, tmp_path, ["check:ok", "check:fail", "check:ok", "check:ok"])
    out = fleet.deploy("--release=v1", home=home)  # the release to come back to
    assert out.rc == 2  # the failing check
    set_version(fleet.tree, "v2", 1_000_000_010)
    gone = "127.0.0.9:" + str(fleet.port)  # nothing listens there
    a = [x.address for x in fleet.agents]
    hosts = ",".join([a[0], a[1], gone, a[2], a[3]])
    out = fleet.deploy("--batch=2", "--max-fail=1", "--release=v2", hosts=hosts, home=home)
    assert out.rc == 4, out.stdout + out.stderr
    got = {h: r["outcome"] for h, r in rows(out).items()}
    assert got == {
        a[0]: "rolled_back",
        a[1]: "check_failed",
        gone: "unreachable",
        a[2]: "rolled_back",
        a[3]: "skipped",
    }, got
    assert [fleet.live(i) for i in (0, 2, 3)] == ["v1", "v1", "v1"]
    assert not any(e["step"] == "rollback" and e["host"] in (a[1], a[3]) for e in events(out))


def test_busy_and_timed_out_hosts_count_and_a_running_sync_is_never_adopted(
    daemons: Daemons, tmp_path: Path, home: Path
) -> None:
    """A host syncing already (another run) is `busy` with that run's id, never followed as
    ours (by deploy, nor by rsync --wait); with a host that never answers (timed out) the
    budget of 1 is spent: the rest is skipped, exit 4, and the busy host's sync goes on."""
    from tests.test_releases_agent import ask_with

    fleet = Fleet(daemons, tmp_path, ["", ""], "--bwlimit=20", files=60)
    status, body = ask_with(fleet.agents[0], "rsync", "web", release="other")
    assert status == 200 and body["runId"], body
    env = {**os.environ, "HOME": str(home)}
    wait = run_client(
        f"--hosts={fleet.agents[0].address}", "--order=rsync", "--options=web", "--wait", env=env
    )
    content = wait.content(fleet.agents[0].address, "rsync")
    assert wait.rc == 2 and content["outcome"] == "busy", wait.stdout
    assert body["runId"] in content["message"]
    hang = ScriptedServer("127.0.0.8")
    try:
        hosts = f"{fleet.agents[0].address},127.0.0.8:{hang.port},{fleet.agents[1].address}"
        out = fleet.deploy(
            "--batch=2", "--max-fail=1", "--thread-timeout=1", hosts=hosts, home=home
        )
    finally:
        hang.close()
    assert out.rc == 4, out.stdout + out.stderr
    got = rows(out)
    busy = got[fleet.agents[0].address]
    assert busy["outcome"] == "busy" and body["runId"] in busy["content"]["message"], busy
    assert got[f"127.0.0.8:{hang.port}"]["outcome"] == "timed_out"
    assert got[fleet.agents[1].address]["outcome"] == "skipped"
    status, now = ask(fleet.agents[0], "status", "web")
    assert now.get("runId") == body["runId"] or now["lastRsync"]["runId"] == body["runId"], now
    wait_until(lambda: ask(fleet.agents[0], "status", "web")[1].get("alreadyRsync") != "true", 60)


def test_canary_that_fails_its_second_check_stops_the_rollout(
    daemons: Daemons, tmp_path: Path, home: Path
) -> None:
    """--canary=1 --canary-wait: the canary passes its check at activation, fails it after the
    wait: it is rolled back, the other hosts are skipped (never synced), exit 4."""
    fleet = Fleet(daemons, tmp_path, ["check:once,FLAG", "check:ok", "check:ok"])
    # A first release the canary can go back to, its check passing (the flag removed again).
    out = fleet.deploy("--release=v1", home=home)
    assert out.rc == 0, out.stdout + out.stderr
    (tmp_path / fleet.hosts[0] / "flag").unlink()
    set_version(fleet.tree, "v2", 1_000_000_020)
    out = fleet.deploy("--canary=1", "--canary-wait=0.5", "--release=v2", home=home)
    assert out.rc == 4, out.stdout + out.stderr
    a = [x.address for x in fleet.agents]
    assert {h: r["outcome"] for h, r in rows(out).items()} == {
        a[0]: "rolled_back",
        a[1]: "skipped",
        a[2]: "skipped",
    }
    assert [fleet.live(i) for i in range(3)] == ["v1", "v1", "v1"]
    assert any(e["step"] == "check" and e["outcome"] == "check_failed" for e in events(out))


def test_help_documents_deploy_rollout_their_options_and_exit_codes() -> None:
    """deploy-client --help names the deploy and rollout orders, their options, and exit 4."""
    from deploy.cli import build_parser

    text = build_parser().format_help()
    for needle in ("--order=deploy", "--order=rollout", "--canary", "--canary-wait"):
        assert needle in text, needle
    for needle in ("--no-rollback", "--max-fail", "--batch", "busy", "rolled_back", "  4  "):
        assert needle in text, needle
