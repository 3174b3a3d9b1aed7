"""Starting a background sync: its `starting` record and its log file, the `deploy.supervise`
process spawned for it (tagged with the sync's run id, the mark by which the agent later knows
the processes as its own), and the thin protocol that passes on what the supervisor says."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol
from twisted.python.failure import Failure

from deploy.jobstate import (
    OUTCOME_FAILED,
    STATE_STARTING,
    create_private,
    is_disk_full,
    write_state,
)
from deploy.process import SYNC_TAG
from deploy.rsync import RsyncTarget, build_argv
from deploy.supervise_argv import supervisor_command

if TYPE_CHECKING:
    from deploy.jobs import Job, JobRegistry

# start() answers by then even if the supervisor has not said `ready` (e.g. a slow source listing).
ANSWER_WITHIN = 5.0
MAX_LINE = 1024


class JobError(Exception):
    """A sync that could not be started; the message is for the user."""


class StateFull(JobError):
    """The file system of the state directory is full: no new sync can be recorded (503; status
    and exec still work)."""

    def __init__(self, directory: str) -> None:
        super().__init__(
            f"the state file system of {directory} is full: no new sync can be recorded until "
            "there is space again (status and exec still work)"
        )
        self.directory = directory


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
            self.registry.told(self.job, line[:MAX_LINE].decode("ascii", "replace").strip())
        self._buffer = self._buffer[-MAX_LINE:]

    def processEnded(self, reason: Failure) -> None:
        if self.ended:
            return
        self.ended = True
        self.registry.supervisor_ended(self.job)


class SyncStarter:
    """Writes a sync's `starting` record and spawns its supervisor, for `registry`."""

    def __init__(self, registry: JobRegistry, python: str) -> None:
        self.registry = registry
        self.python = python

    def start(
        self,
        job: Job,
        target: RsyncTarget,
        refuse_empty: bool,
        release: Mapping[str, Any] | None = None,
        source_retry: float | None = None,
    ) -> None:
        """Record `job`, the sync of `target`, as starting and spawn its supervisor; raises
        JobError (StateFull), or ValueError for a bad target. In release mode
        (deploy.release_orders) `release` names the staging target rsync fills and the run id."""
        registry = self.registry
        sync = release["sync"] if release is not None else target
        argv = build_argv(sync, dry_run=False, progress=True)
        run_id = job.run_id = release["runId"] if release is not None else uuid.uuid4().hex
        path = job.state_file
        job.state = {
            "checksum": target.checksum,
            "target": os.path.realpath(target.src),
            "state": STATE_STARTING,
            "runId": run_id,
            "created": registry.clock.seconds(),
            "dest": target.dest,
            "src": target.src,
            "argv": argv,
        }
        if release is not None:
            job.state.update(release=release["spec"], releaseId=release["id"])
            if release.get("twoPass"):  # from a prepared base (deploy.release_sync)
                job.state["releaseTwoPass"] = True
        directory = os.path.dirname(path)
        log_fd = -1
        try:
            os.makedirs(directory, exist_ok=True)
            # The log first: once the starting record exists, every way out must end it.
            log_fd = create_private(job.log_file)
            write_state(path, job.state)
        except OSError as e:
            if log_fd >= 0:
                os.close(log_fd)
                _remove(job.log_file)
            if is_disk_full(e):
                registry.ends.disk_full(directory, e)
                raise StateFull(directory) from e
            raise JobError(f"cannot record the sync in {directory}: {e.strerror or e}") from e
        registry.ends.space(directory)
        proto = SupervisorProtocol(registry, job)
        job.supervisor = proto
        cmd = supervisor_command(
            self.python, path, run_id, registry.grace, refuse_empty, source_retry, argv
        )
        try:
            transport = registry.reactor.spawnProcess(
                proto,
                self.python,
                cmd,
                env=child_env(run_id),
                usePTY=False,
                childFDs={0: "w", 1: "r", 2: log_fd},
            )
        except OSError as e:
            job.supervisor = None
            registry.ends.record_end(job, OUTCOME_FAILED, f"cannot start the sync supervisor: {e}")
            raise JobError(f"cannot start the sync supervisor: {e}") from e
        finally:
            os.close(log_fd)
        transport.closeStdin()
        job.answer_timer = registry.clock.callLater(ANSWER_WITHIN, registry.answer, job)


def child_env(run_id: str | None = None) -> dict[str, str]:
    """The supervisor's environment: ours and the sync's tag (it finds `deploy` through its
    command line: deploy.supervise_argv.bootstrap)."""
    env = {k: v for k, v in os.environ.items() if k != SYNC_TAG}
    if run_id is not None:
        env[SYNC_TAG] = run_id
    return env


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
