"""The daemons' listening sockets: the endpoint a `[server]` section asks for (TCP on IPv4 or
IPv6, TLS, backlog, TCP_DEFER_ACCEPT), binding it before privileges are dropped, and knowing
whether it is bound (what readiness and /healthz ask)."""

from __future__ import annotations

import math
import resource
import socket
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from deploy.config import ServerSettings

log = Logger(namespace="deploy.daemon")

# Every connection holds a file descriptor; the soft limit is raised to this (or the hard limit).
MAX_OPEN_FILES = 65536


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
    (the reason) instead of a traceback. `port` is the bound port while the service runs."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        super().__init__(endpoint, factory)
        self.port: IListeningPort | None = None
        self._listeners: list[defer.Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        raise_open_files_limit()
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or '0.0.0.0'}:{e.port}"
            raise SystemExit(f"cannot listen on {where}: {e.socketError}") from None
        if self._waitingForPort is not None:
            self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        listeners, self._listeners = self._listeners, []
        for d in listeners:
            d.callback(port)
        return port

    def when_listening(self) -> defer.Deferred[IListeningPort]:
        """Fires with the port once it is bound (at once when it is)."""
        if self.port is not None:
            return defer.succeed(self.port)
        d: defer.Deferred[IListeningPort] = defer.Deferred()
        self._listeners.append(d)
        return d

    def address(self) -> str:
        """`host:port` the service listens on, or "" while it does not."""
        if self.port is None:
            return ""
        host = self.port.getHost()
        return f"{getattr(host, 'host', host)}:{getattr(host, 'port', '')}"

    def stopService(self) -> defer.Deferred[None]:
        self.port = None
        return super().stopService()


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


def listening_service(reactor: Any, server: ServerSettings, factory: Factory) -> Any:
    """The service that listens for `factory`: the port is bound in its privilegedStartService,
    so before the daemon drops its privileges; TCP_DEFER_ACCEPT when asked."""
    endpoint = TunedServerEndpoint(server_endpoint(reactor, server), defer_accept_seconds(server))
    svc = ListeningService(endpoint, factory)
    # A port that cannot be bound stops twistd with the reason instead of logging and going on.
    svc._raiseSynchronously = True
    return svc


def tcp_service(reactor: Any, addr: str, port: int, factory: Any) -> ListeningService:
    """A plain TCP port for `factory` on `addr` (IPv4 or IPv6), bound like the daemon's own:
    in privilegedStartService, a failure stopping twistd with one line."""
    from twisted.internet import endpoints

    endpoint_class = endpoints.TCP6ServerEndpoint if ":" in addr else endpoints.TCP4ServerEndpoint
    svc = ListeningService(endpoint_class(reactor, port, interface=addr), factory)
    svc._raiseSynchronously = True
    return svc
