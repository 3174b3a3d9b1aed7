"""Unit tests of background syncs: the JobRegistry state machine on a Clock with a fake process
reactor and a fake /proc, atomic state records, /proc identity checks, and the supervisor's
outcome mapping run for real on fake rsync scripts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from deploy.agent import AgentService
from deploy.config import AgentConfig, RsyncGroup, ServerSettings
from deploy.jobs import (
    ANSWER_WITHIN,
    KILL_MARGIN,
    STARTING_GRACE,
    Job,
    JobError,
    JobRegistry,
    deletes_on_target,
    target_key,
)
from deploy.jobstart import child_env
from deploy.jobstate import error_message, read_state, write_state
from deploy.process import (
    GROUP_GONE_WITHIN,
    GROUP_POLL,
    SYNC_TAG,
    proc_start_ticks,
    process_group_pids,
    read_stat,
)
from deploy.rsync import RsyncTarget
from deploy.statedir import probe, secure_state_dir
from deploy.supervise_argv import package_root, supervisor_command
from tests.harness import wait_until

TARGET = RsyncTarget(dest="127.0.0.1::DEST/", src="/srv/www")
OTHER = RsyncTarget(dest="127.0.0.1::OTHER/", src="/srv/other")
KEY = target_key(TARGET)
GRACE = 3.0

ROOT = package_root()  # where `deploy` is imported from, for child processes


# --------------------------------------------------------------------------- fakes


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.stdin_closed = False

    def closeStdin(self) -> None:
        self.stdin_closed = True


@dataclass
class Spawned:
    proto: Any
    executable: str
    args: list[str]
    env: dict[str, str]
    child_fds: dict[int, Any]
    transport: FakeTransport


class FakeProcessReactor(task.Clock):
    """A Clock whose spawnProcess records the call and connects the protocol to a fake
    transport, so a test drives the child's output and end itself."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []
        self.fail: OSError | None = None
        self.next_pid = 7000

    def spawnProcess(
        self,
        proto,
        executable,
        args,
        env=None,
        path=None,
        uid=None,
        gid=None,
        usePTY=False,
        childFDs=None,
    ):
        if self.fail is not None:
            raise self.fail
        transport = FakeTransport(self.next_pid)
        self.next_pid += 1
        proto.makeConnection(transport)
        self.spawned.append(Spawned(proto, executable, list(args), env, childFDs, transport))
        return transport


class FakeProcesses:
    """A fake /proc: pid -> start ticks of the live processes, pgid -> members; records every
    signal instead of sending it. A KILL ends its processes at once, except those in
    `lingering`, which stay until a test drops them (a KILLed process takes a moment to go)."""

    def __init__(self) -> None:
        self.alive: dict[int, int] = {}
        self.groups: dict[int, list[int]] = {}
        self.lingering: set[int] = set()
        self.strangers: set[int] = set()
        self.sent: list[tuple[str, int, int]] = []

    def same(self, pid: int | None, start_ticks: int | None) -> bool:
        return bool(pid) and start_ticks is not None and self.alive.get(pid) == start_ticks

    def ours(self, pid: int | None, start_ticks: int | None, run_id: str | None) -> bool:
        """A live process of ours, unless a test put it in `strangers` (not tagged as a sync
        of this agent)."""
        return bool(run_id) and self.same(pid, start_ticks) and pid not in self.strangers

    def group(self, pgid: int) -> list[int]:
        return [p for p in self.groups.get(pgid, [pgid]) if p in self.alive]

    def signal(self, pid: int, sig: int) -> None:
        self.sent.append(("pid", pid, sig))
        self._killed([pid], sig)

    def signal_group(self, pgid: int, sig: int) -> None:
        self.sent.append(("group", pgid, sig))
        self._killed(self.group(pgid), sig)

    def _killed(self, pids: list[int], sig: int) -> None:
        if sig == signal.SIGKILL:
            for pid in pids:
                if pid not in self.lingering:
                    self.alive.pop(pid, None)


def fake_registry(tmp_path: Path) -> tuple[JobRegistry, FakeProcessReactor, FakeProcesses]:
    """A registry on a fake process reactor (at a plausible wall-clock time) and a fake /proc,
    its state in tmp_path/state."""
    reactor, procs = FakeProcessReactor(), FakeProcesses()
    reactor.advance(1_700_000_000)
    registry = JobRegistry(reactor, str(tmp_path / "state"), python="/py", processes=procs)
    return registry, reactor, procs


@pytest.fixture
def reactor() -> FakeProcessReactor:
    r = FakeProcessReactor()
    r.advance(1_700_000_000)  # a plausible wall-clock time for the records
    return r


@pytest.fixture
def procs() -> FakeProcesses:
    return FakeProcesses()


@pytest.fixture
def registry(reactor, procs, tmp_path) -> JobRegistry:
    return JobRegistry(
        reactor, str(tmp_path / "state"), grace=GRACE, python="/usr/bin/python3", processes=procs
    )


def rewrite_record(job, **fields) -> dict:
    """Change `fields` of the job's state record, as its supervisor does; the new record."""
    state = read_state(job.state_file)
    state.update(fields)
    write_state(job.state_file, state)
    return state


def supervisor_runs(registry, job, procs, *, sup_pid=7000, rsync_pid=7100, **extra):
    """Do what a supervisor does once it runs: take the record up, start rsync."""
    rewrite_record(
        job,
        state="running",
        supervisorPid=sup_pid,
        supervisorStart=11,
        rsyncPid=rsync_pid,
        rsyncStart=22,
        started=1_700_000_001.0,
        **extra,
    )
    procs.alive.update({sup_pid: 11, rsync_pid: 22, rsync_pid + 1: 23})
    procs.groups[rsync_pid] = [rsync_pid, rsync_pid + 1]


def supervisor_records_end(job, procs, *, outcome="ok", exit_code=0, message=""):
    state = rewrite_record(
        job,
        state="ended",
        outcome=outcome,
        exitCode=exit_code,
        ended=1_700_000_060.0,
        message=message,
        transferFilesCount=40,
        transferFilesSize=80000,
    )
    for pid in (state.get("rsyncPid"), state.get("supervisorPid")):
        procs.alive.pop(pid, None)
    procs.alive.pop((state.get("rsyncPid") or 0) + 1, None)


def ended(proto, code=0):
    reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)
    proto.processEnded(Failure(reason))


def started_job(registry, reactor, target=TARGET, **kw) -> tuple[Job, Spawned]:
    results = []
    registry.start(target, **kw).addCallback(results.append)
    spawned = reactor.spawned[-1]
    return spawned.proto.job, spawned


# --------------------------------------------------------------------------- start


def test_start_writes_starting_record_then_spawns_supervisor(registry, reactor, tmp_path):
    """start() records `starting` with a run id, then spawns the supervisor (`python -S -P -c`
    appending deploy's root to sys.path) with that id, the grace, the rsync argv (progress2),
    stderr to the job log, stdin closed."""
    job, spawned = started_job(registry, reactor, refuse_empty=True)
    record = read_state(job.state_file)
    assert record["state"] == "starting" and record["checksum"] == TARGET.checksum
    assert record["runId"] == job.run_id and record["created"] == reactor.seconds()
    args = spawned.args
    assert args[:4] == ["/usr/bin/python3", "-S", "-P", "-c"]
    assert "sys.path.append(" in args[4] and "from deploy.supervise import" in args[4]
    assert args[args.index("--state") + 1] == job.state_file
    assert args[args.index("--run") + 1] == job.run_id
    assert args[args.index("--grace") + 1] == str(GRACE)
    assert "--refuse-empty" in args
    rsync = args[args.index("--", 3) + 1 :]
    assert (
        rsync[0] == "rsync"
        and "--info=progress2" in rsync
        and rsync[-2:]
        == [
            TARGET.dest,
            TARGET.src,
        ]
    )
    assert spawned.child_fds[0] == "w" and spawned.child_fds[1] == "r"
    assert isinstance(spawned.child_fds[2], int) and os.path.exists(job.log_file)
    assert spawned.transport.stdin_closed
    assert "PATH" in spawned.env  # the agent's environment: rsync and the hooks get it as is
    assert spawned.env.get("PYTHONPATH") == os.environ.get("PYTHONPATH")


def test_start_without_refuse_empty_passes_no_flag(registry, reactor):
    """A group that allows an empty source spawns the supervisor without --refuse-empty."""
    _, spawned = started_job(registry, reactor, refuse_empty=False)
    assert "--refuse-empty" not in spawned.args


def test_start_fires_on_ready_split_in_chunks(registry, reactor, procs):
    """The Deferred fires once, on `ready`, however the supervisor's lines are chunked, with
    the record as the supervisor wrote it; no timer is left behind."""
    fired = []
    registry.start(TARGET).addCallback(fired.append)
    spawned = reactor.spawned[-1]
    job = spawned.proto.job
    supervisor_runs(registry, job, procs)
    data = b"pid 7100\nready\nready\n"
    for i in range(len(data)):
        spawned.proto.outReceived(data[i : i + 1])
        if i < len(b"pid 7100\nread"):
            assert fired == []
    assert len(fired) == 1
    assert fired[0].state["state"] == "running" and fired[0].rsync_pid == 7100
    assert reactor.getDelayedCalls() == []


def test_start_answers_after_timeout_without_ready(registry, reactor):
    """A supervisor that stays silent (a slow source listing) does not hold the order
    answer: it fires after ANSWER_WITHIN seconds."""
    fired = []
    registry.start(TARGET).addCallback(fired.append)
    reactor.advance(ANSWER_WITHIN - 0.1)
    assert fired == []
    reactor.advance(0.1)
    assert len(fired) == 1 and fired[0].state["state"] == "starting"
    assert reactor.getDelayedCalls() == []


def test_start_fires_on_early_end_with_outcome(registry, reactor, procs):
    """A sync that ends before it is under way (daemon down, refused) fires the Deferred with
    the recorded outcome, and the target is no longer running."""
    fired = []
    registry.start(TARGET).addCallback(fired.append)
    spawned = reactor.spawned[-1]
    job = spawned.proto.job
    supervisor_runs(registry, job, procs)
    supervisor_records_end(job, procs, outcome="failed", exit_code=10, message="connection refused")
    spawned.proto.outReceived(b"ended\n")
    ended(spawned.proto)
    assert fired[0].state["outcome"] == "failed"
    assert registry.running(KEY) is None
    assert registry.last_result(KEY)["exitCode"] == 10


def test_second_start_of_running_target_refused(registry, reactor):
    """While a target's sync is starting or running, a second start is refused and no
    second supervisor is spawned (the agent answers alreadyRsync before that)."""
    job, _ = started_job(registry, reactor)
    assert registry.running(KEY) is job
    with pytest.raises(JobError, match="already running"):
        registry.start(TARGET)
    assert len(reactor.spawned) == 1
    started_job(registry, reactor, target=OTHER)
    assert len(reactor.spawned) == 2 and registry.running_count() == 2


def test_start_in_unwritable_state_dir_is_a_clear_error(reactor, procs, tmp_path):
    """A state dir that cannot be created or written refuses the sync with a message naming
    it, and spawns nothing."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    registry = JobRegistry(reactor, str(blocker / "state"), processes=procs)
    with pytest.raises(JobError, match=f"cannot record the sync in {blocker}/state"):
        registry.start(TARGET)
    assert reactor.spawned == []
    assert registry.running(KEY) is None


def test_spawn_failure_records_failed(registry, reactor):
    """A supervisor that cannot be spawned leaves a `failed` record, not a `starting` one."""
    reactor.fail = OSError(2, "No such file or directory")
    with pytest.raises(JobError, match="cannot start the sync supervisor"):
        registry.start(TARGET)
    last = registry.last_result(KEY)
    assert last["outcome"] == "failed" and "cannot start" in last["message"]
    assert registry.running(KEY) is None


def test_bad_target_raises_value_error_before_any_record(registry, reactor, tmp_path):
    """A target rsync would read as an option is refused before anything is written."""
    with pytest.raises(ValueError):
        registry.start(RsyncTarget(dest="-e sh", src="/srv/www"))
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").iterdir())


def test_start_uses_group_state_dir(registry, reactor, tmp_path):
    """A group's queue_path holds that group's record, not the server's state dir."""
    queue = tmp_path / "queue"
    job, _ = started_job(registry, reactor, state_dir=str(queue))
    assert job.state_file == str(queue / f"{KEY}.json")
    assert read_state(job.state_file)["state"] == "starting"


# --------------------------------------------------------------------------- end of a sync


def test_supervisor_end_gives_last_result(registry, reactor, procs):
    """Once the supervisor records its end and exits, the target is idle and lastRsync holds
    outcome, exit code, ISO times and counts."""
    job, spawned = started_job(registry, reactor)
    supervisor_runs(registry, job, procs)
    assert registry.pids(job) == [7100, 7101]
    supervisor_records_end(job, procs, outcome="warning", exit_code=24, message="file has vanished")
    # The record decides, even before our child's exit is seen ...
    assert registry.running(KEY) is None
    ended(spawned.proto)
    # ... and that exit changes nothing after it.
    assert registry.running(KEY) is None
    assert registry.last_result(KEY) == {
        "checksum": TARGET.checksum,
        "runId": job.run_id,  # issue 13: the run that ended, for --wait and deploy
        "outcome": "warning",
        "exitCode": 24,
        "started": "2023-11-14T22:13:21Z",
        "ended": "2023-11-14T22:14:20Z",
        "transferFilesCount": 40,
        "transferFilesSize": 80000,
        "transferDeleteCount": None,  # this test's record has no count
        "message": "file has vanished",
    }


def test_last_result_none_while_running_or_never_run(registry, reactor, procs):
    """lastRsync exists only for an ended sync."""
    assert registry.last_result(KEY) is None
    job, _ = started_job(registry, reactor)
    supervisor_runs(registry, job, procs)
    assert registry.last_result(KEY) is None


def test_supervisor_crash_records_failed_with_its_last_words(registry, reactor, procs):
    """A supervisor that dies without an outcome gives `failed` with the last line of its log,
    and its orphaned rsync group is KILLed (nobody would record that one's end)."""
    job, spawned = started_job(registry, reactor)
    supervisor_runs(registry, job, procs)
    with open(job.log_file, "a") as f:
        f.write("Traceback (most recent call last):\nMemoryError: boom\n")
    procs.alive.pop(7000)
    ended(spawned.proto, code=1)
    last = registry.last_result(KEY)
    assert last["outcome"] == "failed"
    assert (
        "without recording an outcome" in last["message"] and "MemoryError: boom" in last["message"]
    )
    assert ("group", 7100, signal.SIGKILL) in procs.sent
    assert registry.running(KEY) is None


def test_abandoned_sync_is_recorded_only_once_rsyncs_group_is_gone(registry, reactor, procs):
    """A supervisor that dies leaves its rsync group KILLed, and its end is recorded only once
    no process of that group is left (a KILLed fork can take a moment): till then the target
    still runs; no timer is left after."""
    job, spawned = started_job(registry, reactor)
    supervisor_runs(registry, job, procs)
    procs.lingering.add(7101)
    procs.alive.pop(7000)
    ended(spawned.proto, code=1)
    assert ("group", 7100, signal.SIGKILL) in procs.sent
    reactor.advance(1)
    assert registry.last_result(KEY) is None
    assert registry.running(KEY) is job
    with pytest.raises(JobError, match="already running"):
        registry.start(TARGET)
    procs.alive.pop(7101)
    reactor.advance(GROUP_POLL)
    assert registry.last_result(KEY)["outcome"] == "failed"
    assert registry.running(KEY) is None
    assert reactor.getDelayedCalls() == []


def test_killed_sync_whose_supervisor_was_killed_waits_for_rsyncs_group(registry, reactor, procs):
    """rkill whose supervisor had to be KILLed: `killed` is recorded once rsync's group is gone,
    not before."""
    job, spawned = started_job(registry, reactor)
    supervisor_runs(registry, job, procs)
    registry.kill(KEY)
    procs.lingering.add(7101)
    procs.alive.pop(7000)
    ended(spawned.proto, code=9)
    assert registry.last_result(KEY) is None
    procs.alive.pop(7101)
    reactor.advance(GROUP_POLL)
    assert registry.last_result(KEY)["outcome"] == "killed"
    assert reactor.getDelayedCalls() == []


def test_group_that_will_not_go_holds_the_record_back_a_while(registry, reactor, procs):
    """A KILLed rsync group that does not go (a process stuck in the kernel) holds the record
    back GROUP_GONE_WITHIN at most."""
    job, spawned = started_job(registry, reactor)
    supervisor_runs(registry, job, procs)
    procs.lingering.update({7100, 7101})
    procs.alive.pop(7000)
    ended(spawned.proto, code=1)
    steps = round(GROUP_GONE_WITHIN / GROUP_POLL)
    reactor.pump([GROUP_POLL] * (steps - 2))
    assert registry.last_result(KEY) is None
    reactor.pump([GROUP_POLL] * 3)
    assert registry.last_result(KEY)["outcome"] == "failed"
    assert reactor.getDelayedCalls() == []


def test_progress_comes_from_the_record(registry, reactor, procs):
    """progress() is the supervisor's latest progress2 record, re-read each time."""
    job, _ = started_job(registry, reactor)
    assert registry.progress(job) is None
    supervisor_runs(
        registry,
        job,
        procs,
        progress={"bytes": 10, "percent": 1, "rate": "1kB/s", "eta": "0:01:00"},
    )
    assert registry.progress(job)["bytes"] == 10
    progress = {"bytes": 2000, "percent": 50, "rate": "2kB/s", "eta": "0:00:30"}
    rewrite_record(job, progress=progress)
    assert registry.progress(job) == progress


# --------------------------------------------------------------------------- rkill


def test_kill_terms_supervisor_and_it_records_killed(registry, reactor, procs):
    """rkill TERMs the supervisor (our child) and answers rsync's pids; when the supervisor
    records `killed` in time, the agent sends nothing more and leaves no timer."""
    job, spawned = started_job(registry, reactor)
    supervisor_runs(registry, job, procs)
    assert registry.kill(KEY) == [7100, 7101]
    assert procs.sent == [("pid", spawned.transport.pid, signal.SIGTERM)]
    supervisor_records_end(job, procs, outcome="killed", exit_code=None, message="stopped by rkill")
    reactor.advance(1)
    ended(spawned.proto)
    assert reactor.getDelayedCalls() == []
    reactor.advance(GRACE + KILL_MARGIN * 2)
    assert procs.sent == [("pid", spawned.transport.pid, signal.SIGTERM)]
    assert registry.last_result(KEY)["outcome"] == "killed"


def test_kill_escalates_when_rsync_outlives_grace(registry, reactor, procs):
    """If rsync's group still lives grace + margin after rkill, the agent KILLs it; if the
    supervisor then still has not recorded the end, the agent KILLs it too, and the sync is
    recorded `killed`."""
    job, spawned = started_job(registry, reactor)
    supervisor_runs(registry, job, procs)
    registry.kill(KEY)
    reactor.advance(GRACE + KILL_MARGIN - 0.01)
    assert ("group", 7100, signal.SIGKILL) not in procs.sent
    reactor.advance(0.01)
    assert ("group", 7100, signal.SIGKILL) in procs.sent
    procs.alive.pop(7100, None)
    procs.alive.pop(7101, None)
    reactor.advance(KILL_MARGIN)
    assert ("pid", spawned.transport.pid, signal.SIGKILL) in procs.sent
    ended(spawned.proto, code=9)
    assert registry.last_result(KEY)["outcome"] == "killed"
    assert reactor.getDelayedCalls() == []


def test_kill_while_starting_terms_our_child(registry, reactor, procs):
    """rkill before the supervisor wrote its pid still reaches it (the agent knows its
    child's pid); a supervisor that then dies leaves `killed`."""
    job, spawned = started_job(registry, reactor)
    assert registry.kill(KEY) == []
    assert procs.sent == [("pid", spawned.transport.pid, signal.SIGTERM)]
    ended(spawned.proto, code=15)
    assert registry.last_result(KEY)["outcome"] == "killed"


def test_kill_of_idle_target_answers_no_pids(registry, procs):
    """rkill of a target with nothing running answers [] and signals nothing."""
    assert registry.kill(KEY) == []
    assert procs.sent == []


def test_recover_stops_rsync_orphaned_by_its_supervisor(registry, reactor, procs, tmp_path):
    """A recovered sync whose supervisor is gone but whose rsync runs is recorded lost at
    recovery, its rsync KILLed: it can never run unaccounted for."""
    path = tmp_path / "state" / f"{KEY}.json"
    path.parent.mkdir()
    write_state(
        str(path),
        {
            "state": "running",
            "runId": "r",
            "supervisorPid": 50,
            "supervisorStart": 1,
            "rsyncPid": 51,
            "rsyncStart": 2,
        },
    )
    procs.alive[51] = 2
    assert registry.recover() == []
    assert ("group", 51, signal.SIGKILL) in procs.sent
    last = registry.last_result(KEY)
    assert last["outcome"] == "lost" and "rsync was stopped" in last["message"]


# --------------------------------------------------------------------------- restart


# The record of a sync a previous agent left running: supervisor 100 (started at 5) and its
# rsync 101 (started at 6).
LEFT_RUNNING = {
    "state": "running",
    "supervisorPid": 100,
    "supervisorStart": 5,
    "rsyncPid": 101,
    "rsyncStart": 6,
}


def record(directory: Path, checksum: str, **state) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{checksum}.json"
    write_state(str(path), {"checksum": checksum, "runId": "run-" + checksum, **state})
    return path


def test_recover_adopts_live_syncs_and_marks_dead_ones_lost(registry, reactor, procs, tmp_path):
    """After a restart: a record whose supervisor still runs (same pid AND start time) is
    adopted; a reused pid, an old unclaimed `starting` record are lost; a fresh `starting`
    record is given time; ended records are left alone; group dirs are scanned too."""
    state, queue = tmp_path / "state", tmp_path / "queue"
    now = reactor.seconds()
    record(state, "a" * 32, **LEFT_RUNNING)
    record(state, "b" * 32, state="running", supervisorPid=200, supervisorStart=5)
    record(state, "c" * 32, state="starting", created=now - 1)
    record(state, "d" * 32, state="starting", created=now - STARTING_GRACE - 1)
    record(state, "e" * 32, state="ended", outcome="ok", exitCode=0)
    record(queue, "f" * 32, state="running", supervisorPid=300, supervisorStart=7)
    procs.alive.update({100: 5, 101: 6, 200: 999, 300: 7})  # pid 200 now is another process
    found = registry.recover([str(queue), str(state)])
    assert sorted(j.checksum for j in found) == ["a" * 32, "c" * 32, "f" * 32]
    assert registry.running("a" * 32).rsync_pid == 101
    assert registry.pids(registry.running("a" * 32)) == [101]
    assert registry.running("f" * 32, str(queue)) is not None
    assert registry.last_result("b" * 32)["outcome"] == "lost"
    assert registry.last_result("d" * 32)["outcome"] == "lost"
    assert read_state(str(state / ("e" * 32 + ".json")))["outcome"] == "ok"
    assert ("pid", 200, signal.SIGKILL) not in procs.sent and ("group", 200, 9) not in procs.sent
    assert registry.running_count() == 3


def test_recovered_starting_record_runs_once_taken_up_or_is_lost(
    registry, reactor, procs, tmp_path
):
    """A `starting` record left by an agent killed mid-start counts as running while its
    supervisor may still take it up, and is lost after STARTING_GRACE if none does."""
    now = reactor.seconds()
    record(tmp_path / "state", "c" * 32, state="starting", created=now)
    record(tmp_path / "state", "d" * 32, state="starting", created=now)
    assert len(registry.recover()) == 2
    path = tmp_path / "state" / ("c" * 32 + ".json")
    rec = read_state(str(path))
    rec.update(state="running", supervisorPid=400, supervisorStart=1)
    write_state(str(path), rec)
    procs.alive[400] = 1
    reactor.advance(STARTING_GRACE)
    assert registry.running("c" * 32) is not None
    assert registry.running("d" * 32) is None
    assert registry.last_result("d" * 32)["outcome"] == "lost"


def test_adopted_sync_reports_its_real_outcome(registry, reactor, procs, tmp_path):
    """An adopted sync is running while its supervisor lives; once that one records its end
    and exits, lastRsync carries the real outcome and exit code, not `lost`."""
    progress = {"bytes": 5, "percent": 1, "rate": "1kB/s", "eta": "0:09:00"}
    record(tmp_path / "state", KEY, **LEFT_RUNNING, progress=progress)
    procs.alive.update({100: 5, 101: 6})
    (job,) = registry.recover()
    assert registry.progress(job)["bytes"] == 5
    assert registry.running(KEY) is job
    supervisor_records_end(job, procs, outcome="failed", exit_code=23, message="rsync: link_stat")
    assert registry.running(KEY) is None
    last = registry.last_result(KEY)
    assert (last["outcome"], last["exitCode"], last["message"]) == (
        "failed",
        23,
        "rsync: link_stat",
    )


def test_adopted_sync_whose_supervisor_vanishes_is_lost(registry, reactor, procs, tmp_path):
    """An adopted sync whose supervisor dies without an outcome is recorded `lost`."""
    record(tmp_path / "state", KEY, state="running", supervisorPid=100, supervisorStart=5)
    procs.alive[100] = 5
    registry.recover()
    procs.alive.pop(100)
    assert registry.running(KEY) is None
    assert registry.last_result(KEY)["outcome"] == "lost"


def test_kill_of_adopted_sync_terms_recorded_supervisor(registry, reactor, procs, tmp_path):
    """rkill after a restart TERMs the recorded supervisor (verified by start time); a
    supervisor that then dies without an outcome is recorded `killed`."""
    record(tmp_path / "state", KEY, **LEFT_RUNNING)
    procs.alive.update({100: 5, 101: 6})
    registry.recover()
    assert registry.kill(KEY) == [101]
    assert procs.sent == [("pid", 100, signal.SIGTERM)]
    procs.alive.clear()
    assert registry.running(KEY) is None
    assert registry.last_result(KEY)["outcome"] == "killed"
    assert reactor.getDelayedCalls() == []


def test_running_finds_a_sync_recover_missed(registry, reactor, procs, tmp_path):
    """A live sync in a dir recover() did not scan is still found when its target is asked
    about, so it never gets a second rsync."""
    queue = tmp_path / "queue"
    record(queue, KEY, state="running", supervisorPid=100, supervisorStart=5)
    procs.alive[100] = 5
    registry.recover()
    assert registry.running(KEY, str(queue)) is not None
    with pytest.raises(JobError):
        registry.start(TARGET, state_dir=str(queue))


def test_recover_removes_only_stale_temp_files(registry, tmp_path):
    """A temp record left by a process killed mid-write is removed once old; a fresh one (a
    write in progress) is kept."""
    state = tmp_path / "state"
    state.mkdir()
    old, fresh = state / ".tmp-old.json", state / ".tmp-new.json"
    old.write_text("{")
    fresh.write_text("{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    registry.recover()
    assert not old.exists() and fresh.exists()


def test_record_of_another_run_is_not_overwritten(registry, reactor, procs):
    """The agent never records an end over a record that now belongs to another run."""
    job, spawned = started_job(registry, reactor)
    other = dict(read_state(job.state_file), runId="someone-else", state="running")
    write_state(job.state_file, other)
    ended(spawned.proto, code=1)
    assert read_state(job.state_file)["runId"] == "someone-else"


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("options", "deletes"),
    [
        (None, True),
        (("--archive",), False),
        (("--archive", "--delay-updates"), False),
        (("--archive", "--del"), True),
        (("--archive", "--delete-after"), True),
        (("--archive", "--delete-excluded"), True),
    ],
)
def test_deletes_on_target(options, deletes):
    """Only --del/--delete* options (or the default flags) make a sync delete; --delay-updates
    does not."""
    assert deletes_on_target(RsyncTarget("h::m/", "/t", options=options)) is deletes


def test_check_state_dir_names_the_bad_dir(tmp_path):
    """A state dir under a regular file fails with an OSError naming it; a good one is created
    and left without probe files."""
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="file/state is not a writable directory"):
        probe(secure_state_dir(str(tmp_path / "file" / "state"), owners={0}, uid=0))
    probe(secure_state_dir(str(tmp_path / "ok"), owners={0}, uid=0))
    assert list((tmp_path / "ok").iterdir()) == []


def agent_config(state: Path, groups: dict[str, RsyncGroup] | None = None) -> AgentConfig:
    return AgentConfig(
        path=None,
        server=ServerSettings(state_path=str(state)),
        allow_hosts=["127.0.0.1"],
        allow_paths=["/srv"],
        groups=groups or {},
        jobs_path=None,
        jobs={},
    )


def test_agent_startup_refuses_unwritable_state_dir(tmp_path):
    """The agent does not start with a state dir no sync could record itself in."""
    (tmp_path / "file").write_text("")
    service = AgentService(agent_config(tmp_path / "file" / "state"), FakeProcessReactor())
    with pytest.raises(OSError, match="not a writable directory"):
        service.startup()


def test_agent_startup_recovers_group_queue_path(tmp_path, monkeypatch):
    """A group's old `queue_path` is its state dir: startup creates it and re-adopts the live
    syncs recorded there."""
    queue = tmp_path / "queue"
    group = RsyncGroup("web", TARGET.dest, TARGET.src, 1, queue_path=str(queue))
    # A live process tagged as this record's sync stands for its supervisor.
    supervisor = subprocess.Popen(["sleep", "60"], env={SYNC_TAG: "run-" + KEY})
    try:
        record(
            queue,
            KEY,
            state="running",
            supervisorPid=supervisor.pid,
            supervisorStart=proc_start_ticks(supervisor.pid),
        )
        service = AgentService(
            agent_config(tmp_path / "state", {"web": group}), FakeProcessReactor()
        )
        service.startup()
        assert (tmp_path / "state").is_dir()
        # counted before anyone asks about the target: found by startup, not on demand
        assert service.jobs.running_count() == 1
        assert service.jobs.running(KEY, str(queue)) is not None
    finally:
        supervisor.kill()
        supervisor.wait()


# --------------------------------------------------------------------------- jobstate


def test_write_state_replaces_whole_record(tmp_path):
    """write_state then read_state round-trips; a second write replaces the record."""
    path = str(tmp_path / "j.json")
    write_state(path, {"a": 1})
    write_state(path, {"b": 2})
    assert read_state(path) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["j.json"]


def test_write_state_error_mid_write_keeps_old_record(tmp_path, monkeypatch):
    """A write that fails half-way (disk full) leaves the old record intact and no temp."""
    path = str(tmp_path / "j.json")
    write_state(path, {"outcome": "ok"})

    def half_dump(obj, f, **kw):
        f.write('{"outcome": "fa')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", half_dump)
    with pytest.raises(OSError):
        write_state(path, {"outcome": "failed"})
    assert read_state(path) == {"outcome": "ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["j.json"]


def test_write_state_process_killed_mid_write_keeps_old_record(tmp_path):
    """A process that dies mid-write (here: exits hard before the rename) leaves the old record
    readable; only a temp file (ignored by readers) remains."""
    path = tmp_path / "j.json"
    write_state(str(path), {"outcome": "ok"})
    code = (
        "import os, deploy.jobstate as j\n"
        "os.fsync = lambda fd: os._exit(9)\n"
        f"j.write_state({str(path)!r}, {{'outcome': 'failed', 'pad': 'x' * 100000}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=dict(child_env(), PYTHONPATH=ROOT))
    assert proc.returncode == 9
    assert read_state(str(path)) == {"outcome": "ok"}
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_read_state_refuses_garbage(tmp_path):
    """A missing, truncated or non-object record reads as None, never raises."""
    assert read_state(str(tmp_path / "none.json")) is None
    (tmp_path / "half.json").write_text('{"state": "run')
    assert read_state(str(tmp_path / "half.json")) is None
    (tmp_path / "list.json").write_text("[1]")
    assert read_state(str(tmp_path / "list.json")) is None


def test_error_message_picks_rsync_explanations():
    """error_message keeps rsync's own explanations (vanished, max-delete, errors), else the
    tail."""
    text = (
        'noise\nfile has vanished: "/s/z"\n'
        "rsync warning: some files vanished before they could be transferred (code 24)\n"
    )
    assert error_message(text) == (
        'file has vanished: "/s/z"\n'
        "rsync warning: some files vanished before they could be transferred (code 24)"
    )
    assert error_message("Deletions stopped due to --max-delete limit (3 skipped)\n").startswith(
        "Deletions stopped"
    )
    assert error_message("a\nb\n") == "a\nb"


# --------------------------------------------------------------------------- the supervisor

FAKE_RSYNC = """#!{python}
import os, signal, sys, time
args = sys.argv[1:]
if "--list-only" in args:
    sys.stdout.write({listing!r})
    sys.exit(0)
with open({marker!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
{body}
"""

PROGRESS = """
for i in range(1, {steps}):
    line = "%15s %3d%%  1.00MB/s    0:00:0%d  " % (format(i * 1000, ","), i * 5, 9 - i % 9)
    sys.stdout.write("\\r" + line)
    sys.stdout.flush()
    time.sleep({pause})
sys.stdout.write("\\n>f+++++++++ a\\nNumber of regular files transferred: 3\\n"
                 "Total transferred file size: 7,000 bytes\\n")
"""


@dataclass
class SupervisorRun:
    proc: subprocess.Popen[bytes]
    state: Path
    marker: Path

    def record(self) -> dict[str, Any]:
        return read_state(str(self.state)) or {}

    def finish(self, timeout: float = 20) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)
        self.stdout = out.decode()
        return self.record()


_RUNS: list[SupervisorRun] = []


@pytest.fixture(autouse=True)
def _stop_leftover_supervisors():
    """What a failing test leaves running is stopped: the supervisor, then rsync's group."""
    yield
    while _RUNS:
        run = _RUNS.pop()
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        pid = run.record().get("rsyncPid")
        if pid and process_group_pids(pid):
            os.killpg(pid, signal.SIGKILL)


def supervise(
    tmp_path: Path,
    body: str = "",
    *,
    listing: str = ".\n",
    refuse_empty: bool = False,
    grace: float = 1.0,
    rsync: str | None = None,
    record_state: dict[str, Any] | None = None,
    run_id: str = "run-1",
) -> SupervisorRun:
    """Run the real supervisor on a fake rsync script (made with this interpreter)."""
    fake = tmp_path / "fake-rsync"
    marker = tmp_path / "ran"
    fake.write_text(
        FAKE_RSYNC.format(python=sys.executable, listing=listing, marker=str(marker), body=body)
    )
    fake.chmod(0o755)
    state = tmp_path / "job.json"
    write_state(
        str(state), record_state or {"state": "starting", "runId": "run-1", "checksum": "c"}
    )
    rsync_argv = [rsync or str(fake), "--archive", "--delete", "--port=873", "--", "h::M/", "/t"]
    cmd = supervisor_command(
        sys.executable, str(state), run_id, grace, refuse_empty, None, rsync_argv
    )
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "job.log", "wb"),
        env=child_env(),
    )
    run = SupervisorRun(proc, state, marker)
    _RUNS.append(run)
    return run


def test_supervisor_ok_records_progress_stats_and_pids(tmp_path):
    """Exit 0 is `ok`, with the stats block's counts, the last progress record, the pids and
    start times of supervisor and rsync; it told its parent `pid N` then `ended`."""
    run = supervise(tmp_path, PROGRESS.format(steps=4, pause=0.05))
    rec = run.finish()
    assert (rec["state"], rec["outcome"], rec["exitCode"]) == ("ended", "ok", 0)
    assert rec["transferFilesCount"] == 3 and rec["transferFilesSize"] == 7000
    assert rec["progress"] == {
        "bytes": 3000,
        "percent": 15,
        "rate": "1.00MB/s",
        "eta": "0:00:06",
        "elapsed": rec["progress"]["elapsed"],  # issue 15: by the supervisor's clock
    }
    assert re.fullmatch(r"0:00:0\d", rec["progress"]["elapsed"])
    assert rec["transferDeleteCount"] == 0
    assert rec["supervisorPid"] == run.proc.pid and rec["rsyncPid"] != run.proc.pid
    assert rec["supervisorStart"] and rec["rsyncStart"] and rec["started"] <= rec["ended"]
    assert rec["runId"] == "run-1" and rec["checksum"] == "c"
    # rsync talked at once: `ready`, then the supervisor hung up (`ended` goes nowhere)
    assert run.stdout.splitlines() == [f"pid {rec['rsyncPid']}", "ready"]


def test_supervisor_writes_growing_progress_while_running(tmp_path):
    """While rsync runs the record carries its progress, rewritten as it grows."""
    run = supervise(tmp_path, PROGRESS.format(steps=30, pause=0.1))
    seen = set()

    def grew():
        p = run.record().get("progress")
        if p:
            seen.add(p["bytes"])
        return len(seen) >= 3

    wait_until(grew, 15, 0.05, "progress to grow three times")
    assert run.record()["state"] == "running"
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish()["outcome"] == "killed"


VANISHED = 'file has vanished: "/s/z"\nrsync warning: some files vanished (code 24)\n'
LINK_STAT = (
    'rsync: [sender] link_stat "/s/x" failed: No such file or directory (2)\n'
    "rsync error: some files/attrs were not transferred (code 23)\n"
)
MAX_DELETE = (
    "Deletions stopped due to --max-delete limit (3 skipped)\n"
    "rsync error: the --max-delete limit stopped deletions (code 25)\n"
)


@pytest.mark.parametrize(
    ("exit_code", "stderr", "outcome"),
    [(24, VANISHED, "warning"), (23, LINK_STAT, "failed"), (25, MAX_DELETE, "failed")],
)
def test_supervisor_outcome_by_exit_code(tmp_path, exit_code, stderr, outcome):
    """Exit 24 (vanished files) is a warning; 23, 25 and the rest are failures, each with
    rsync's own message and the tail of its stderr."""
    body = f"sys.stderr.write({stderr!r})\nsys.exit({exit_code})"
    rec = supervise(tmp_path, "\n" + body).finish()
    assert (rec["outcome"], rec["exitCode"]) == (outcome, exit_code)
    assert rec["message"] == stderr.strip() and rec["stderrTail"] == stderr


def test_supervisor_silent_failure_names_exit_code(tmp_path):
    """An rsync that fails without a word gets a message with its exit code."""
    rec = supervise(tmp_path, "sys.exit(12)").finish()
    assert (rec["outcome"], rec["exitCode"], rec["message"]) == (
        "failed",
        12,
        "rsync exited with code 12",
    )


def test_supervisor_rsync_killed_by_signal_is_failed(tmp_path):
    """An rsync killed by a signal nobody asked for is `failed`, with the signal."""
    rec = supervise(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)").finish()
    assert (rec["outcome"], rec["exitCode"], rec["signal"]) == ("failed", None, 9)
    assert rec["message"] == "rsync killed by signal 9"


def test_supervisor_term_then_kill_after_grace(tmp_path):
    """TERM to the supervisor TERMs rsync's whole group; a group that ignores TERM is KILLed
    after the grace period (not before), and the outcome is `killed`."""
    body = (
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "os.fork()\n"
        "sys.stdout.write('    1,000   1%   1.00kB/s    0:10:00\\r'); sys.stdout.flush()\n"
        "while True: time.sleep(1)\n"
    )
    grace = 1.5
    run = supervise(tmp_path, body, grace=grace)
    rsync = wait_until(lambda: run.record().get("rsyncPid"), 10, what="rsync to start")
    wait_until(lambda: len(process_group_pids(rsync)) == 2, 10, what="rsync's fork")
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: process_group_pids(rsync) == [], grace + 3, what="rsync's group to go")
    elapsed = time.monotonic() - t0
    assert elapsed >= grace - 0.3, "TERM was ignored: only KILL after the grace period ends it"
    rec = run.finish()
    assert (rec["outcome"], rec["signal"], rec["message"]) == ("killed", 9, "stopped by rkill")


# A forked rsync (the receiver) that ignores TERM and outlives its parent. Its ballast makes it
# slow to go even by KILL: what a KILL took still shows in /proc for tens of milliseconds.
LINGERING_FORK = """
if os.fork() == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.close(1)
    os.close(2)
    ballast = b"x" * (256 << 20)
    open({forked!r}, "w").close()
    while True:
        time.sleep(1)
sys.stdout.write('    1,000   1%   1.00kB/s    0:10:00\\r')
sys.stdout.flush()
time.sleep(60)
"""


def test_supervisor_records_killed_only_once_rsyncs_group_is_gone(tmp_path):
    """rkill of an rsync whose fork ignores TERM and outlives it: the fork is KILLed, and
    `killed` is recorded only once no process of rsync's group is alive."""
    forked = tmp_path / "forked"
    run = supervise(tmp_path, LINGERING_FORK.format(forked=str(forked)), grace=30)
    rsync = wait_until(lambda: run.record().get("rsyncPid"), 10, what="rsync to start")
    wait_until(forked.exists, 20, what="rsync's fork and its ballast")
    members = process_group_pids(rsync)
    assert len(members) == 2
    run.proc.send_signal(signal.SIGTERM)

    def ended() -> dict[str, Any] | None:
        record = run.record()
        return record if record.get("state") == "ended" else None

    record = wait_until(ended, 20, 0.001, "the end to be recorded")
    still = [p for p in members if (stat := read_stat(p)) is not None and stat.alive]
    assert record["outcome"] == "killed" and still == []
    run.finish()


def test_supervisor_term_stops_a_cooperative_rsync_at_once(tmp_path):
    """An rsync that obeys TERM ends well within the grace period, recorded `killed`."""
    body = "sys.stdout.write('    1,000   1%   1.00kB/s    0:10:00\\r'); sys.stdout.flush()\n"
    body += "time.sleep(60)\n"
    run = supervise(tmp_path, body, grace=30)
    wait_until(lambda: run.record().get("rsyncPid"), 10, what="rsync to start")
    run.proc.send_signal(signal.SIGTERM)
    rec = run.finish(timeout=10)
    assert (rec["outcome"], rec["signal"]) == ("killed", 15)


def test_supervisor_missing_rsync_binary_is_failed(tmp_path):
    """An rsync binary that does not exist gives `failed` with a message naming it."""
    rec = supervise(tmp_path, rsync=str(tmp_path / "no-rsync")).finish()
    assert rec["outcome"] == "failed" and rec["exitCode"] is None
    assert rec["message"].startswith(f"cannot run {tmp_path / 'no-rsync'}: ")


def test_supervisor_refuses_empty_source_without_running_rsync(tmp_path):
    """With --refuse-empty, a source that lists only `.` is refused with a clear message and
    rsync never runs; the listing got the connection options and the source as a dir."""
    run = supervise(
        tmp_path,
        "sys.exit(0)",
        listing="drwxr-xr-x   4,096 2024/01/01 00:00:00 .\n",
        refuse_empty=True,
    )
    rec = run.finish()
    assert rec["outcome"] == "refused" and rec["exitCode"] is None
    assert "lists no files" in rec["message"] and "allow_empty_source" in rec["message"]
    assert not run.marker.exists()
    assert run.stdout.splitlines() == ["ended"]


def test_supervisor_runs_nonempty_source_with_refuse_empty(tmp_path):
    """With --refuse-empty, a source that lists files is synced normally."""
    listing = ".\n-rw-r--r--   2 2024/01/01 00:00:00 a file\n"
    run = supervise(tmp_path, "sys.exit(0)", listing=listing, refuse_empty=True)
    assert run.finish()["outcome"] == "ok" and run.marker.exists()


def test_supervisor_refuses_a_record_not_its_own(tmp_path):
    """A supervisor whose record is not its run's `starting` one (a late duplicate, a record
    already given up as lost) does nothing: no rsync, the record untouched."""
    lost = {"state": "ended", "outcome": "lost", "runId": "run-1"}
    run = supervise(tmp_path, "sys.exit(0)", record_state=lost)
    assert run.finish() == lost and run.proc.returncode == 2
    run = supervise(tmp_path, "sys.exit(0)", run_id="run-2")
    assert run.finish()["state"] == "starting" and run.proc.returncode == 2
    assert not run.marker.exists()
    assert "not syncing" in (tmp_path / "job.log").read_text()
