"""Background syncs: at most one per target (job id = the target's checksum), each run by a
`deploy.supervise` process that outlives the agent; their pids, progress, stopping and last
result, read back from the persisted state (and /proc) so an agent restart loses nothing."""

from __future__ import annotations

import datetime
import functools
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deploy.jobstate import (
    OUTCOME_FAILED,
    OUTCOME_KILLED,
    OUTCOME_LOST,
    STATE_ENDED,
    STATE_RUNNING,
    STATE_STARTING,
    read_state,
    write_state,
)
from deploy.process import (
    GROUP_GONE_WITHIN,
    GROUP_POLL,
    ProcessTable,
    Stopper,
    StopPolicy,
)
from deploy.rsync import DEFAULT_FLAGS, RsyncTarget, build_argv

# start() answers by then even if the supervisor has not said `ready` (e.g. a slow source listing).
ANSWER_WITHIN = 5.0
# A `starting` record nobody has taken up (its agent died between writing it and spawning the
# supervisor) counts as running this long, then as lost.
STARTING_GRACE = 30.0
# After the supervisor's own TERM-then-KILL (rkill_grace), how long the agent waits before it
# KILLs rsync's group itself, and then (every KILL_MARGIN) the supervisor if it still has not
# recorded the end.
KILL_MARGIN = 2.0
# A temp file of write_state this old was left by a process killed mid-write.
STALE_TEMP = 3600.0
MAX_LINE = 1024


class JobError(Exception):
    """A sync that could not be started; the message is for the user."""


def deletes_on_target(target: RsyncTarget) -> bool:
    """True when the sync of `target` deletes target files that are not in the source."""
    options = target.options if target.options is not None else DEFAULT_FLAGS
    return any(o == "--del" or o.startswith("--delete") for o in options)


@dataclass
class Job:
    """One sync of one target: its record on disk and what this agent knows beyond it."""

    checksum: str
    state_file: str
    state: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    # Set when this agent spawned the supervisor (then it is our child and tells us its end).
    supervisor: SupervisorProtocol | None = None
    kill_requested: bool = False
    # Set once its end is seen; the job is forgotten once that end is recorded.
    finished: bool = False
    stopper: Stopper | None = None  # rkill's
    ending: IDelayedCall | None = None  # the wait for rsync's group to go before recording
    answer_timer: IDelayedCall | None = None
    started: defer.Deferred[Job] = field(default_factory=defer.Deferred)

    @property
    def rsync_pid(self) -> int | None:
        return self.state.get("rsyncPid")

    @property
    def log_file(self) -> str:
        return self.state_file[: -len(".json")] + ".log"


class SupervisorProtocol(protocol.ProcessProtocol):
    """Thin: forwards the supervisor's stdout lines (`pid N`, `ready`, `ended`) and its end to
    the registry."""

    def __init__(self, registry: JobRegistry, job: Job) -> None:
        self.registry = registry
        self.job = job
        self.ended = False
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.registry._told(self.job, line[:MAX_LINE].decode("ascii", "replace").strip())
        self._buffer = self._buffer[-MAX_LINE:]

    def processEnded(self, reason: Failure) -> None:
        if self.ended:
            return
        self.ended = True
        self.registry._supervisor_ended(self.job)


class JobRegistry:
    """The agent's background syncs, keyed by checksum; the state files are the truth."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        state_dir: str,
        *,
        grace: float = 5.0,
        python: str = sys.executable,
        clock: IReactorTime | None = None,
        processes: ProcessTable | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self.state_dir = state_dir
        self.grace = grace
        self.python = python
        self.processes = processes or ProcessTable()
        self._jobs: dict[str, Job] = {}
        # Told of every sync whose end is recorded (the metrics count them).
        self.ended_observers: list[Callable[[Job], None]] = []

    def state_file(self, checksum: str, state_dir: str | None = None) -> str:
        return os.path.join(state_dir or self.state_dir, checksum + ".json")

    # -- start-up

    def recover(self, state_dirs: Iterable[str] = ()) -> list[Job]:
        """Adopt the syncs a previous agent started that still run (in our state dir and in
        `state_dirs`, the groups' own); record the dead ones as lost."""
        found = []
        seen = set()
        for directory in (self.state_dir, *state_dirs):
            if os.path.abspath(directory) in seen:
                continue
            seen.add(os.path.abspath(directory))
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                if name.startswith(".tmp-"):
                    self._remove_stale_temp(os.path.join(directory, name))
                    continue
                if not name.endswith(".json") or name.startswith("."):
                    continue
                state = read_state(os.path.join(directory, name))
                if not state or state.get("state") not in (STATE_STARTING, STATE_RUNNING):
                    continue
                job = self._adopt(name[: -len(".json")], os.path.join(directory, name), state)
                if job is not None:
                    found.append(job)
        return found

    # -- questions

    def running(self, checksum: str, state_dir: str | None = None) -> Job | None:
        """The target's sync if one runs (or is starting), else None."""
        job = self._jobs.get(checksum)
        if job is None:
            # Not one we know of: its record (and /proc) still decide, so a target never gets
            # a second rsync because this agent missed the first.
            path = self.state_file(checksum, state_dir)
            state = read_state(path)
            if state and state.get("state") in (STATE_STARTING, STATE_RUNNING):
                self._adopt(checksum, path, state)
        else:
            self._refresh(job)
            if job.state.get("state") == STATE_ENDED or not self._alive(job):
                self._ended(job)
        # A sync whose end waits for rsync's group to go still runs.
        return self._jobs.get(checksum)

    def running_count(self) -> int:
        return sum(1 for checksum in list(self._jobs) if self.running(checksum))

    def pids(self, job: Job) -> list[int]:
        """The running rsync processes (rsync forks a receiver: usually two)."""
        self._refresh(job)
        pid = job.rsync_pid
        if pid and self.processes.same(pid, job.state.get("rsyncStart")):
            return self.processes.group(pid)
        return []

    def progress(self, job: Job) -> dict[str, Any] | None:
        """The last `--info=progress2` record the supervisor wrote: bytes, percent, rate, eta."""
        self._refresh(job)
        progress = job.state.get("progress")
        return progress if isinstance(progress, dict) else None

    def last_result(self, checksum: str, state_dir: str | None = None) -> dict[str, Any] | None:
        """The `lastRsync` record of the target's last finished sync, if there was one."""
        state = read_state(self.state_file(checksum, state_dir))
        if not state or state.get("state") != STATE_ENDED:
            return None
        return {
            "checksum": checksum,
            "runId": state.get("runId"),
            "outcome": state.get("outcome"),
            "exitCode": state.get("exitCode"),
            "started": _iso(state.get("started")),
            "ended": _iso(state.get("ended")),
            "transferFilesCount": state.get("transferFilesCount"),
            "transferFilesSize": state.get("transferFilesSize"),
            "transferDeleteCount": state.get("transferDeleteCount"),
            "message": state.get("message") or "",
        }

    # -- orders

    def start(
        self,
        target: RsyncTarget,
        *,
        refuse_empty: bool = False,
        state_dir: str | None = None,
        release: Mapping[str, Any] | None = None,
    ) -> defer.Deferred[Job]:
        """Start the sync of `target` under a supervisor; fires once rsync is under way, has
        already ended (e.g. the rsync daemon is down, or the sync was refused), or after
        ANSWER_WITHIN seconds. Raises JobError when it cannot start, ValueError for a bad
        target."""
        checksum = target.checksum
        if self.running(checksum, state_dir):
            raise JobError(f"a sync of {checksum} is already running")
        # release mode (deploy.release_orders): rsync fills `release["sync"]`, a staging dir
        sync = release["sync"] if release is not None else target
        argv = build_argv(sync, dry_run=False, progress=True)
        directory = state_dir or self.state_dir
        path = self.state_file(checksum, state_dir)
        run_id = release["runId"] if release is not None else uuid.uuid4().hex
        state = {
            "checksum": checksum,
            "state": STATE_STARTING,
            "runId": run_id,
            "created": self.clock.seconds(),
            "dest": target.dest,
            "src": target.src,
            "argv": argv,
        }
        if release is not None:
            state.update(release=release["spec"], releaseId=release["id"])
        job = Job(checksum, path, state, run_id)
        log_fd = -1
        try:
            os.makedirs(directory, exist_ok=True)
            # The log first: once the starting record exists, every way out must end it.
            log_fd = os.open(job.log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            write_state(path, state)
        except OSError as e:
            if log_fd >= 0:
                os.close(log_fd)
            raise JobError(f"cannot record the sync in {directory}: {e.strerror or e}") from e
        proto = SupervisorProtocol(self, job)
        job.supervisor = proto
        cmd = [self.python, "-m", "deploy.supervise", "--state", path, "--run", run_id]
        cmd += ["--grace", str(self.grace)]
        if refuse_empty:
            cmd.append("--refuse-empty")
        cmd += ["--", *argv]
        try:
            transport = self.reactor.spawnProcess(
                proto,
                self.python,
                cmd,
                env=_child_env(),
                usePTY=False,
                childFDs={0: "w", 1: "r", 2: log_fd},
            )
        except OSError as e:
            job.supervisor = None
            self._record_end(job, OUTCOME_FAILED, f"cannot start the sync supervisor: {e}")
            raise JobError(f"cannot start the sync supervisor: {e}") from e
        finally:
            os.close(log_fd)
        transport.closeStdin()
        self._jobs[checksum] = job
        job.answer_timer = self.clock.callLater(ANSWER_WITHIN, self._answer, job)
        return job.started

    def kill(self, checksum: str, state_dir: str | None = None) -> list[int]:
        """Stop the target's sync: its supervisor TERMs rsync's process group and KILLs it after
        the grace period (the agent KILLs it itself a little later, should the supervisor be
        gone or stuck). Answers the rsync pids that were running."""
        job = self.running(checksum, state_dir)
        if job is None:
            return []
        pids = self.pids(job)
        job.kill_requested = True
        if job.stopper is None and not job.finished:  # finished: its end waits for rsync to go
            policy = StopPolicy(self.grace + KILL_MARGIN, repeat=KILL_MARGIN)
            job.stopper = Stopper(self.clock, policy, functools.partial(self._signal_sync, job))
            job.stopper.stop()
        self.log.info("rkill of sync {checksum}: pids {pids}", checksum=checksum, pids=pids)
        return pids

    # -- what the supervisor tells

    def _told(self, job: Job, line: str) -> None:
        word, _, arg = line.partition(" ")
        if word == "pid" and arg.isdigit():
            job.state["rsyncPid"] = int(arg)
        elif word in ("ready", "ended"):
            self._answer(job)

    def _supervisor_ended(self, job: Job) -> None:
        self._ended(job)
        self._answer(job)

    def _answer(self, job: Job) -> None:
        if job.answer_timer is not None and job.answer_timer.active():
            job.answer_timer.cancel()
        job.answer_timer = None
        if not job.started.called:
            self._refresh(job)
            job.started.callback(job)

    # -- internals

    def _adopt(self, checksum: str, path: str, state: dict[str, Any]) -> Job | None:
        """Watch a sync a previous agent (or this one, unknowingly) started; None when it is not
        running any more."""
        job = Job(checksum, path, state, state.get("runId"))
        self._jobs[checksum] = job
        if not self._alive(job):
            self.log.warn(
                "sync {checksum} was {state} but its supervisor is gone",
                checksum=checksum,
                state=state.get("state"),
            )
            self._ended(job)
            return None
        self.log.info(
            "watching sync {checksum} again (supervisor pid {supervisor}, rsync pid {pid})",
            checksum=checksum,
            supervisor=state.get("supervisorPid"),
            pid=job.rsync_pid,
        )
        job.started.callback(job)
        return job

    def _refresh(self, job: Job) -> None:
        state = read_state(job.state_file)
        if state is not None and (job.run_id is None or state.get("runId") == job.run_id):
            job.state = state

    def _alive(self, job: Job) -> bool:
        if job.supervisor is not None:
            return not job.supervisor.ended
        state = job.state
        if self.processes.same(state.get("supervisorPid"), state.get("supervisorStart")):
            return True
        if state.get("state") == STATE_STARTING and not state.get("supervisorPid"):
            # Its supervisor may still be on its way: give it a while to take the record up.
            created = state.get("created")
            return isinstance(created, int | float) and (
                self.clock.seconds() - created < STARTING_GRACE
            )
        return False

    def _supervisor_pid(self, job: Job) -> int | None:
        if job.supervisor is not None:
            if job.supervisor.ended:
                return None
            return getattr(job.supervisor.transport, "pid", None)
        pid = job.state.get("supervisorPid")
        return pid if self.processes.same(pid, job.state.get("supervisorStart")) else None

    def _ended(self, job: Job) -> None:
        """A sync ended (its record says so, or its supervisor is gone): make sure its record
        says how, then forget it."""
        if job.finished:
            return  # seen in its record first, then again when our child exited
        job.finished = True
        if job.stopper is not None:
            job.stopper.cancel()
        self._refresh(job)
        if job.state.get("state") == STATE_ENDED:
            self._forget(job)
        elif job.kill_requested:
            self._abandon(job, OUTCOME_KILLED, "stopped by rkill")
        elif job.supervisor is not None:
            self._abandon(
                job, OUTCOME_FAILED, "the sync's supervisor ended without recording an outcome"
            )
        else:
            self._abandon(job, OUTCOME_LOST)

    def _forget(self, job: Job) -> None:
        if self._jobs.get(job.checksum) is job:
            del self._jobs[job.checksum]
        if job.stopper is not None:
            job.stopper.cancel()
        if job.ending is not None and job.ending.active():
            job.ending.cancel()
        job.ending = None
        self.log.info(
            "sync {checksum} ended: {outcome} (exit code {exitCode})",
            checksum=job.checksum,
            outcome=job.state.get("outcome"),
            exitCode=job.state.get("exitCode"),
        )
        for observer in self.ended_observers:
            observer(job)

    def _abandon(self, job: Job, outcome: str, message: str | None = None) -> None:
        """Record the end of a sync whose supervisor died without recording it, once no process
        of rsync's group is left: an rsync it left behind is KILLed (nobody would record that
        one's end) and its group waited for (at most GROUP_GONE_WITHIN)."""
        self._refresh(job)
        if job.state.get("state") == STATE_ENDED:
            self._forget(job)
            return  # it recorded its end after all
        if message is None:
            message = "the sync's supervisor is gone and left no outcome"
        if job.supervisor is not None:
            detail = _last_line(job.log_file)
            if detail:
                message += f": {detail}"
        rsync = job.rsync_pid
        if rsync and self.processes.same(rsync, job.state.get("rsyncStart")):
            self.log.warn(
                "sync {checksum}: rsync {pid} outlived its supervisor; KILL",
                checksum=job.checksum,
                pid=rsync,
            )
            self.processes.signal_group(rsync, signal.SIGKILL)
            message += " (its rsync was stopped)"
            self._record_when_gone(job, rsync, outcome, message, self.clock.seconds())
        else:
            self._record_end(job, outcome, message)
            self._forget(job)

    def _record_when_gone(
        self, job: Job, pgid: int, outcome: str, message: str, since: float
    ) -> None:
        """Record the end once process group `pgid` (a KILLed rsync's) is empty: rsync's forked
        receiver can outlive it for a moment."""
        job.ending = None
        left = self.processes.group(pgid)
        if left and self.clock.seconds() - since < GROUP_GONE_WITHIN:
            job.ending = self.clock.callLater(
                GROUP_POLL, self._record_when_gone, job, pgid, outcome, message, since
            )
            return
        if left:
            self.log.warn(
                "sync {checksum}: rsync's processes {pids} would not go",
                checksum=job.checksum,
                pids=left,
            )
        self._record_end(job, outcome, message)
        self._forget(job)

    def _record_end(self, job: Job, outcome: str, message: str) -> None:
        state = dict(job.state)
        state.update(state=STATE_ENDED, outcome=outcome, ended=self.clock.seconds())
        state["message"] = message
        job.state = state
        current = read_state(job.state_file)
        if current is not None and job.run_id is not None and current.get("runId") != job.run_id:
            return  # the record is another run's now
        try:
            write_state(job.state_file, state)
        except OSError as e:
            self.log.error(
                "cannot record the end of sync {checksum} ({outcome}: {message}): {e}",
                checksum=job.checksum,
                outcome=outcome,
                message=message,
                e=e,
            )

    def _signal_sync(self, job: Job, sig: int) -> bool:
        """rkill's signals. TERM goes to the supervisor, which stops rsync's group with the grace
        period itself (to rsync's group when there is no supervisor); KILL to rsync's group while
        rsync runs, else to a supervisor that still has not recorded the end. False once the end
        is recorded or nothing is left to stop."""
        self._refresh(job)
        if job.state.get("state") == STATE_ENDED:
            return False
        rsync = job.rsync_pid
        if not (rsync and self.processes.same(rsync, job.state.get("rsyncStart"))):
            rsync = None
        supervisor = self._supervisor_pid(job)
        if sig == signal.SIGTERM:
            if supervisor:
                self.processes.signal(supervisor, sig)
            elif rsync:
                self.processes.signal_group(rsync, sig)
            return True
        if rsync:
            self.log.warn("sync {checksum} outlived its grace period: KILL", checksum=job.checksum)
            self.processes.signal_group(rsync, sig)
            return True
        if supervisor:
            self.log.warn("the supervisor of sync {checksum} is stuck: KILL", checksum=job.checksum)
            self.processes.signal(supervisor, sig)
            return True
        return False

    @staticmethod
    def _remove_stale_temp(path: str) -> None:
        try:
            if time.time() - os.stat(path).st_mtime > STALE_TEMP:
                os.unlink(path)
        except OSError:
            pass


def check_state_dir(directory: str) -> None:
    """Create `directory` if needed and prove a state record can be written there; raises
    OSError saying which directory failed."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".probe.json")
        write_state(probe, {"probe": True})
        os.unlink(probe)
    except OSError as e:
        raise OSError(e.errno, f"{directory} is not a writable directory: {e.strerror or e}") from e


def _last_line(path: str, limit: int = 4096) -> str:
    """The last non-empty line of a (log) file, or ""."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            tail = f.read()
    except OSError:
        return ""
    lines = [line.strip() for line in tail.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:500] if lines else ""


def _iso(t: float | None) -> str | None:
    if not isinstance(t, int | float):
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The supervisor imports `deploy` the way this process did, installed or from a checkout.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env
