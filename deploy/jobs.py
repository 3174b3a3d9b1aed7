"""The agent's background syncs, at most one per local target however the target is spelled (the
lock is the realpath of the local directory): whether a target's sync runs, its pids and
progress, its last result, stopping it, and re-finding the syncs a previous agent left. The state
records are the truth; a record alone never makes the agent signal a process."""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger

from deploy.jobends import SyncEnds, summary
from deploy.jobstart import ANSWER_WITHIN, JobError, StateFull, SyncStarter
from deploy.jobstate import (
    STATE_ENDED,
    STATE_RUNNING,
    STATE_STARTING,
    UntrustedFile,
    read_state,
)
from deploy.process import ProcessTable, Stopper, StopPolicy, trusted_uids
from deploy.rsync import DEFAULT_FLAGS, RsyncTarget
from deploy.statedir import StateDir, remove_stale_temp

if TYPE_CHECKING:
    from deploy.jobstart import SupervisorProtocol

__all__ = ["ANSWER_WITHIN", "Job", "JobError", "JobRegistry", "StateFull", "target_key"]

# A `starting` record nobody has taken up (its agent died between writing it and spawning the
# supervisor) counts as running this long, then as lost.
STARTING_GRACE = 30.0
# After the supervisor's own TERM-then-KILL (rkill_grace), how long the agent waits before it
# KILLs rsync's group itself, and then (every KILL_MARGIN) the supervisor if it still has not
# recorded the end.
KILL_MARGIN = 2.0
# How many untrusted files are warned about by name (each once); beyond, they are ignored quietly.
MAX_WARNED = 1000


def target_key(target: RsyncTarget, *, release_mode: bool = False) -> str:
    """The job key of `target`: its local directory resolved (realpath), so `/srv/www/big`,
    `/srv/www/big/` and `/srv/www//big` are one target whatever the source. The answers keep the
    original's `checksum` (md5 of dest + src) beside it. In release mode the live path is our own
    symlink, switched from release to release: only the directory holding it is resolved, so
    the key stays the same across switches."""
    if release_mode:
        path = os.path.normpath(target.src)
        local = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    else:
        local = os.path.realpath(target.src)
    return hashlib.sha256(local.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def deletes_on_target(target: RsyncTarget) -> bool:
    """True when the sync of `target` deletes target files that are not in the source."""
    options = target.options if target.options is not None else DEFAULT_FLAGS
    return any(o == "--del" or o.startswith("--delete") for o in options)


@dataclass
class Job:
    """One sync of one target: its record on disk and what this agent knows beyond it."""

    key: str
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
    refused: set[int] = field(default_factory=set)  # pids its record names that are not ours
    retry_at: float = 0.0  # when an end that could not be written is tried again

    @property
    def checksum(self) -> str:
        """The original's job id (md5 of dest + src as the sync was asked for)."""
        checksum = self.state.get("checksum")
        return checksum if isinstance(checksum, str) else self.key

    @property
    def rsync_pid(self) -> int | None:
        return self.state.get("rsyncPid")

    @property
    def log_file(self) -> str:
        return self.state_file[: -len(".json")] + ".log"


class JobRegistry:
    """The agent's background syncs, keyed by target_key; the state files are the truth."""

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
        owners: Collection[int] | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self.state_dir = state_dir
        self.grace = grace
        self.owners = frozenset(owners) if owners is not None else trusted_uids()
        self.processes = processes or ProcessTable(self.owners)
        self.starter = SyncStarter(self, python)
        self.ends = SyncEnds(self)
        self._jobs: dict[str, Job] = {}
        # Told of every sync whose end is recorded (the metrics count them).
        self.ended_observers: list[Callable[[Job], None]] = []
        # configured state/queue directory -> where its records are kept
        self._dirs: dict[str, str] = {os.path.abspath(state_dir): os.path.abspath(state_dir)}
        self._warned: set[str] = set()

    # -- directories and records

    def use_dir(self, state_dir: StateDir) -> None:
        """Keep the records of `state_dir.configured` in `state_dir.path` (a private subdirectory
        of a shared directory)."""
        self._dirs[os.path.abspath(state_dir.configured)] = state_dir.path
        if state_dir.full:
            self.ends.disk_full(state_dir.path, None)

    def directory(self, state_dir: str | None = None) -> str:
        configured = os.path.abspath(state_dir or self.state_dir)
        return self._dirs.setdefault(configured, configured)

    def state_file(self, key: str, state_dir: str | None = None) -> str:
        return os.path.join(self.directory(state_dir), key + ".json")

    def read(self, path: str) -> dict[str, Any] | None:
        """The record at `path` if it is one the agent trusts; a file planted there (a link, a
        FIFO, another user's, a huge one) is ignored, with a warning the first time."""
        return read_state(path, self.owners, refused=self._refused)

    def _refused(self, error: UntrustedFile) -> None:
        text = str(error)
        if text not in self._warned and len(self._warned) < MAX_WARNED:
            self._warned.add(text)
            self.log.warn("ignored, not a sync record of this agent: {why}", why=text)

    def _paths(self, key: str, state_dir: str | None) -> list[str]:
        """Where a record of `key` may be: the given directory first, then every other one (a
        target spelled once as a group and once inline has its records in two)."""
        first = self.directory(state_dir)
        dirs = [first, *(d for d in dict.fromkeys(self._dirs.values()) if d != first)]
        return [os.path.join(d, key + ".json") for d in dirs]

    # -- start-up

    def recover(self, state_dirs: Iterable[str] = ()) -> list[Job]:
        """Adopt the syncs a previous agent started that still run (in our state dir and in
        `state_dirs`, the groups' own); record the dead ones as lost."""
        found = []
        for directory in dict.fromkeys(self.directory(d) for d in (self.state_dir, *state_dirs)):
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                if name.startswith(".tmp-"):
                    remove_stale_temp(os.path.join(directory, name))
                    continue
                if not name.endswith(".json") or name.startswith("."):
                    continue
                state = self.read(os.path.join(directory, name))
                if not state or state.get("state") not in (STATE_STARTING, STATE_RUNNING):
                    continue
                job = self._adopt(name[: -len(".json")], os.path.join(directory, name), state)
                if job is not None:
                    found.append(job)
        return found

    # -- questions

    def running(self, key: str, state_dir: str | None = None) -> Job | None:
        """The target's sync if one runs (or is starting), else None."""
        job = self._jobs.get(key)
        if job is None:
            if self.ends.retry(key):
                return None  # it ended; its end waits for space to be recorded
            # Not one we know of: its record (and /proc) still decide, so a target never gets
            # a second rsync because this agent missed the first.
            for path in self._paths(key, state_dir):
                state = self.read(path)
                if state and state.get("state") in (STATE_STARTING, STATE_RUNNING):
                    self._adopt(key, path, state)
                    break
        else:
            self.refresh(job)
            if job.state.get("state") == STATE_ENDED or not self._alive(job):
                self.ends.ended(job)
        # A sync whose end waits for rsync's group to go still runs.
        return self._jobs.get(key)

    def running_count(self) -> int:
        self.ends.retry_due()
        return sum(1 for key in list(self._jobs) if self.running(key))

    def pids(self, job: Job) -> list[int]:
        """The running rsync processes (rsync forks a receiver: usually two)."""
        self.refresh(job)
        pid = self.proven(job, "rsyncPid", "rsyncStart")
        return self.processes.group(pid) if pid else []

    def progress(self, job: Job) -> dict[str, Any] | None:
        """The last `--info=progress2` record the supervisor wrote: bytes, percent, rate, eta."""
        self.refresh(job)
        progress = job.state.get("progress")
        return progress if isinstance(progress, dict) else None

    def last_result(self, key: str, state_dir: str | None = None) -> dict[str, Any] | None:
        """The `lastRsync` record of the target's last finished sync, if there was one."""
        unwritten = self.ends.retry(key)
        if unwritten is not None:
            return summary(key, unwritten.state)
        found = None
        for path in self._paths(key, state_dir):
            state = self.read(path)
            if state and state.get("state") == STATE_ENDED:
                ended = state.get("ended")
                ended = ended if isinstance(ended, int | float) else 0
                if found is None or ended > found[0]:
                    found = (ended, state)
        return summary(key, found[1]) if found else None

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
        ANSWER_WITHIN seconds. Raises JobError when it cannot start (StateFull when the state
        file system is full), ValueError for a bad target."""
        key = target_key(target, release_mode=release is not None)
        if self.running(key, state_dir):
            raise JobError(f"a sync of {target.checksum} is already running")
        job = Job(key, self.state_file(key, state_dir))
        self.starter.start(job, target, refuse_empty, release)
        self._jobs[key] = job
        return job.started

    def kill(self, key: str, state_dir: str | None = None) -> list[int]:
        """Stop the target's sync: its supervisor TERMs rsync's process group and KILLs it after
        the grace period (the agent KILLs it itself a little later, should the supervisor be
        gone or stuck). Answers the rsync pids that were running."""
        job = self.running(key, state_dir)
        if job is None:
            return []
        pids = self.pids(job)
        job.kill_requested = True
        if job.stopper is None and not job.finished:  # finished: its end waits for rsync to go
            policy = StopPolicy(self.grace + KILL_MARGIN, repeat=KILL_MARGIN)
            job.stopper = Stopper(self.clock, policy, functools.partial(self._signal_sync, job))
            job.stopper.stop()
        self.log.info("rkill of sync {key}: pids {pids}", key=key, pids=pids)
        return pids

    # -- what the supervisor tells

    def told(self, job: Job, line: str) -> None:
        word, _, arg = line.partition(" ")
        if word == "pid" and arg.isdigit():
            job.state["rsyncPid"] = int(arg)
        elif word in ("ready", "ended"):
            self.answer(job)

    def supervisor_ended(self, job: Job) -> None:
        self.ends.ended(job)
        self.answer(job)

    def answer(self, job: Job) -> None:
        if job.answer_timer is not None and job.answer_timer.active():
            job.answer_timer.cancel()
        job.answer_timer = None
        if not job.started.called:
            self.refresh(job)
            job.started.callback(job)

    # -- what the records say, and what /proc proves

    def proven(self, job: Job, pid_field: str, start_field: str) -> int | None:
        """The pid the record names in `pid_field` if /proc proves it a process of this sync
        (start time, owner, and our tag with its run id); else None, logged once per pid when
        the pid is alive (a record naming another process is planted or stale)."""
        pid, start = job.state.get(pid_field), job.state.get(start_field)
        if not isinstance(pid, int) or pid <= 1:
            return None
        if self.processes.ours(pid, start, job.run_id):
            return pid
        if pid not in job.refused and self.processes.same(pid, start):
            job.refused.add(pid)
            self.log.warn(
                "sync {key}: its record names pid {pid}, which is not a sync this agent "
                "started: it is not signalled",
                key=job.key,
                pid=pid,
            )
        return None

    def _adopt(self, key: str, path: str, state: dict[str, Any]) -> Job | None:
        """Watch a sync a previous agent (or this one, unknowingly) started; None when it is not
        running any more."""
        job = Job(key, path, state, state.get("runId"))
        self._jobs[key] = job
        if not self._alive(job):
            self.log.warn(
                "sync {key} was {state} but its supervisor is gone",
                key=key,
                state=state.get("state"),
            )
            self.ends.ended(job)
            return None
        self.log.info(
            "watching sync {key} again (supervisor pid {supervisor}, rsync pid {pid})",
            key=key,
            supervisor=state.get("supervisorPid"),
            pid=job.rsync_pid,
        )
        job.started.callback(job)
        return job

    def refresh(self, job: Job) -> None:
        """Take up what the job's record says now; an end known here but not written yet (a
        full disk) is not undone by the older record."""
        if job.state.get("state") == STATE_ENDED and job.key in self.ends.unwritten:
            return
        state = self.read(job.state_file)
        if state is not None and (job.run_id is None or state.get("runId") == job.run_id):
            job.state = state

    def _alive(self, job: Job) -> bool:
        if job.supervisor is not None:
            return not job.supervisor.ended
        state = job.state
        if self.proven(job, "supervisorPid", "supervisorStart"):
            return True
        if state.get("state") == STATE_STARTING and not state.get("supervisorPid"):
            # Its supervisor may still be on its way: give it a while to take the record up.
            created = state.get("created")
            return isinstance(created, int | float) and (
                self.clock.seconds() - created < STARTING_GRACE
            )
        return False

    def supervisor_pid(self, job: Job) -> int | None:
        if job.supervisor is not None:
            if job.supervisor.ended:
                return None
            return getattr(job.supervisor.transport, "pid", None)
        return self.proven(job, "supervisorPid", "supervisorStart")

    def forget(self, job: Job) -> None:
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        if job.stopper is not None:
            job.stopper.cancel()
        if job.ending is not None and job.ending.active():
            job.ending.cancel()
        job.ending = None
        self.log.info(
            "sync {key} ended: {outcome} (exit code {exitCode})",
            key=job.key,
            outcome=job.state.get("outcome"),
            exitCode=job.state.get("exitCode"),
        )
        for observer in self.ended_observers:
            observer(job)

    def _signal_sync(self, job: Job, sig: int) -> bool:
        """rkill's signals. TERM goes to the supervisor, which stops rsync's group with the grace
        period itself (to rsync's group when there is no supervisor); KILL to rsync's group while
        rsync runs, else to a supervisor that still has not recorded the end. False once the end
        is recorded or nothing is left to stop. Only pids proven ours are signalled."""
        self.refresh(job)
        if job.state.get("state") == STATE_ENDED:
            return False
        rsync = self.proven(job, "rsyncPid", "rsyncStart")
        supervisor = self.supervisor_pid(job)
        if sig == signal.SIGTERM:
            if supervisor:
                self.processes.signal(supervisor, sig)
            elif rsync:
                self.processes.signal_group(rsync, sig)
            return True
        if rsync:
            self.log.warn("sync {key} outlived its grace period: KILL", key=job.key)
            self.processes.signal_group(rsync, sig)
            return True
        if supervisor:
            self.log.warn("the supervisor of sync {key} is stuck: KILL", key=job.key)
            self.processes.signal(supervisor, sig)
            return True
        return False
