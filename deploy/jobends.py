"""The end of a background sync as the agent records it: read from its record when its supervisor
wrote it; written by the agent when the supervisor died without (what is left of its rsync,
proven ours, KILLed and waited for first); and, while the state file system is full, kept in
memory, answered from there and written again until there is space — with one log line, not one
per question."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from deploy.jobstate import (
    OUTCOME_FAILED,
    OUTCOME_KILLED,
    OUTCOME_LOST,
    STATE_ENDED,
    is_disk_full,
    iso_time,
    last_line,
    write_state,
)
from deploy.process import GROUP_GONE_WITHIN, GROUP_POLL

if TYPE_CHECKING:
    from deploy.jobs import Job, JobRegistry

# How often an end that could not be written (a full disk) is tried again, when asked about.
RETRY_RECORD = 5.0


def summary(key: str, state: dict[str, Any]) -> dict[str, Any]:
    """The `lastRsync` answer of an ended record (its original checksum when it has one)."""
    checksum = state.get("checksum")
    return {
        "checksum": checksum if isinstance(checksum, str) else key,
        "runId": state.get("runId"),
        "outcome": state.get("outcome"),
        "exitCode": state.get("exitCode"),
        "started": iso_time(state.get("started")),
        "ended": iso_time(state.get("ended")),
        "transferFilesCount": state.get("transferFilesCount"),
        "transferFilesSize": state.get("transferFilesSize"),
        "transferDeleteCount": state.get("transferDeleteCount"),
        "message": state.get("message") or "",
    }


class SyncEnds:
    """Sees the ends of the syncs of `registry` recorded."""

    log = Logger()

    def __init__(self, registry: JobRegistry) -> None:
        self.registry = registry
        self.unwritten: dict[str, Job] = {}  # ended syncs whose end waits for space
        self.full: set[str] = set()  # directories known full (logged once)

    # -- a full state file system

    def disk_full(self, directory: str, error: OSError | None) -> None:
        """`directory` has no space: said once, until a write there succeeds again."""
        if directory in self.full:
            return
        self.full.add(directory)
        self.log.warn(
            "the state file system of {directory} is full{why}: status and exec work, new syncs "
            "are refused (503) and the ends of syncs are kept in memory until there is space",
            directory=directory,
            why=f" ({error.strerror})" if error is not None else "",
        )

    def space(self, directory: str) -> None:
        if directory in self.full:
            self.full.discard(directory)
            self.log.info(
                "the state file system of {directory} has space again", directory=directory
            )

    def retry(self, key: str) -> Job | None:
        """The ended sync of `key` whose end is not written yet (tried again first, at most
        every RETRY_RECORD seconds), or None."""
        job = self.unwritten.get(key)
        if job is not None and self.registry.clock.seconds() >= job.retry_at:
            self._write(job)
        return self.unwritten.get(key)

    def retry_due(self) -> None:
        for key in list(self.unwritten):
            self.retry(key)

    # -- ends

    def ended(self, job: Job) -> None:
        """A sync ended (its record says so, or its supervisor is gone): make sure its record
        says how, then forget it."""
        if job.finished:
            return  # seen in its record first, then again when our child exited
        job.finished = True
        if job.stopper is not None:
            job.stopper.cancel()
        self.registry.refresh(job)
        if job.state.get("state") == STATE_ENDED:
            self.registry.forget(job)
        elif job.kill_requested:
            self.abandon(job, OUTCOME_KILLED, "stopped by rkill")
        elif job.supervisor is not None:
            self.abandon(
                job, OUTCOME_FAILED, "the sync's supervisor ended without recording an outcome"
            )
        else:
            self.abandon(job, OUTCOME_LOST)

    def abandon(self, job: Job, outcome: str, message: str | None = None) -> None:
        """Record the end of a sync whose supervisor died without recording it, once no process
        of rsync's group is left: an rsync it left behind (proven ours) is KILLed — nobody would
        record that one's end — and its group waited for (at most GROUP_GONE_WITHIN)."""
        registry = self.registry
        registry.refresh(job)
        if job.state.get("state") == STATE_ENDED:
            registry.forget(job)
            return  # it recorded its end after all
        if message is None:
            message = "the sync's supervisor is gone and left no outcome"
        if job.supervisor is not None:
            detail = last_line(job.log_file, registry.owners)
            if detail:
                message += f": {detail}"
        rsync = registry.proven(job, "rsyncPid", "rsyncStart")
        if rsync:
            self.log.warn(
                "sync {key}: rsync {pid} outlived its supervisor; KILL", key=job.key, pid=rsync
            )
            registry.processes.signal_group(rsync, signal.SIGKILL)
            message += " (its rsync was stopped)"
            self._record_when_gone(job, rsync, outcome, message, registry.clock.seconds())
        else:
            self.record_end(job, outcome, message)
            registry.forget(job)

    def _record_when_gone(
        self, job: Job, pgid: int, outcome: str, message: str, since: float
    ) -> None:
        """Record the end once process group `pgid` (a KILLed rsync's) is empty: rsync's forked
        receiver can outlive it for a moment."""
        registry = self.registry
        job.ending = None
        left = registry.processes.group(pgid)
        if left and registry.clock.seconds() - since < GROUP_GONE_WITHIN:
            job.ending = registry.clock.callLater(
                GROUP_POLL, self._record_when_gone, job, pgid, outcome, message, since
            )
            return
        if left:
            self.log.warn(
                "sync {key}: rsync's processes {pids} would not go", key=job.key, pids=left
            )
        self.record_end(job, outcome, message)
        registry.forget(job)

    def record_end(self, job: Job, outcome: str, message: str) -> None:
        """Write the end of `job`; while the disk is full, keep it to answer and write later."""
        state = dict(job.state)
        state.update(state=STATE_ENDED, outcome=outcome, ended=self.registry.clock.seconds())
        state["message"] = message
        job.state = state
        self._write(job)

    def _write(self, job: Job) -> None:
        registry = self.registry
        current = registry.read(job.state_file)
        if current is not None and job.run_id is not None and current.get("runId") != job.run_id:
            self.unwritten.pop(job.key, None)
            return  # the record is another run's now
        directory = job.state_file.rpartition("/")[0]
        try:
            write_state(job.state_file, job.state)
        except OSError as e:
            job.retry_at = registry.clock.seconds() + RETRY_RECORD
            if is_disk_full(e):
                self.disk_full(directory, e)
                self.unwritten[job.key] = job
                return
            self.unwritten.pop(job.key, None)
            self.log.error(
                "cannot record the end of sync {key} ({outcome}: {message}): {e}",
                key=job.key,
                outcome=job.state.get("outcome"),
                message=job.state.get("message"),
                e=e,
            )
            return
        self.space(directory)
        if self.unwritten.pop(job.key, None) is not None:
            self.log.info(
                "sync {key}: its end ({outcome}) is recorded now",
                key=job.key,
                outcome=job.state.get("outcome"),
            )

