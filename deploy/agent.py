"""The agent: its protocol and factory, request authentication and access checks, and the five
order handlers (status, rlist, rsync, rkill, exec)."""

from __future__ import annotations

import base64
import shlex
import signal
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deploy import auth
from deploy.access import AllowedHosts, AllowedPaths, PathNotAllowed
from deploy.commands import (
    CommandError,
    CommandResult,
    build_command,
    group_leader_prefix,
    run_command,
    signal_process,
)
from deploy.config import AgentConfig, RsyncGroup, agent_key_cipher
from deploy.jobs import Job, JobError, JobRegistry, check_state_dir, deletes_on_target
from deploy.jobstate import OUTCOME_OK, OUTCOME_WARNING, error_message
from deploy.rsync import (
    RsyncOutputParser,
    RsyncTarget,
    build_argv,
    display_name,
    run_rsync,
)
from deploy.wire import (
    Request,
    RequestError,
    RequestFactory,
    Response,
    ServiceRequestReceiver,
)

ORDERS = ("status", "rlist", "rsync", "rkill", "exec")
MAX_OPTIONS = 8192
DEFAULT_STATE_DIR = "/var/lib/deploy"
# rsync hands a `host:path` source to a remote shell (ssh), and before 3.2.4 (or with
# RSYNC_OLD_ARGS set) unescaped: these would start commands on that host.
_SHELL_SPECIAL = frozenset(";&|`$<>()")


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return base64.b64encode(data).decode("ascii")


def names_a_remote_host(source: str) -> bool:
    """rsync's own rule: `rsync://...`, or a `:` before any `/` (`HOST::MODULE`, `HOST:PATH`)."""
    if source.startswith("rsync://"):
        return True
    host, colon, _ = source.partition(":")
    return bool(colon and host and "/" not in host)


class Busy(RequestError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            503, f"too many child processes running (max_prefork = {limit}); try again later"
        )


class AgentService:
    """What every agent connection shares: config, access lists, auth state, jobs, children."""

    log = Logger()

    def __init__(self, config: AgentConfig, reactor: Any, *, clock: IReactorTime | None = None):
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        server = config.server
        self.key_cipher = agent_key_cipher(server)
        self.verifier = auth.HmacVerifier(
            self.key_cipher, clock=self.clock, window=server.auth_window
        )
        self.allowed_hosts = AllowedHosts(config.allow_hosts)
        self.allowed_paths = AllowedPaths(config.allow_paths)
        self.state_dir = server.state_path or DEFAULT_STATE_DIR
        self.jobs = JobRegistry(reactor, self.state_dir, grace=server.rkill_grace, clock=self.clock)
        self.children = 0  # dry runs and exec commands in flight
        self.prefix = group_leader_prefix()

    def startup(self) -> None:
        """Checks that must pass before the agent listens, and jobs a previous agent left."""
        # A sync must be able to record itself: refuse to run with a state dir that cannot.
        group_dirs = [g.queue_path for g in self.config.groups.values() if g.queue_path]
        for directory in dict.fromkeys([self.state_dir, *group_dirs]):
            check_state_dir(directory)
        for name in self.allowed_hosts.unresolved:
            self.log.warn("allow::hosts entry {name} does not resolve; ignored", name=name)
        if not self.config.allow_hosts:
            self.log.warn("[allow::hosts] is empty: every request will be refused")
        self.jobs.recover(group_dirs)

    # -- checks

    def authenticate(self, request: Request, fields: dict[str, str]) -> None:
        header = request.headers.get("authorization")
        target = request.path + (f"?{request.query}" if request.query else "")
        try:
            if header:
                self.verifier.verify(header, request.method, target, request.body)
            elif self.config.server.legacy_auth and fields.get("auth_key"):
                auth.check_legacy_auth_key(
                    self.key_cipher,
                    fields["auth_key"],
                    now=self.clock.seconds(),
                    window=self.config.server.auth_window,
                )
            elif fields.get("auth_key"):
                raise auth.AuthError(
                    "legacy auth_key refused: this agent needs a signed request "
                    "(or legacy_auth = true in [server])"
                )
            else:
                raise auth.AuthError("missing Authorization header")
        except auth.AuthError as e:
            raise RequestError(401, str(e)) from None

    def check_capacity(self) -> None:
        limit = self.config.server.max_prefork
        if limit and self.children + self.jobs.running_count() >= limit:
            raise Busy(limit)

    def resolve_target(self, options: str) -> tuple[RsyncTarget, RsyncGroup | None]:
        """`options` is a group name, or inline `REMOTE_SOURCE,/local/path`."""
        if "," in options:
            dest, _, src = options.partition(",")
            dest, src = dest.strip(), src.strip()
            if not dest or not src:
                raise RequestError(400, "empty value in options!")
            if (
                dest.startswith("-")
                or any(ord(c) < 32 or ord(c) == 127 for c in dest)
                or not _SHELL_SPECIAL.isdisjoint(dest)
            ):
                raise RequestError(400, f"bad remote source {dest!r}")
            if not names_a_remote_host(dest):
                # A local source would let a request copy any file the agent can read (its
                # /etc) into an allowed directory: only the config may name one.
                raise RequestError(
                    400,
                    f"bad remote source {dest!r}: name a host "
                    "(HOST::MODULE/path, rsync://HOST/MODULE/path or HOST:path)",
                )
            group = None
            target = RsyncTarget(dest=dest, src=src)
        else:
            group = self.config.groups.get(options)
            if group is None:
                raise RequestError(400, "empty value in options!")
            target = RsyncTarget(
                dest=group.dest,
                src=group.src,
                rsync=group.rsync,
                rsh=group.rsh,
                options=tuple(group.options) if group.options is not None else None,
                excludes=tuple(group.excludes),
                includes=tuple(group.includes),
                max_delete=group.max_delete,
            )
        try:
            self.allowed_paths.check(target.src)
        except PathNotAllowed as e:
            raise RequestError(403, str(e)) from None
        return target, group

    # -- dry runs

    @defer.inlineCallbacks
    def dry_run(self, target: RsyncTarget, keep_lists: bool):
        """Run rsync --dry-run on `target`; fires (parser, exit code, stderr text)."""
        try:
            argv = build_argv(target, dry_run=True)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        parser = RsyncOutputParser(keep_lists=keep_lists)
        self.children += 1
        timer = None
        timed_out = []

        def stop(transport: Any) -> None:
            timed_out.append(True)
            _stop_group(transport)

        try:
            try:
                proto, transport = run_rsync(self.reactor, [*self.prefix, *argv], parser)
            except (OSError, FileNotFoundError) as e:
                return parser, 127, f"cannot run {target.rsync}: {e}"
            timeout = self.config.server.max_process_timeout
            if timeout:
                timer = self.clock.callLater(timeout, stop, transport)
            result = yield proto.ended
        finally:
            self.children -= 1
            if timer is not None and timer.active():
                timer.cancel()
        code = result.exit_code
        # Only a timer that fired means a timeout: a cancelled one is not active() either.
        if timed_out and code != 0:
            return parser, code, f"Process Timeout({timeout:g})!"
        return parser, code, result.stderr

    # -- orders

    def order_status(self, options: str) -> defer.Deferred[Response]:
        target, group = self.resolve_target(options)
        state_dir = _state_dir(group)
        job = self.jobs.running(target.checksum, state_dir)
        if job is not None:
            return defer.succeed(Response.json(self._running_answer(job, with_progress=True)))
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
                }
            # How the last sync ended matters most when the target cannot even be compared.
            last = self.jobs.last_result(target.checksum, state_dir)
            if last:
                body["lastRsync"] = last
            return Response.json(body)

        return d.addCallback(answer)

    def order_rlist(self, options: str) -> defer.Deferred[Response]:
        target, _ = self.resolve_target(options)
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

    def order_rsync(self, options: str) -> defer.Deferred[Response]:
        target, group = self.resolve_target(options)
        state_dir = _state_dir(group)
        job = self.jobs.running(target.checksum, state_dir)
        if job is not None:
            return defer.succeed(Response.json(self._running_answer(job, with_progress=False)))
        self.check_capacity()
        allow_empty = group is not None and group.allow_empty_source
        try:
            d = self.jobs.start(
                target,
                refuse_empty=deletes_on_target(target) and not allow_empty,
                state_dir=state_dir,
            )
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        except (JobError, OSError) as e:
            raise RequestError(500, str(e)) from None

        def answer(job: Job) -> Response:
            state = job.state
            body: dict[str, Any] = {"checksum": target.checksum, "return": "true"}
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
        target, group = self.resolve_target(options)
        pids = self.jobs.kill(target.checksum, _state_dir(group))
        return Response.json({"return": "true", "process": [str(p) for p in pids]})

    def order_exec(self, options: str) -> defer.Deferred[Response]:
        try:
            name, argv = build_command(self.config.jobs, options)
        except CommandError as e:
            raise RequestError(400, str(e)) from None
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
            return Response.json(body)

        return d.addBoth(finished).addCallbacks(answer, could_not_run)

    def _running_answer(self, job: Job, *, with_progress: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "return": "true",
            "alreadyRsync": "true",
            "process": [str(p) for p in self.jobs.pids(job)],
            "checksum": job.checksum,
        }
        if with_progress:
            progress = self.jobs.progress(job)
            if progress:
                body["progress"] = progress
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


def _state_dir(group: RsyncGroup | None) -> str | None:
    return group.queue_path if group is not None and group.queue_path else None


def _stop_group(transport: Any) -> None:
    pid = getattr(transport, "pid", None)
    if pid:
        signal_process(pid, signal.SIGKILL)


class AgentProtocol(ServiceRequestReceiver):
    """One request: peer check, method/path, auth, then the order handler."""

    factory: AgentFactory

    def handleRequest(self, request: Request) -> Response | defer.Deferred[Response]:
        service = self.factory.service
        segments = request.segments
        if len(segments) != 2 or segments[0] != "agent" or segments[1] not in ORDERS:
            raise RequestError(404, "")
        order = segments[1]
        fields = request.form()
        self.audit.update(order=order, options=fields.get("options", ""))
        service.authenticate(request, fields)
        options = fields.get("options", "")
        if len(options) > MAX_OPTIONS:
            raise RequestError(400, "options too long")
        if not options:
            raise RequestError(400, "empty value in options!")
        self.factory.log.info(
            "{order} {options!r} from {peer}", order=order, options=options, peer=request.peer
        )
        handler: Callable[[str], Any] = getattr(service, "order_" + order)
        return handler(options)


class AgentFactory(RequestFactory):
    protocol = AgentProtocol
    log = Logger()

    def __init__(self, service: AgentService) -> None:
        super().__init__()
        self.service = service
