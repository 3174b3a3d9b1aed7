"""What the agent and proxy daemons share at start-up: the original's server options (and
--check-config, --version), turning them into config overrides and loading and checking the
config, the logs, the process title, running as --user/--group, and the order their services
(listening, metrics, systemd notification, reload on SIGHUP) start in. The sockets themselves are
`deploy.listening`'s."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.application import service
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage

from deploy import checkconfig, logs, privileges, sdnotify, version_text
from deploy.config import ConfigError, ServerSettings
from deploy.listening import (  # noqa: F401  (re-exported: what the daemons and tests use)
    MAX_OPEN_FILES,
    ListeningService,
    TunedServerEndpoint,
    defer_accept_seconds,
    listening_service,
    raise_open_files_limit,
    server_endpoint,
    tcp_service,
)
from deploy.reload import ConfigReloader, ReloadService

if TYPE_CHECKING:
    from deploy.metrics import DaemonMetrics
from deploy.notls import skip_pyopenssl

log = Logger()

Config = TypeVar("Config")

# The original daemons' --help, every one accepted; None = "not given" (the file decides).
COMMON_PARAMETERS: list[list[Any]] = [
    ["user", None, None, "drop privileges to this user after binding (default: root)"],
    ["group", None, None, "drop privileges to this group after binding (default: root)"],
    ["addr", None, None, "listen address (default: 0.0.0.0)"],
    ["port", None, None, "listen port"],
    ["backlog", None, None, "listen backlog (default: 128)"],
    ["max-prefork", None, None, "most child processes at once; beyond it answer 503 (0: no limit)"],
    ["max-requests-per-child", None, None, "accepted for compatibility; ignored"],
    ["max-process-timeout", None, None, "most seconds a child process may run (0: no limit)"],
    ["socket-timeout", None, None, "seconds a client has to send its request (default: 5)"],
    ["socket-accept-filter", None, None, "on|off: TCP_DEFER_ACCEPT on the listening socket"],
    ["log-write", None, None, "on|off: write the error and access logs"],
    ["log-error-level", None, None, "emerg|alert|crit|error|warn|notice|info|debug or 0-7"],
    ["log-error-path", None, None, "error log path (strftime patterns allowed) or syslog"],
    ["log-access-path", None, None, "access log path (strftime patterns allowed) or syslog"],
    ["audit-log-path", None, None, "JSON-lines audit log path (strftime patterns) or syslog"],
    ["key-cipher", None, None, "shared key for request signing"],
    ["ssl-private-key", None, None, "TLS private key (PEM); turns TLS on"],
    ["worker-method", None, None, "accepted for compatibility; ignored"],
    ["ipc-path", None, None, "accepted for compatibility; ignored"],
    ["metrics-addr", None, None, "Prometheus metrics and /healthz address (default: 127.0.0.1)"],
    ["metrics-port", None, None, "Prometheus metrics and /healthz port (default: 0, off)"],
]

# Options of the original's process model that an event loop does not need.
IGNORED_OPTIONS = ("max_requests_per_child", "worker_method", "ipc_path")


def collect_overrides(options: usage.Options, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options given on the command line, as config keys (`--max-prefork` → max_prefork)."""
    names = [p[0] for p in COMMON_PARAMETERS] + list(extra)
    overrides: dict[str, Any] = {}
    for name in names:
        value = options.get(name)
        if value is not None:
            overrides[name.replace("-", "_")] = value
    if overrides.get("ssl_private_key"):
        overrides["ssl"] = True
    if options.get("legacy-auth"):
        overrides["legacy_auth"] = True
    if options.get("debug"):
        overrides["log_error_level"] = "debug"
    return overrides


class ConfigProblems(usage.UsageError):
    """A config that loaded but has problems that stop the daemon: said as --check-config says
    them, one `FILE:LINE: problem` line each, and nothing else."""

    def __init__(self, problems: list[checkconfig.Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class DaemonOptions(usage.Options):
    """What both daemons' options share: `--check-config` and `--version`. A config that does
    not load stops the daemon with its `FILE:LINE: problem` line alone (no usage text); the
    checks beyond single values run when the service is made (`refuse_problems`)."""

    program = "deploy"

    def __init__(self) -> None:
        super().__init__()
        self.check: Callable[[Any], list[checkconfig.Problem]] = lambda config: []
        self.load_again: Callable[[], tuple[Any, list[checkconfig.Problem]]] = lambda: (None, [])

    def opt_version(self) -> None:
        """Print deploy's version (and Twisted's) and exit."""
        print(version_text(f"twistd {self.program}"))
        sys.exit(0)

    def load_config(
        self,
        load: Callable[[str, dict[str, Any]], Config],
        check: Callable[..., list[checkconfig.Problem]],
        overrides: dict[str, Any],
        uses_tls: Callable[[Config], bool],
    ) -> Config:
        """The config of `--path` with `overrides` (with --check-config: checked, and exit);
        `check(config, reloading=...)` finds its problems.
        When `uses_tls(config)` is false, pyOpenSSL is kept from loading: ~12 MB of RSS in every
        daemon."""
        self.check = check
        if self["check-config"]:
            report_check(
                self["path"], checkconfig.load_checked(load, check, self["path"], overrides)[1]
            )
        reloading = functools.partial(check, reloading=True)
        self.load_again = functools.partial(
            checkconfig.load_checked, load, reloading, self["path"], overrides
        )
        try:
            config = load(self["path"], overrides)
        except ConfigError as e:
            raise SystemExit(str(e)) from None
        if not uses_tls(config):
            skip_pyopenssl()
        return config

    def refuse_problems(self, config: Any) -> list[checkconfig.Problem]:
        """Stop (ConfigProblems) on what --check-config calls fatal; answer the rest, for the
        daemon to log (`log_warnings`) once its error log holds events."""
        problems = self.check(config)
        fatal = [p for p in problems if p.fatal]
        if fatal:
            raise ConfigProblems(fatal)
        return problems


CHECK_FLAG = ["check-config", None, "check the config (and the files it names), then exit"]


def report_check(path: str, problems: list[checkconfig.Problem]) -> None:
    """--check-config's answer, like `nginx -t`: exit 0 saying the file is fine, or 1 with one
    line per problem."""
    if problems:
        raise SystemExit("\n".join(str(p) for p in problems))
    print(f"{path}: config OK")
    sys.exit(0)


def log_warnings(problems: Iterable[checkconfig.Problem]) -> None:
    """The config's problems that do not stop the daemon, each logged as --check-config says it."""
    for problem in problems:
        log.warn("{problem}", problem=str(problem))


def log_ignored_options(server: ServerSettings, names: tuple[str, ...]) -> None:
    """One warning per process-model option that is set but means nothing to an event loop."""
    for name in names:
        value = getattr(server, name, None)
        if value not in (None, 0, "", False):
            log.warn(
                "{name} = {value} is accepted for compatibility and ignored", name=name, value=value
            )


def service_maker(name: str, build: Callable[[Any, Any], service.MultiService]) -> Any:
    """twistd's `makeService` for `build(options, reactor)`: the global reactor unless one is
    given, and a start-up error (a UsageError: bad TLS files, state directory, --user...) stops
    the daemon with one line naming what to fix, not a traceback."""

    @functools.wraps(build)
    def makeService(options: usage.Options, reactor: Any = None) -> service.MultiService:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        try:
            return build(options, reactor)
        except ConfigProblems as e:
            raise SystemExit(str(e)) from None
        except usage.UsageError as e:
            raise SystemExit(f"twistd {name}: {e}") from None

    return makeService


def assemble(
    reactor: Any,
    server: ServerSettings,
    factory: Factory,
    log_service: logs.LogService,
    drop: privileges.DropPrivilegesService,
    *,
    metrics: DaemonMetrics | None = None,
    writable: Iterable[str] = (),
    reloader: ConfigReloader | None = None,
) -> service.MultiService:
    """A daemon's services, in the order they must start: the port (and the metrics port) is
    bound (privilegedStartService) before privileges are dropped, and the log files open
    (startService) after; then the process title; then SIGHUP reloads; last the systemd
    notifier, so READY=1 goes out once all the rest is done (and STOPPING=1 first)."""
    top = service.MultiService()
    main = listening_service(reactor, server, metrics.counting(factory) if metrics else factory)
    main.setServiceParent(top)
    if metrics is not None:
        from deploy.metrics_web import HealthResource, listening_check, metrics_site, writable_check

        where = f"{server.addr}:{server.port}"
        checks = [listening_check(lambda: main.port is not None, where)]
        checks += [writable_check(d) for d in writable]
        site = metrics_site(metrics.registry, HealthResource(checks))
        tcp_service(reactor, server.metrics_addr, server.metrics_port, site).setServiceParent(top)
    drop.setServiceParent(top)
    log_service.setServiceParent(top)
    ProcessTitleService(server).setServiceParent(top)
    environ = sdnotify.take_environment()
    notify = sdnotify.NotifyService(
        reactor,
        sdnotify.Notifier(environ.get("NOTIFY_SOCKET")),
        main.when_listening,
        describe=lambda: f"listening on {main.address()}",
        watchdog=sdnotify.watchdog_interval(environ, os.getpid()),
    )
    if reloader is not None:
        reloader.notify = notify
        ReloadService(reactor, reloader).setServiceParent(top)
    notify.setServiceParent(top)
    return top


def setup_logging(
    server: ServerSettings, factory: Any, *, daemon: str = "agent"
) -> logs.LogService:
    """The error, access and audit logs `server` asks for, as a service to start with the
    daemon. Built early in `makeService`: from here on the error log keeps start-up warnings
    for its file, which opens (as the user the daemon runs as) when the service starts."""
    try:
        return logs.build_log_service(
            log_write=server.log_write,
            log_error_level=server.log_error_level,
            log_error_path=server.log_error_path,
            log_access_path=server.log_access_path,
            audit_log_path=server.audit_log_path,
            factory=factory,
            daemon=daemon,
        )
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def run_as(
    server: ServerSettings,
    log_service: logs.LogService,
    *,
    own: Iterable[str] = (),
    create: Iterable[str] = (),
) -> privileges.DropPrivilegesService:
    """Running as `user`/`group`: prepare the directories now (still root; `own` are handed
    over, `create` and the log directories are made if missing), and return the service that
    drops privileges once the port is bound. Put it after the listening service."""
    try:
        identity = privileges.resolve_identity(server.user, server.group)
    except privileges.PrivilegeError as e:
        raise usage.UsageError(str(e)) from None
    own, create = list(own), list(create)
    if privileges.is_switch(identity):
        assert identity is not None
        if os.geteuid() != 0:
            raise usage.UsageError(f"cannot run as {identity.label}: not started as root")
        log_dirs = logs.log_directories(log_service.paths)
        try:
            privileges.prepare_directories(identity, own=own, create=[*create, *log_dirs])
        except OSError as e:
            message = f"cannot prepare directories for {identity.label}: {e}"
            raise usage.UsageError(message) from None

    def dirs() -> list[str]:
        return [*own, *create, *logs.log_directories(log_service.paths)]

    def files() -> list[str]:
        return logs.current_files(log_service.paths)

    return privileges.DropPrivilegesService(identity, own=own, dirs=dirs, files=files)


def set_process_title(server: ServerSettings) -> str | None:
    """`process_name` as the process title, as the original showed it (`deploy::agent: master
    process`), when the optional `setproctitle` is installed. Returns the title set."""
    if not server.process_name:
        return None
    try:
        setproctitle = importlib.import_module("setproctitle")
    except ImportError:
        log.warn(
            "process_name = {name} needs the setproctitle package (pip install deploy[proctitle]);"
            " the process title stays as it is",
            name=server.process_name,
        )
        return None
    title = f"{server.process_name} master process"
    setproctitle.setproctitle(title)
    return title


class ProcessTitleService(service.Service):
    """Sets the process title when the daemon starts (not when its service is built)."""

    def __init__(self, server: ServerSettings) -> None:
        self.server = server

    def startService(self) -> None:
        super().startService()
        set_process_title(self.server)
