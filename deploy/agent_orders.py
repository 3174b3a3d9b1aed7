"""The agent's five orders (status, rlist, rsync, rkill, exec): what each does with its target
or command, the dry runs behind status and rlist, the limit on child processes, and the JSON
answers."""

from __future__ import annotations

import base64
import shlex
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deploy.commands import (
    CommandError,
    CommandResult,
    build_command,
    group_leader_prefix,
    run_command,
)
from deploy.config import AgentConfig, RsyncGroup
from deploy.errors import CapacityExceeded, InvalidTarget, RequestError
from deploy.jobs import Job, JobError, JobRegistry, deletes_on_target, target_key
from deploy.jobstate import OUTCOME_OK, OUTCOME_WARNING, error_message, iso_time
from deploy.process import KILL_GRACE, GroupStopper
from deploy.release_orders import ReleaseOrders
from deploy.rsync import (
    RsyncOutputParser,
    RsyncResult,
    RsyncTarget,
    build_argv,
    display_name,
    run_rsync,
)
from deploy.targets import TargetResolver, group_state_dir
from deploy.versions import answers_with_agent_version
from deploy.wire import Response


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return base64.b64encode(data).decode("ascii")


class AgentOrders:
    """The order handlers, each `order_NAME(options)` answering a `Response` (or a Deferred of
    one); they share the targets, the jobs and the count of dry runs and commands in flight."""

    log = Logger()

    def __init__(
        self,
        config: AgentConfig,
        reactor: Any,
        *,
        clock: IReactorTime,
        jobs: JobRegistry,
        targets: TargetResolver,
        releases: ReleaseOrders | None = None,
    ) -> None:
        self.config = config
        self.releases = releases  # release mode (deploy.release_orders)
        self.reactor = reactor
        self.clock = clock
        self.jobs = jobs
        self.targets = targets
        self.children = 0  # dry runs and exec commands in flight
        self.prefix = group_leader_prefix()

    def check_capacity(self) -> None:
        limit = self.config.server.max_prefork
        if limit and self.children + self.jobs.running_count() >= limit:
            raise CapacityExceeded(limit)

    # -- dry runs

    def dry_run_limit(self) -> float:
        """How long a dry run may take: the smaller of dry_run_timeout and max_process_timeout
        (0 is no limit), so a dry run is bounded even when commands are not."""
        server = self.config.server
        limits = [t for t in (server.dry_run_timeout, server.max_process_timeout) if t > 0]
        return min(limits, default=0.0)

    def dry_run(
        self, target: RsyncTarget, keep_lists: bool
    ) -> defer.Deferred[tuple[RsyncOutputParser, int | None, str]]:
        """Run rsync --dry-run on `target`; fires (parser, exit code, stderr text). A run past
        dry_run_limit() is stopped, and so is one whose Deferred is cancelled (its client hung
        up: nobody will read the answer): TERM to its process group, KILL after KILL_GRACE. The
        child counts against max_prefork until it has ended."""
        try:
            argv = build_argv(target, dry_run=True)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        parser = RsyncOutputParser(keep_lists=keep_lists)
        try:
            proto, transport = run_rsync(self.reactor, [*self.prefix, *argv], parser)
        except (OSError, FileNotFoundError) as e:
            return defer.succeed((parser, 127, f"cannot run {target.rsync}: {e}"))
        self.children += 1
        stopper = GroupStopper(self.clock, transport.pid, KILL_GRACE, leader=transport)
        limit = self.dry_run_limit()
        if limit:
            stopper.stop_after(limit)
        answer: defer.Deferred[tuple[RsyncOutputParser, int | None, str]] = defer.Deferred(
            lambda _: stopper.stop()
        )

        def ended(result: RsyncResult) -> None:
            self.children -= 1
            stopper.cancel()
            if answer.called:
                return  # cancelled: its client went away
            code = result.exit_code
            if stopper.requested and code != 0:
                answer.callback((parser, code, f"Process Timeout({limit:g})!"))
            else:
                answer.callback((parser, code, result.stderr))

        proto.ended.addCallback(ended)
        return answer

    # -- orders

    @answers_with_agent_version
    def order_status(self, options: str, following: str = "") -> defer.Deferred[Response]:
        """The running sync's progress; else a dry run's counts and how the last sync ended. A
        client `following` a run (its runId) only wants to know when it ends: no dry run then."""
        target, group = self.targets.resolve(options)
        state_dir = group_state_dir(group)
        job = self.jobs.running(job_key(target, group), state_dir)
        if job is not None or following:
            if job is not None:
                body = self._running_answer(job, with_progress=True)
            else:
                body = {"return": "true", "alreadyRsync": "false"}
                last = self.jobs.last_result(job_key(target, group), state_dir)
                if last:
                    body["lastRsync"] = last
            self._add_live_release(body, target, group)
            return defer.succeed(Response.json(body))
        self.check_capacity()
        d = self.dry_run(target, keep_lists=False)

        def answer(result: tuple[RsyncOutputParser, int | None, str]) -> Response:
            parser, code, stderr = result
            body: dict[str, Any]
            if code != 0:
                body = _rsync_failure(code, stderr)
            else:
                stats = parser.stats
                body = {
                    "return": "true",
                    "alreadyRsync": "false",
                    "transferFilesCount": str(stats.files_transferred or 0),
                    "transferFilesSize": str(stats.transferred_size or 0),
                    "transferDeleteCount": str(parser.delete_count),
                }
            # How the last sync ended matters most when the target cannot even be compared.
            last = self.jobs.last_result(job_key(target, group), state_dir)
            if last:
                body["lastRsync"] = last
            self._add_live_release(body, target, group)
            return Response.json(body)

        return d.addCallback(answer)

    def order_rlist(self, options: str) -> defer.Deferred[Response]:
        target, _ = self.targets.resolve(options)
        self.check_capacity()
        d = self.dry_run(target, keep_lists=True)

        def answer(result: tuple[RsyncOutputParser, int | None, str]) -> Response:
            parser, code, stderr = result
            if code != 0:
                return Response.json(_rsync_failure(code, stderr))
            new = parser.display_new_files()
            if parser.created_directory:
                new.insert(0, "created directory " + display_name(parser.created_directory))
            stats = parser.stats
            return Response.json(
                {
                    "return": "true",
                    "transferNewFiles": new,
                    # files only, as the original listed them: rsync marks a directory with "/"
                    "transferDeleteFiles": [
                        display_name(n) for n in parser.deleted_files if not n.endswith("/")
                    ],
                    "transferFilesCount": str(stats.files_transferred or 0),
                    "transferFilesSize": str(stats.transferred_size or 0),
                }
            )

        return d.addCallback(answer)

    def order_rsync(self, options: str, label: str = "") -> defer.Deferred[Response]:
        target, group = self.targets.resolve(options)
        state_dir = group_state_dir(group)
        job = self.jobs.running(job_key(target, group), state_dir)
        if job is not None:
            return defer.succeed(Response.json(self._running_answer(job, with_progress=False)))
        self.check_capacity()
        allow_empty = group is not None and group.allow_empty_source
        release = None
        if self.releases is not None and group is not None and group.releases is not None:
            release = self.releases.stage(target, group, label)
        # An empty source empties the target with --delete; in release mode always (a new
        # release starts empty), and the guard costs nothing there (the sync's own file list).
        refuse_empty = (release is not None or deletes_on_target(target)) and not allow_empty
        try:
            d = self.jobs.start(
                target,
                refuse_empty=refuse_empty,
                state_dir=state_dir,
                release=release,
                source_retry=self._source_retry(group),
            )
        except ValueError as e:
            raise InvalidTarget(str(e)) from None
        except OSError as e:
            raise JobError(str(e)) from None

        def answer(job: Job) -> Response:
            state = job.state
            body: dict[str, Any] = {"checksum": target.checksum, "return": "true"}
            body["runId"] = job.run_id  # what --wait and deploy follow, and nothing else
            if release is not None:
                body["release"] = release["id"]
            if state.get("state") == "ended" and state.get("outcome") not in (
                OUTCOME_OK,
                OUTCOME_WARNING,
            ):
                message = state.get("message") or "rsync failed"
                body.update(
                    {
                        "return": "false",
                        "content": b64(message + "\n"),
                        "message": message,
                        "outcome": state.get("outcome"),
                    }
                )
                if state.get("exitCode") is not None:
                    body["exitCode"] = state["exitCode"]
            return Response.json(body)

        return d.addCallback(answer)

    def order_rkill(self, options: str) -> Response:
        target, group = self.targets.resolve(options)
        pids = self.jobs.kill(job_key(target, group), group_state_dir(group))
        return Response.json({"return": "true", "process": [str(p) for p in pids]})

    def order_exec(self, options: str) -> defer.Deferred[Response]:
        name, argv = build_command(self.config.jobs, options)
        self.check_capacity()
        command_line = shlex.join(argv)
        self.children += 1
        started = time.monotonic()
        d = run_command(
            self.reactor,
            argv,
            timeout=self.config.server.max_process_timeout,
            prefix=self.prefix,
        )

        def finished(result: Any) -> Any:
            self.children -= 1
            return result

        def could_not_run(failure: Failure) -> Response:
            failure.trap(CommandError)
            return Response.json(
                {
                    "return": "false",
                    "command": b64(command_line),
                    "content": "",
                    "message": failure.getErrorMessage(),
                }
            )

        def answer(result: CommandResult) -> Response:
            body: dict[str, Any] = {
                "return": "true" if result.ok else "false",
                "command": b64(command_line),
                "content": b64(result.output),
            }
            if result.exit_code is not None:
                body["exitCode"] = result.exit_code
            if result.timed_out:
                body["message"] = f"Process Timeout({self.config.server.max_process_timeout:g})!"
            elif result.signal is not None:
                body["message"] = f"killed by signal {result.signal}"
            if result.truncated:
                body["outputTruncated"] = True
            self.log.info(
                "exec {name} exited {code} in {secs:.3f}s",
                name=name,
                code=result.exit_code,
                secs=time.monotonic() - started,
            )
            if result.left_running:
                self.log.warn(
                    "exec {name} exited while {pids} it started still held its output: "
                    "answered without waiting for them",
                    name=name,
                    pids=result.left_running,
                )
            return Response.json(body)

        return d.addBoth(finished).addCallbacks(answer, could_not_run)

    def _source_retry(self, group: RsyncGroup | None) -> float:
        if group is not None and group.source_retry is not None:
            return group.source_retry
        return self.config.server.source_retry

    def _add_live_release(
        self, body: dict[str, Any], target: RsyncTarget, group: RsyncGroup | None
    ) -> None:
        if self.releases is not None and group is not None and group.releases is not None:
            body["release"] = self.releases.live_release(target, group)

    def _running_answer(self, job: Job, *, with_progress: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "return": "true",
            "alreadyRsync": "true",
            "process": [str(p) for p in self.jobs.pids(job)],
            "checksum": job.checksum,
            # the run in progress, so that a caller never takes it for one it started
            "runId": job.run_id or job.state.get("runId"),
            "started": iso_time(job.state.get("started") or job.state.get("created")),
        }
        if with_progress:
            progress = self.jobs.progress(job)
            if progress:
                body["progress"] = progress
            waiting = job.state.get("waiting")
            if waiting:  # the source said max connections: the sync waits to try again
                body["waiting"] = waiting
        return body



def _rsync_failure(code: int | None, stderr: str) -> dict[str, Any]:
    message = error_message(stderr) or f"rsync exited with code {code}"
    body: dict[str, Any] = {
        "return": "false",
        "content": b64(stderr if stderr.strip() else message + "\n"),
        "message": message,
    }
    if code is not None:
        body["exitCode"] = code
    return body


def job_key(target: RsyncTarget, group: RsyncGroup | None) -> str:
    """The registry key of `target`'s syncs (deploy.jobs.target_key), release mode or not."""
    return target_key(target, release_mode=group is not None and group.releases is not None)
