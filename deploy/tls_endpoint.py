"""The daemons' TLS listening endpoint: TLS over a TCP endpoint, each handshake given a deadline,
and a log line saying why a client's handshake failed."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from deploy.tls_failures import describe_tls_failure_from_client
from deploy.wire import peer_host

# The namespace these lines had in the error log before the endpoint left deploy.tls: the log
# filters of operators keep working.
log = Logger(namespace="deploy.tls")


@implementer(IHandshakeListener)
class _HandshakeDeadline(ProtocolWrapper):
    """Sits between TLS and the daemon's protocol: drops a connection whose handshake has not
    completed in time, and logs why a handshake failed.

    Needed because the daemon's own idle timeout cannot end such a connection: it answers 408
    and closes, but TLS holds an answer written before the handshake until the handshake
    completes, so a client that stays silent would keep the connection (and a descriptor)
    forever."""

    factory: _HandshakeDeadlineFactory
    transport: TLSMemoryBIOProtocol

    def makeConnection(self, transport: object) -> None:
        self._handshake_done = False
        timeout = self.factory.timeout
        self._deadline = self.factory.clock.callLater(timeout, self._expired) if timeout else None
        super().makeConnection(transport)

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedProtocol, "logPrefix", None)
        return prefix() if callable(prefix) else type(self.wrappedProtocol).__name__

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        self._cancel()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _expired(self) -> None:
        self._deadline = None
        log.info(
            "TLS handshake not completed within {timeout:g} s; dropped the connection from {peer}",
            timeout=self.factory.timeout,
            peer=peer_host(self.transport.getPeer()),
        )
        self.transport.abortConnection()

    def _cancel(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel()
        if not self._handshake_done:
            why = None
            if isinstance(reason.value, SSL.Error):
                why = describe_tls_failure_from_client(reason.value)
            elif self._hello_answered():
                # Our clients refuse a certificate by hanging up without an alert. A bare TCP
                # check (a load balancer's) hangs up before any ClientHello: not worth a line.
                why = (
                    "client hung up after our certificate; it probably refused it "
                    "(its pin or CA does not match this server's key or certificate)"
                )
            if why is not None:
                log.info(
                    "TLS handshake with {peer} failed: {why}",
                    peer=peer_host(self.transport.getPeer()),
                    why=why,
                )
        super().connectionLost(reason)

    def _hello_answered(self) -> bool:
        """Whether the handshake got as far as our ServerHello (a cipher was chosen)."""
        try:
            return self.transport.getHandle().get_cipher_name() is not None
        except (AttributeError, SSL.Error):
            return False


class _HandshakeDeadlineFactory(WrappingFactory):
    protocol = _HandshakeDeadline

    def __init__(
        self, wrapped: IProtocolFactory, clock: IReactorTime, timeout: float | None
    ) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.timeout = timeout

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedFactory, "logPrefix", None)
        return prefix() if callable(prefix) else type(self.wrappedFactory).__name__


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """TLS on top of a listening TCP endpoint, with a deadline for each handshake.

    ``handshake_timeout`` seconds after a client connects, a connection whose TLS handshake has
    not completed is aborted (None or 0: no deadline)."""

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        creator: IOpenSSLServerConnectionCreator,
        clock: IReactorTime,
        handshake_timeout: float | None,
    ) -> None:
        self.endpoint = endpoint
        self.creator = creator
        self.clock = clock
        self.handshake_timeout = handshake_timeout

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        inner = _HandshakeDeadlineFactory(protocolFactory, self.clock, self.handshake_timeout)
        return self.endpoint.listen(TLSMemoryBIOFactory(self.creator, False, inner))
