"""A full state disk is reported truthfully (issue 12, point 13): the agent starts on a full state
file system with one warning, status and exec work, new syncs are refused with 503; an end that
cannot be written is kept, answered and written once there is space (by the agent, and by the
sync's supervisor, which waits with it) — never `lost`, and without a log line per status. Unit
tests on the registry, then a real agent on a small tmpfs."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import capturedLogs

from deploy import jobends, jobstart, statedir
from deploy.agent import AgentService
from deploy.errors import status_for
from deploy.jobs import JobRegistry, StateFull, target_key
from deploy.jobstate import read_state
from deploy.rsync import RsyncTarget
from tests.conftest import JOBS
from tests.harness import AgentProcess, ask, make_tree, wait_until
from tests.test_jobs import (
    KEY,
    TARGET,
    FakeProcesses,
    FakeProcessReactor,
    agent_config,
    ended,
    fake_registry,
    record,
    supervisor_runs,
)

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")


def no_space(*args: Any, **kw: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def warnings(events: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [e for e in events if text in e.get("log_format", "")]


@pytest.fixture
def registry(tmp_path) -> tuple[JobRegistry, FakeProcessReactor, FakeProcesses]:
    return fake_registry(tmp_path)


# --------------------------------------------------------------------------- the registry


def test_startup_on_a_full_state_disk_warns_once_and_starts(tmp_path, monkeypatch):
    """The start-up probe finding the state file system full is one warning, not a refusal."""
    monkeypatch.setattr(statedir, "write_state", no_space)
    service = AgentService(agent_config(tmp_path / "state"), FakeProcessReactor())
    with capturedLogs() as events:
        service.startup()
    (warning,) = warnings(events, "is full")
    assert warning["directory"] == str(tmp_path / "state")


def test_a_new_sync_on_a_full_state_disk_is_503_and_leaves_nothing(registry, monkeypatch):
    """start() that cannot write the starting record raises StateFull (503), spawns nothing
    and leaves no log file behind."""
    registry, reactor, _ = registry
    monkeypatch.setattr(jobstart, "write_state", no_space)
    with pytest.raises(StateFull) as refused:
        registry.start(TARGET)
    assert status_for(refused.value) == 503 and "is full" in str(refused.value)
    assert reactor.spawned == [] and os.listdir(registry.directory()) == []
    assert registry.running(KEY) is None


def test_an_end_the_agent_cannot_write_is_answered_then_written_once_there_is_space(
    registry, monkeypatch
):
    """A supervisor dies without its end; the disk is full: the agent answers the end
    (`failed`) from memory — never `lost` or running — logs the full disk once however often
    it is asked, and writes the record once it can (tried again every RETRY_RECORD s)."""
    registry, reactor, procs = registry
    registry.start(TARGET)
    spawned = reactor.spawned[-1]
    supervisor_runs(registry, spawned.proto.job, procs)
    monkeypatch.setattr(jobends, "write_state", no_space)
    with capturedLogs() as events:
        ended(spawned.proto, code=1)
        for _ in range(10):
            assert registry.running(KEY) is None
            assert registry.last_result(KEY)["outcome"] == "failed"
            reactor.advance(jobends.RETRY_RECORD)
    assert len(warnings(events, "is full")) == 1 and not warnings(events, "cannot record")
    assert read_state(spawned.proto.job.state_file)["state"] == "running"
    monkeypatch.undo()
    reactor.advance(jobends.RETRY_RECORD)
    with capturedLogs() as events:
        assert registry.last_result(KEY)["outcome"] == "failed"
        registry.running_count()
    assert read_state(spawned.proto.job.state_file)["outcome"] == "failed"
    assert len(warnings(events, "is recorded now")) == 1
    assert registry.ends.unwritten == {}


def test_a_lost_sync_found_on_a_full_disk_is_not_found_again_at_each_status(
    registry, tmp_path, monkeypatch
):
    """A record of a sync whose supervisor is gone, found on a full disk: it is lost once (one
    warning), not re-adopted and warned about again at every status."""
    registry, reactor, _ = registry
    record(tmp_path / "state", KEY, state="running", supervisorPid=100, supervisorStart=5)
    monkeypatch.setattr(jobends, "write_state", no_space)
    with capturedLogs() as events:
        registry.recover()
        for _ in range(10):
            assert registry.running(KEY) is None
            assert registry.last_result(KEY)["outcome"] == "lost"
    assert len(warnings(events, "supervisor is gone")) == 1
    assert len(warnings(events, "is full")) == 1


# --------------------------------------------------------------------------- a real agent


@pytest.fixture
def small_fs(daemons, tmp_path) -> Iterator[Path]:
    """A 512 KiB tmpfs for the state directory, unmounted once the daemons are stopped."""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        daemons.stop_all()
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(fs: Path) -> Path:
    """Fill file system `fs` to the last byte; the file that did it."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def complaints(agent: AgentProcess) -> int:
    """Warnings and errors in the agent's log so far."""
    return len(re.findall(r"#(warn|error|critical)\]", agent.log_text()))


@ROOT_ONLY
def test_an_agent_on_a_full_state_disk_starts_and_refuses_only_new_syncs(
    daemons, small_fs, tmp_path
):
    """State on a full tmpfs: the agent starts with one warning; exec and status answer, rsync
    is 503 saying the state file system is full; statuses add no log line; once there is space
    a sync runs."""
    tree = make_tree(tmp_path / "tree", files=5, size=100)
    rsyncd = daemons.rsyncd({"DEST": tree})
    targets = tmp_path / "targets"
    targets.mkdir()
    jobs = tmp_path / "jobs.ini"
    jobs.write_text(JOBS)
    state = small_fs / "state"
    state.mkdir()
    filler = fill(small_fs)
    agent = daemons.agent(
        groups={"web": rsyncd.group(targets / "web", "--archive")},
        jobs=jobs,
        state=state,
        allow_paths=[targets],
    )
    assert agent.log_text().count("is full") == 1
    said = complaints(agent)
    assert ask(agent, "exec", "service:echo,hi")[1]["content"] == "aGkK"
    code, body = ask(agent, "rsync", "web")
    assert code == 503 and f"state file system of {state} is full" in body, body
    for _ in range(5):
        code, body = ask(agent, "status", "web")
        assert code == 200 and body["transferFilesCount"] == "5", body
    assert complaints(agent) == said
    filler.unlink()
    checksum = RsyncTarget(dest=rsyncd.url("DEST"), src=str(targets / "web")).checksum
    code, started = ask(agent, "rsync", "web")
    assert code == 200 and started.pop("runId")  # this run's id (issue 15)
    assert started == {"checksum": checksum, "return": "true"}

    def synced() -> dict[str, Any] | None:
        body = ask(agent, "status", "web")[1]
        return body.get("lastRsync") if body["alreadyRsync"] == "false" else None

    assert wait_until(synced, 30, 0.1, "the sync to end")["outcome"] == "ok"


@ROOT_ONLY
def test_a_sync_that_ends_while_the_state_disk_is_full_reports_its_real_outcome(
    daemons, small_fs, tmp_path
):
    """The state disk fills while a sync runs; rsync ends: its supervisor cannot record the end
    and waits — the agent says the sync still runs (never `lost`); once there is space the real
    outcome (`ok`, exit code 0, its counts) is recorded and reported."""
    tree = make_tree(tmp_path / "tree", files=24, size=100_000)
    rsyncd = daemons.rsyncd({"BIG": tree})
    targets = tmp_path / "targets"
    targets.mkdir()
    state = small_fs / "state"
    agent = daemons.agent(
        groups={"slow": rsyncd.group(targets / "slow", "--archive", "--bwlimit=800", module="BIG")},
        state=state,
        allow_paths=[targets],
    )
    assert ask(agent, "rsync", "slow")[1]["return"] == "true"

    def status() -> dict[str, Any]:
        code, body = ask(agent, "status", "slow")
        assert code == 200, body
        return body

    wait_until(lambda: status().get("progress"), 20, 0.1, "the sync to make progress")
    filler = fill(small_fs)
    # rsync finishes (its processes are gone) while nothing can be written
    done = wait_until(lambda: (b := status())["process"] == [] and b, 30, 0.1, "rsync to end")
    assert done["alreadyRsync"] == "true" and "lastRsync" not in done
    assert len(list((targets / "slow").rglob("*.dat"))) == 24
    key = target_key(RsyncTarget(dest=rsyncd.url("BIG"), src=str(targets / "slow")))
    assert read_state(str(state / f"{key}.json"))["state"] == "running"
    filler.unlink()

    def last() -> dict[str, Any] | None:
        body = status()
        return body.get("lastRsync") if body["alreadyRsync"] == "false" else None

    result = wait_until(last, 30, 0.1, "the end to be recorded")
    assert (result["outcome"], result["exitCode"], result["transferFilesCount"]) == ("ok", 0, 24)
