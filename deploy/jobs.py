"""Background syncs: at most one per target (job id = the target's checksum), each run by a
`deploy.supervise` process that outlives the agent; their pids, progress and last result, read
back from the persisted state so an agent restart loses nothing."""

from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deploy.jobstate import (
    OUTCOME_FAILED,
    OUTCOME_LOST,
    is_same_process,
    process_group_pids,
    read_state,
    write_state,
)
from deploy.rsync import RsyncTarget, build_argv


class JobError(Exception):
    """A sync that could not be started; the message is for the user."""


@dataclass
class Job:
    checksum: str
    state_file: str
    state: dict[str, Any] = field(default_factory=dict)
    supervisor: SupervisorProtocol | None = None

    @property
    def rsync_pid(self) -> int | None:
        return self.state.get("rsyncPid")

    def pids(self) -> list[int]:
        """The running rsync processes (rsync forks a receiver: usually two)."""
        pid = self.rsync_pid
        if pid and is_same_process(pid, self.state.get("rsyncStart")):
            return process_group_pids(pid)
        return []


class SupervisorProtocol(protocol.ProcessProtocol):
    """Listens to a supervisor while it talks (`pid N`, `ready`, `ended`) and to its end."""

    def __init__(self, registry: JobRegistry, job: Job) -> None:
        self.registry = registry
        self.job = job
        self.started: defer.Deferred[Job] = defer.Deferred()
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines[:16]:
            word, _, arg = line.decode("ascii", "replace").partition(" ")
            if word == "pid" and arg.isdigit():
                self.job.state["rsyncPid"] = int(arg)
            elif word in ("ready", "ended"):
                self._fire()
        self._buffer = self._buffer[-1024:]

    def processEnded(self, reason: Failure) -> None:
        self.registry._ended(self.job)
        self._fire()

    def _fire(self) -> None:
        if not self.started.called:
            self.job.state = read_state(self.job.state_file) or self.job.state
            self.started.callback(self.job)


class JobRegistry:
    """The agent's background syncs, keyed by checksum."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        state_dir: str,
        *,
        grace: float = 5.0,
        python: str = sys.executable,
    ) -> None:
        self.reactor = reactor
        self.state_dir = state_dir
        self.grace = grace
        self.python = python
        self._jobs: dict[str, Job] = {}

    def state_file(self, checksum: str, state_dir: str | None = None) -> str:
        return os.path.join(state_dir or self.state_dir, checksum + ".json")

    # -- start-up

    def recover(self) -> list[Job]:
        """Find syncs that a previous agent started and that still run; mark dead ones lost."""
        found = []
        try:
            names = sorted(os.listdir(self.state_dir))
        except OSError:
            return found
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = os.path.join(self.state_dir, name)
            state = read_state(path)
            if not state or state.get("state") not in ("starting", "running"):
                continue
            job = Job(name[: -len(".json")], path, state)
            if self._alive(job):
                self._jobs[job.checksum] = job
                found.append(job)
                self.log.info(
                    "resumed watching sync {checksum} (rsync pid {pid})",
                    checksum=job.checksum,
                    pid=job.rsync_pid,
                )
            else:
                self._mark_lost(job)
        return found

    # -- questions

    def running(self, checksum: str) -> Job | None:
        job = self._jobs.get(checksum)
        if job is None:
            return None
        if job.supervisor is None:  # adopted after a restart: only /proc can tell
            job.state = read_state(job.state_file) or job.state
            if job.state.get("state") == "ended" or not self._alive(job):
                self._ended(job)
                return None
        return job

    def running_count(self) -> int:
        return sum(1 for c in list(self._jobs) if self.running(c))

    def last_result(self, checksum: str, state_dir: str | None = None) -> dict[str, Any] | None:
        """The `lastRsync` record of the target's last finished sync, if there was one."""
        state = read_state(self.state_file(checksum, state_dir))
        if not state or state.get("state") != "ended":
            return None
        return {
            "checksum": checksum,
            "outcome": state.get("outcome"),
            "exitCode": state.get("exitCode"),
            "started": _iso(state.get("started")),
            "ended": _iso(state.get("ended")),
            "transferFilesCount": state.get("transferFilesCount"),
            "transferFilesSize": state.get("transferFilesSize"),
            "message": state.get("message") or "",
        }

    def progress(self, job: Job) -> dict[str, Any] | None:
        state = read_state(job.state_file) or job.state
        job.state.update({k: v for k, v in state.items() if k not in ("state",)})
        return state.get("progress")

    # -- orders

    def start(
        self, target: RsyncTarget, *, refuse_empty: bool = False, state_dir: str | None = None
    ) -> defer.Deferred[Job]:
        """Start the sync of `target` under a supervisor; fires once rsync is under way (or has
        already ended, e.g. because the rsync daemon is down)."""
        checksum = target.checksum
        if self.running(checksum):
            raise JobError(f"a sync of {checksum} is already running")
        path = self.state_file(checksum, state_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        argv = build_argv(target, dry_run=False, progress=True)
        state = {
            "checksum": checksum,
            "state": "starting",
            "dest": target.dest,
            "src": target.src,
            "argv": argv,
        }
        write_state(path, state)
        job = Job(checksum, path, state)
        proto = SupervisorProtocol(self, job)
        job.supervisor = proto
        cmd = [self.python, "-m", "deploy.supervise", "--state", path, "--grace", str(self.grace)]
        if refuse_empty:
            cmd.append("--refuse-empty")
        cmd += ["--", *argv]
        log_fd = os.open(
            path[: -len(".json")] + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        try:
            self.reactor.spawnProcess(
                proto,
                self.python,
                cmd,
                env=_child_env(),
                usePTY=False,
                childFDs={0: "w", 1: "r", 2: log_fd},
            )
        except OSError as e:
            raise JobError(f"cannot start the sync supervisor: {e}") from e
        finally:
            os.close(log_fd)
        proto.transport.closeStdin()
        self._jobs[checksum] = job
        return proto.started

    def kill(self, checksum: str) -> list[int]:
        """Stop the target's sync: TERM to its process group, KILL after the grace period.
        Answers the pids that were running."""
        job = self.running(checksum)
        if job is None:
            return []
        pids = job.pids()
        sup_pid = job.state.get("supervisorPid")
        if job.supervisor is not None or is_same_process(sup_pid, job.state.get("supervisorStart")):
            # The supervisor records the outcome as killed and escalates to KILL itself.
            self._signal(sup_pid, signal.SIGTERM)
        elif job.rsync_pid:
            self._signal_group(job.rsync_pid, signal.SIGTERM)
        rsync_pid, rsync_start = job.rsync_pid, job.state.get("rsyncStart")

        def escalate() -> None:
            if rsync_pid and is_same_process(rsync_pid, rsync_start):
                self.log.warn("sync {checksum} outlived its grace period: KILL", checksum=checksum)
                self._signal_group(rsync_pid, signal.SIGKILL)

        self.reactor.callLater(self.grace + 2.0, escalate)
        return pids

    # -- internals

    def _ended(self, job: Job) -> None:
        if self._jobs.get(job.checksum) is job:
            del self._jobs[job.checksum]
        state = read_state(job.state_file) or job.state
        if state.get("state") != "ended":
            # The supervisor died without recording an outcome.
            self._mark_lost(job, outcome=OUTCOME_FAILED if job.supervisor else OUTCOME_LOST)
            state = read_state(job.state_file) or state
        job.state = state
        self.log.info(
            "sync {checksum} ended: {outcome} (exit code {exitCode})",
            checksum=job.checksum,
            outcome=state.get("outcome"),
            exitCode=state.get("exitCode"),
        )

    def _alive(self, job: Job) -> bool:
        state = job.state
        return is_same_process(state.get("supervisorPid"), state.get("supervisorStart"))

    def _mark_lost(self, job: Job, outcome: str = OUTCOME_LOST) -> None:
        state = dict(job.state)
        state.update(
            state="ended",
            outcome=outcome,
            ended=self.reactor.seconds() if isinstance(self.reactor, IReactorTime) else None,
            message=state.get("message") or "the sync's supervisor ended without an outcome",
        )
        try:
            write_state(job.state_file, state)
        except OSError as e:
            self.log.error("cannot record lost sync {checksum}: {e}", checksum=job.checksum, e=e)
        job.state = state

    @staticmethod
    def _signal(pid: int | None, sig: int) -> None:
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The supervisor imports `deploy` the way this process did, installed or from a checkout.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env
