"""What the agent and proxy daemons share at start-up: the original's server options, turning
them into config overrides and loading the config, the listening service (TCP or TLS endpoint,
backlog, address, TCP_DEFER_ACCEPT), the logs, the process title, running as --user/--group,
and the order these services start in."""

from __future__ import annotations

import functools
import importlib
import math
import os
import resource
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from deploy import logs, privileges
from deploy.config import ConfigError, ServerSettings
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
]

# Every connection holds a file descriptor; the soft limit is raised to this (or the hard limit).
MAX_OPEN_FILES = 65536

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


def load_config(
    load: Callable[[str, dict[str, Any]], Config],
    path: str,
    overrides: dict[str, Any],
    uses_tls: Callable[[Config], bool],
) -> Config:
    """`load(path, overrides)`, a bad config as the UsageError twistd prints in one line. When
    `uses_tls(config)` is false, pyOpenSSL is kept from loading: ~12 MB of RSS in every daemon."""
    try:
        config = load(path, overrides)
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    if not uses_tls(config):
        skip_pyopenssl()
    return config


def log_ignored_options(server: ServerSettings, names: tuple[str, ...]) -> None:
    """One warning per process-model option that is set but means nothing to an event loop."""
    for name in names:
        value = getattr(server, name, None)
        if value not in (None, 0, "", False):
            log.warn(
                "{name} = {value} is accepted for compatibility and ignored", name=name, value=value
            )


def server_endpoint(reactor: Any, server: ServerSettings) -> Any:
    """The listening endpoint for `server`: TCP on IPv4 or IPv6, with TLS when `ssl` is on.

    A TLS key, certificate or CA file that cannot be used raises UsageError naming it, before
    anything listens. A TLS handshake must complete within `socket_timeout` seconds."""
    from twisted.internet import endpoints

    interface = server.addr or "0.0.0.0"
    endpoint_class = (
        endpoints.TCP6ServerEndpoint if ":" in interface else endpoints.TCP4ServerEndpoint
    )
    tcp = endpoint_class(reactor, server.port, backlog=server.backlog, interface=interface)
    if not server.ssl:
        tls_files = [
            name
            for name in ("ssl_private_key", "ssl_certificate", "ssl_client_ca")
            if getattr(server, name)
        ]
        if tls_files:
            # The original's rule, kept: only `ssl = true` turns TLS on. A key without it is
            # almost always a forgotten line, and clients would otherwise just see a plain port.
            log.warn(
                "{names} set but ssl is off: listening WITHOUT TLS (set ssl = true to use it)",
                names=", ".join(tls_files),
            )
        return tcp
    from deploy.tls import TLSConfigError, server_context_from_settings
    from deploy.tls_endpoint import TLSServerEndpoint
    from deploy.tls_keys import public_key_fingerprint

    try:
        context = server_context_from_settings(server)
        fingerprint = public_key_fingerprint(server.ssl_private_key or "")
    except TLSConfigError as e:
        raise usage.UsageError(str(e)) from None
    assert context is not None
    # What an operator compares with the clients' pin, and how clients are checked.
    log.info(
        "TLS with key {key} (public key sha256 {fingerprint}), {certificate}, {clients}",
        key=server.ssl_private_key,
        fingerprint=fingerprint,
        certificate=(
            f"certificate {server.ssl_certificate}"
            if server.ssl_certificate
            else "self-signed certificate"
        ),
        clients=(
            f"client certificates required from CA {server.ssl_client_ca}"
            if server.ssl_client_ca
            else "no client certificate required"
        ),
    )
    return TLSServerEndpoint(tcp, context, reactor, handshake_timeout=server.socket_timeout or None)


def defer_accept_seconds(server: ServerSettings) -> int | None:
    """TCP_DEFER_ACCEPT for `socket_accept_filter`: wake us only once the request's first bytes
    came, waiting at most the socket timeout (5 s when that is off)."""
    if not server.socket_accept_filter:
        return None
    return max(1, math.ceil(server.socket_timeout or 5))


@implementer(IStreamServerEndpoint)
class TunedServerEndpoint:
    """An endpoint whose listening socket gets TCP_DEFER_ACCEPT once bound (Linux; elsewhere the
    option is reported as unsupported and ignored)."""

    log = Logger()

    def __init__(self, endpoint: Any, defer_accept: int | None) -> None:
        self.endpoint = endpoint
        self.defer_accept = defer_accept

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return self.endpoint.listen(factory).addCallback(self._tune)

    def _tune(self, port: Any) -> Any:
        if self.defer_accept is None:
            return port
        option = getattr(socket, "TCP_DEFER_ACCEPT", None)
        sock = getattr(port, "socket", None)
        if option is None or sock is None:
            self.log.warn("socket_accept_filter is not supported here (Linux only); ignored")
            return port
        sock.setsockopt(socket.IPPROTO_TCP, option, self.defer_accept)
        return port


class ListeningService(StreamServerEndpointService):
    """Binds in privilegedStartService; a port that cannot be bound stops twistd with one line
    (the reason) instead of a traceback."""

    def privilegedStartService(self) -> None:
        raise_open_files_limit()
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or '0.0.0.0'}:{e.port}"
            raise SystemExit(f"cannot listen on {where}: {e.socketError}") from None


def raise_open_files_limit() -> int | None:
    """Lift the soft RLIMIT_NOFILE to the hard limit (at most MAX_OPEN_FILES): with systemd's
    default soft limit of 1024, a thousand idle connections would leave no descriptor for a
    real request. Answers the new soft limit when it was raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as e:
        log.warn("cannot raise the open files limit from {soft}: {e}", soft=soft, e=e)
        return None
    log.info("open files limit raised from {soft} to {want}", soft=soft, want=want)
    return want


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
        except usage.UsageError as e:
            raise SystemExit(f"twistd {name}: {e}") from None

    return makeService


def listening_service(reactor: Any, server: ServerSettings, factory: Factory) -> Any:
    """The service that listens for `factory`: the port is bound in its privilegedStartService,
    so before the daemon drops its privileges; TCP_DEFER_ACCEPT when asked."""
    endpoint = TunedServerEndpoint(server_endpoint(reactor, server), defer_accept_seconds(server))
    svc = ListeningService(endpoint, factory)
    # A port that cannot be bound stops twistd with the reason instead of logging and going on.
    svc._raiseSynchronously = True
    return svc


def assemble(
    reactor: Any,
    server: ServerSettings,
    factory: Factory,
    log_service: logs.LogService,
    drop: privileges.DropPrivilegesService,
) -> service.MultiService:
    """A daemon's services, in the order they must start: the port is bound
    (privilegedStartService) before privileges are dropped, and the log files open (startService)
    after; then the process title."""
    top = service.MultiService()
    listening_service(reactor, server, factory).setServiceParent(top)
    drop.setServiceParent(top)
    log_service.setServiceParent(top)
    ProcessTitleService(server).setServiceParent(top)
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
