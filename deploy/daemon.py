"""What the agent and proxy daemons share at start-up: the original's server options, turning
them into config overrides, and the listening service (TCP or TLS endpoint, backlog, address)."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage

from deploy.config import ServerSettings

log = Logger()

# The original daemons' --help, every one accepted; None = "not given" (the file decides).
COMMON_PARAMETERS = [
    ["user", None, None, "drop privileges to this user after binding (default: root)"],
    ["group", None, None, "drop privileges to this group after binding (default: root)"],
    ["addr", None, None, "listen address (default: 0.0.0.0)"],
    ["port", None, None, "listen port"],
    ["backlog", None, None, "listen backlog (default: 128)"],
    ["max-prefork", None, None, "most child processes at once; beyond it answer 503 (0: no limit)"],
    ["max-requests-per-child", None, None, "accepted for compatibility; ignored"],
    ["max-process-timeout", None, None, "most seconds a child process may run (0: no limit)"],
    ["socket-timeout", None, None, "idle seconds before a connection is closed (default: 5)"],
    ["socket-accept-filter", None, None, "on|off: TCP_DEFER_ACCEPT on the listening socket"],
    ["log-write", None, None, "on|off: write the error and access logs"],
    ["log-error-level", None, None, "emerg|alert|crit|error|warn|notice|info|debug or 0-7"],
    ["log-error-path", None, None, "error log path (strftime patterns allowed) or syslog"],
    ["log-access-path", None, None, "access log path (strftime patterns allowed) or syslog"],
    ["key-cipher", None, None, "shared key for request signing"],
    ["ssl-private-key", None, None, "TLS private key (PEM); turns TLS on"],
    ["worker-method", None, None, "accepted for compatibility; ignored"],
    ["ipc-path", None, None, "accepted for compatibility; ignored"],
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
    if options.get("debug"):
        overrides["log_error_level"] = "debug"
    return overrides


def log_ignored_options(server: ServerSettings, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(server, name, None)
        if value not in (None, 0, "", False):
            log.warn(
                "{name} = {value} is accepted for compatibility and ignored", name=name, value=value
            )


def server_endpoint(reactor: Any, server: ServerSettings) -> Any:
    """The listening endpoint for `server`: TCP on IPv4 or IPv6, TLS when `ssl` is on."""
    interface = server.addr or "0.0.0.0"
    if server.ssl:
        from deploy.tls import TLSConfigError, server_context_factory

        if not server.ssl_private_key:
            raise usage.UsageError("ssl = true needs ssl_private_key")
        try:
            context = server_context_factory(
                server.ssl_private_key, server.ssl_certificate, server.ssl_client_ca
            )
        except TLSConfigError as e:
            raise usage.UsageError(str(e)) from None
        return endpoints.SSL4ServerEndpoint(
            reactor, server.port, context, backlog=server.backlog, interface=interface
        )
    if ":" in interface:
        return endpoints.TCP6ServerEndpoint(
            reactor, server.port, backlog=server.backlog, interface=interface
        )
    return endpoints.TCP4ServerEndpoint(
        reactor, server.port, backlog=server.backlog, interface=interface
    )


def listening_service(reactor: Any, server: ServerSettings, factory: Factory) -> Any:
    svc = StreamServerEndpointService(server_endpoint(reactor, server), factory)
    # A port that cannot be bound stops twistd with the reason instead of logging and going on.
    svc._raiseSynchronously = True
    return svc
