"""End to end background syncs: real rsync daemon, real `twistd -n deploy-agent`, slowed
transfers. Progress, restart of a SIGKILLed agent mid-sync, rkill, outcomes by exit code, the
--delete guardrails and max_prefork."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.jobs import target_key
from deploy.jobstate import read_state
from deploy.process import read_stat
from deploy.rsync import RsyncTarget
from tests.harness import (
    AgentProcess,
    RsyncDaemon,
    ask,
    make_tree,
    wait_until,
)

GRACE = 2
# 2.4 MB at 400 kB/s: a sync of about 6 s, long enough to watch progress grow and to kill it;
# at 250 kB/s (about 10 s) long enough to restart the agent twice under it.
BIG_FILES, BIG_SIZE, BWLIMIT, BWLIMIT_RESTART = 24, 100_000, 400, 250

STUBBORN_RSYNC = """#!{python}
# An "rsync" whose syncs ignore TERM, as does the child they fork; only KILL ends them.
import os, signal, sys, time
if "--dry-run" in sys.argv:
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.fork()
sys.stdout.write("      1,000   1%   1.00kB/s    0:10:00\\r")
sys.stdout.flush()
while True:
    time.sleep(1)
"""


def status(agent: AgentProcess, group: str) -> dict[str, Any]:
    code, body = ask(agent, "status", group)
    assert code == 200, body
    return body


def last_rsync(agent: AgentProcess, group: str, timeout: float = 30) -> dict[str, Any]:
    """Poll status until the target is idle with a lastRsync; answer that record."""

    def ended():
        body = status(agent, group)
        return body.get("lastRsync") if body.get("alreadyRsync") != "true" else None

    return wait_until(ended, timeout, 0.1, f"the sync of {group} to end")


def alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat.alive


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@dataclass
class JobSite:
    daemons: Any
    workdir: Path
    rsyncd: RsyncDaemon
    targets: Path
    state: Path
    queue: Path
    big: Path
    groups: dict[str, dict[str, Any]]
    agent: AgentProcess

    def checksum(self, group: str) -> str:
        g = self.groups[group]
        return RsyncTarget(dest=str(g["dest"]), src=str(g["src"])).checksum

    def key(self, group: str) -> str:
        """The name of the group's sync record: its local target's key."""
        g = self.groups[group]
        return target_key(RsyncTarget(dest=str(g["dest"]), src=str(g["src"])))

    def restart_agent(self, sig: int = signal.SIGKILL) -> AgentProcess:
        """Stop the agent with `sig`, start a new one on the same address and config."""
        old = self.agent
        old.kill(sig)
        self.agent = self.daemons.agent_from_text(old.ini.read_text(), old.host, old.port)
        return self.agent


@pytest.fixture
def jobsite(daemons, tmp_path: Path) -> JobSite:
    big = make_tree(tmp_path / "big", files=BIG_FILES, size=BIG_SIZE)
    small = make_tree(tmp_path / "small", files=10, size=500)
    (tmp_path / "emptytree").mkdir()
    rsyncd = daemons.rsyncd({"BIG": big, "SMALL": small, "EMPTY": tmp_path / "emptytree"})
    targets = tmp_path / "targets"
    targets.mkdir()
    local = tmp_path / "local"
    local.mkdir()
    (local / "a_big").write_bytes(os.urandom(3_000_000))
    for i in range(3):
        (local / f"z_{i}").write_text(f"{i}\n")
    stubborn = tmp_path / "stubborn-rsync"
    stubborn.write_text(STUBBORN_RSYNC.format(python=sys.executable))
    stubborn.chmod(0o755)
    port = f"--port={rsyncd.port}"
    base = [port, "--archive", "--delete", "--force"]
    queue = tmp_path / "queue"
    groups: dict[str, dict[str, Any]] = {
        "slow": {
            "dest": rsyncd.url("BIG"),
            "src": targets / "slow",
            "option": [*base, f"--bwlimit={BWLIMIT_RESTART}"],
            "queue_path": queue,
        },
        "slow2": {
            "dest": rsyncd.url("BIG"),
            "src": targets / "slow2",
            "option": [*base, f"--bwlimit={BWLIMIT}"],
        },
        # a local source, slowed, to make a file vanish mid-transfer
        "vanish": {
            "dest": f"{local}/",
            "src": targets / "vanish",
            "option": ["--archive", "--delete", "--bwlimit=1000"],
        },
        "missing": {"dest": f"{tmp_path}/no-such-source/", "src": targets / "missing"},
        "maxdel": {
            "dest": rsyncd.url("SMALL"),
            "src": targets / "maxdel",
            "option": base,
            "max_delete": 2,
        },
        "empty": {"dest": rsyncd.url("EMPTY"), "src": targets / "empty", "option": base},
        "emptyok": {
            "dest": rsyncd.url("EMPTY"),
            "src": targets / "emptyok",
            "option": base,
            "allow_empty_source": "true",
        },
        "norsync": {
            "dest": rsyncd.url("SMALL"),
            "src": targets / "norsync",
            "rsync": tmp_path / "no-such-rsync",
        },
        "stubborn": {
            "dest": rsyncd.url("SMALL"),
            "src": targets / "stubborn",
            "rsync": stubborn,
            "option": ["--archive"],
        },
    }
    state = tmp_path / "state"
    daemons.state_dirs.append(queue)  # its syncs are stopped at the end like the others
    agent = daemons.agent(
        groups=groups,
        state=state,
        allow_paths=[targets],
        server={"rkill_grace": GRACE},
    )
    return JobSite(daemons, tmp_path, rsyncd, targets, state, queue, big, groups, agent)


def wait_progress(agent: AgentProcess, group: str, above: int = 0) -> dict[str, Any]:
    def grown():
        body = status(agent, group)
        assert body["alreadyRsync"] == "true", body
        p = body.get("progress")
        return body if p and p["bytes"] > above else None

    return wait_until(grown, 20, 0.1, f"progress of {group} above {above} bytes")


def test_sync_reports_growing_progress_then_ok(jobsite):
    """Two racing rsync orders start one sync (the other sees alreadyRsync); status of the
    running target shows its rsync pids and progress that grows; once idle, lastRsync says
    ok with exit code, times and counts, and the target equals the source."""
    agent = jobsite.agent
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: ask(agent, "rsync", "slow2"), range(2)))
    assert [a[0] for a in answers] == [200, 200]
    bodies = sorted((a[1] for a in answers), key=lambda b: "alreadyRsync" in b)
    started = {k: v for k, v in bodies[0].items() if k != "runId"}  # + its run id (issue 15)
    assert started == {"checksum": jobsite.checksum("slow2"), "return": "true"}
    assert bodies[1]["alreadyRsync"] == "true" and bodies[1]["return"] == "true"
    first = wait_progress(agent, "slow2")
    pids = [int(p) for p in first["process"]]
    assert len(pids) == 2 and all(alive(p) for p in pids)
    p = first["progress"]
    assert isinstance(p["percent"], int) and 0 <= p["percent"] <= 100
    assert isinstance(p["rate"], str) and ":" in p["eta"]
    later = wait_progress(agent, "slow2", above=p["bytes"])
    assert later["progress"]["bytes"] > p["bytes"]
    last = last_rsync(agent, "slow2")
    assert last["outcome"] == "ok" and last["exitCode"] == 0 and last["message"] == ""
    assert last["checksum"] == jobsite.checksum("slow2")
    assert last["transferFilesCount"] == BIG_FILES
    assert last["transferFilesSize"] == BIG_FILES * BIG_SIZE
    assert last["started"] < last["ended"] and last["ended"].endswith("Z")
    body = status(agent, "slow2")
    assert (body["transferFilesCount"], body["transferFilesSize"]) == ("0", "0")
    assert files(jobsite.targets / "slow2") == files(jobsite.big)


def test_restarted_agent_finds_the_running_sync(jobsite):
    """SIGKILL the agent mid-sync: the sync goes on; a new agent reports it running with the
    same pids and growing progress, refuses a second rsync; the same after a TERM stop; then
    the real outcome is recorded (in the group's queue_path). A record whose supervisor pid
    now belongs to another process is found lost, not running."""
    agent = jobsite.agent
    # A leftover record naming a live pid (ours) with another start time: a reused pid.
    reused = jobsite.state / f"{jobsite.key('maxdel')}.json"
    reused.write_text(
        json.dumps(
            {
                "state": "running",
                "runId": "old",
                "supervisorPid": os.getpid(),
                "supervisorStart": 1,
                "started": time.time() - 60,
            }
        )
    )
    assert ask(agent, "rsync", "slow")[0] == 200
    before = wait_progress(agent, "slow")
    pids = before["process"]
    agent = jobsite.restart_agent()
    assert all(alive(int(p)) for p in pids), "the sync died with the agent"
    now = status(agent, "slow")
    assert now["alreadyRsync"] == "true" and now["process"] == pids
    assert now["progress"]["bytes"] >= before["progress"]["bytes"]
    wait_progress(agent, "slow", above=now["progress"]["bytes"])
    code, again = ask(agent, "rsync", "slow")
    assert code == 200 and again["alreadyRsync"] == "true" and again["process"] == pids
    agent = jobsite.restart_agent(signal.SIGTERM)
    now = wait_progress(agent, "slow", above=now["progress"]["bytes"])
    assert now["process"] == pids
    lost = status(agent, "maxdel")
    assert lost["alreadyRsync"] == "false" and lost["lastRsync"]["outcome"] == "lost"
    last = last_rsync(agent, "slow")
    assert (last["outcome"], last["exitCode"]) == ("ok", 0)
    assert last["transferFilesCount"] == BIG_FILES
    assert files(jobsite.targets / "slow") == files(jobsite.big)
    assert read_state(str(jobsite.queue / f"{jobsite.key('slow')}.json"))["outcome"] == "ok"


def test_supervisor_killed_mid_sync_is_failed_and_rsync_stopped(jobsite):
    """A supervisor that dies mid-sync (SIGKILL, OOM) leaves no running rsync behind: the agent
    records `failed` saying so, and the target can be synced again."""
    agent = jobsite.agent
    assert ask(agent, "rsync", "slow2")[0] == 200
    pids = [int(p) for p in wait_progress(agent, "slow2")["process"]]
    record = read_state(str(jobsite.state / f"{jobsite.key('slow2')}.json"))
    os.kill(record["supervisorPid"], signal.SIGKILL)
    last = last_rsync(agent, "slow2", timeout=10)
    assert last["outcome"] == "failed"
    assert "supervisor ended without recording an outcome" in last["message"]
    wait_until(lambda: not any(alive(p) for p in pids), 5, what="the orphaned rsync to go")
    assert ask(agent, "rsync", "slow2")[1]["return"] == "true"
    ask(agent, "rkill", "slow2")


def test_rkill_stops_the_sync_and_records_killed(jobsite):
    """rkill answers the rsync pids, which are gone within the grace period; the sync is
    recorded `killed`; a second rkill finds nothing."""
    agent = jobsite.agent
    assert ask(agent, "rsync", "slow2")[0] == 200
    pids = [int(p) for p in wait_progress(agent, "slow2")["process"]]
    code, body = ask(agent, "rkill", "slow2")
    assert code == 200 and body == {"return": "true", "process": [str(p) for p in pids]}
    wait_until(lambda: not any(alive(p) for p in pids), GRACE + 1, what="rsync to go")
    last = last_rsync(agent, "slow2", timeout=GRACE + 3)
    assert last["outcome"] == "killed" and last["message"] == "stopped by rkill"
    assert ask(agent, "rkill", "slow2") == (200, {"return": "true", "process": []})


def test_rkill_of_rsync_ignoring_term_kills_after_grace(jobsite):
    """An rsync (and its fork) that ignore TERM outlive the TERM and die by KILL once
    rkill_grace has passed, within a small margin; the outcome is `killed`."""
    agent = jobsite.agent
    assert ask(agent, "rsync", "stubborn")[0] == 200

    def two_pids():
        body = status(agent, "stubborn")
        return (
            [int(p) for p in body.get("process", [])] if len(body.get("process", [])) == 2 else None
        )

    pids = wait_until(two_pids, 10, 0.1, "the stubborn rsync and its fork")
    t0 = time.monotonic()
    assert ask(agent, "rkill", "stubborn")[1]["process"] == [str(p) for p in pids]
    wait_until(lambda: not any(alive(p) for p in pids), GRACE + 3, what="the group to die")
    assert time.monotonic() - t0 >= GRACE - 0.5, "TERM alone cannot have ended them"
    last = last_rsync(agent, "stubborn")
    assert last["outcome"] == "killed" and last["exitCode"] is None


def test_vanished_source_files_give_warning(jobsite):
    """A source file deleted while the (slowed) transfer runs: rsync exits 24, recorded as a
    `warning` with rsync's message, not a failure."""
    agent = jobsite.agent
    assert ask(agent, "rsync", "vanish")[0] == 200
    wait_progress(agent, "vanish")  # the file list is made: z_1 is in it, not yet sent
    (jobsite.workdir / "local" / "z_1").unlink()
    last = last_rsync(agent, "vanish")
    assert (last["outcome"], last["exitCode"]) == ("warning", 24)
    assert "vanished" in last["message"]
    assert (jobsite.targets / "vanish" / "z_2").exists()


def test_rsync_error_23_is_failed_with_its_message(jobsite):
    """A source that does not exist: rsync exits 23, recorded `failed` with rsync's message;
    status shows that lastRsync beside its failing dry run."""
    code, body = ask(jobsite.agent, "rsync", "missing")
    assert code == 200 and body["checksum"] == jobsite.checksum("missing")
    if body["return"] == "false":  # it ended before the order was answered
        assert (body["outcome"], body["exitCode"]) == ("failed", 23)
    last = last_rsync(jobsite.agent, "missing")
    assert (last["outcome"], last["exitCode"]) == ("failed", 23)
    assert "No such file or directory" in last["message"] and "code 23" in last["message"]
    st = status(jobsite.agent, "missing")
    assert st["return"] == "false" and st["lastRsync"] == last


def test_max_delete_stops_deletions(jobsite):
    """max_delete = 2 reaches rsync as --max-delete=2: of 5 extra target files only 2 go, and
    rsync's exit 25 is recorded `failed` with its message."""
    target = jobsite.targets / "maxdel"
    target.mkdir()
    for i in range(5):
        (target / f"old_{i}").write_text("old")
    ask(jobsite.agent, "rsync", "maxdel")
    last = last_rsync(jobsite.agent, "maxdel")
    assert (last["outcome"], last["exitCode"]) == ("failed", 25)
    assert "--max-delete limit" in last["message"]
    assert len(list(target.glob("old_*"))) == 3
    argv = read_state(str(jobsite.state / f"{jobsite.key('maxdel')}.json"))["argv"]
    assert "--max-delete=2" in argv


def test_empty_source_with_delete_is_refused_unless_allowed(jobsite):
    """A source listing no files with --delete is refused with a clear message and the target
    is untouched; with allow_empty_source = true the same sync runs and empties the target."""
    for group in ("empty", "emptyok"):
        (jobsite.targets / group).mkdir()
        make_tree(jobsite.targets / group / "site", files=3, size=10)
    before = files(jobsite.targets / "empty")
    code, body = ask(jobsite.agent, "rsync", "empty")
    assert code == 200 and body["return"] == "false" and body["outcome"] == "refused"
    assert "lists no files" in body["message"] and "allow_empty_source" in body["message"]
    assert files(jobsite.targets / "empty") == before
    assert status(jobsite.agent, "empty")["lastRsync"]["outcome"] == "refused"
    code, body = ask(jobsite.agent, "rsync", "emptyok")
    assert code == 200 and body["return"] == "true"
    assert last_rsync(jobsite.agent, "emptyok")["outcome"] == "ok"
    assert files(jobsite.targets / "emptyok") == {}


def test_missing_rsync_binary_fails_clearly(jobsite):
    """A group whose rsync binary does not exist answers return false naming it, recorded
    `failed`; nothing is left running."""
    code, body = ask(jobsite.agent, "rsync", "norsync")
    assert code == 200 and body["return"] == "false" and body["outcome"] == "failed"
    assert "cannot run" in body["message"] and "no-such-rsync" in body["message"]
    assert ask(jobsite.agent, "rkill", "norsync") == (200, {"return": "true", "process": []})


def test_max_prefork_answers_503_at_once(jobsite, daemons, tmp_path):
    """With max_prefork = 1 and a sync running, orders that need a child answer 503 at once
    with a clear message; status of the running target still answers; once the sync is
    stopped there is room again."""
    groups = {k: jobsite.groups[k] for k in ("slow", "slow2")}
    agent = daemons.agent(
        groups=groups,
        state=tmp_path / "state503",
        allow_paths=[jobsite.targets],
        server={"max_prefork": 1, "rkill_grace": GRACE},
    )
    assert ask(agent, "rsync", "slow")[1]["return"] == "true"
    for order in ("rsync", "status"):
        t0 = time.monotonic()
        code, body = ask(agent, order, "slow2")
        assert code == 503 and "max_prefork = 1" in body, (order, body)
        assert time.monotonic() - t0 < 1.5
    assert status(agent, "slow")["alreadyRsync"] == "true"
    ask(agent, "rkill", "slow")
    assert last_rsync(agent, "slow")["outcome"] == "killed"
    code, body = ask(agent, "rsync", "slow2")
    assert code == 200 and body["return"] == "true"
    ask(agent, "rkill", "slow2")


def test_agent_refuses_to_start_without_writable_state_dir(daemons, tmp_path):
    """An agent whose state_path cannot hold records exits before it listens, saying why."""
    (tmp_path / "file").write_text("")
    agent = daemons.agent(state=tmp_path / "file" / "state", wait=False)
    agent.proc.wait(30)
    assert agent.proc.returncode != 0
    assert "not a writable directory" in agent.log_text()
