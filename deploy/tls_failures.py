"""What a failed TLS connection means, in one line: for the client (`describe_tls_failure`: our
own certificate checks' reasons, OpenSSL's reason strings mapped to what to fix) and for the
server's log (`describe_tls_failure_from_client`)."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import error as twisted_error
from twisted.python.failure import Failure

from deploy.config import TLSConfigError

# OpenSSL reason strings a TLS client sees when the peer answered in plain text.
_NOT_TLS_REASONS = (
    "wrong version number",
    "packet length too long",
    "unknown protocol",
)
_PLAIN_HTTP_FROM_CLIENT_REASONS = ("http request", "https proxy request")
_CLIENT_CERT_REQUIRED_REASONS = ("alert certificate required", "peer did not return a certificate")
_CLIENT_CERT_REFUSED_REASONS = (
    "alert unknown ca",
    "alert bad certificate",
    "alert certificate unknown",
    "alert certificate expired",
    "alert decrypt error",
)
_VERSION_REASONS = ("alert protocol version", "unsupported protocol", "no protocols available")
# What the server sees when a client's certificate is missing or not from ssl_client_ca.
_NO_CLIENT_CERT_REASONS = ("peer did not return a certificate", "certificate required")

NOT_TLS_MESSAGE = "server does not speak TLS (is ssl enabled on it?)"
CLIENT_CERT_REQUIRED_MESSAGE = "server requires a client certificate (--ssl-cert/--ssl-key)"
CLOSED_MESSAGE = "server closed the connection (if during the TLS handshake: is ssl enabled on it?)"


class TLSVerificationError(Exception):
    """The client refused the server's certificate during the handshake; the message says why."""


def openssl_reasons(exc: SSL.Error) -> str:
    """The reason strings of an OpenSSL error queue, joined; or the error's text."""
    args = exc.args[0] if exc.args else None
    if isinstance(args, list):
        reasons = [str(entry[-1]) for entry in args if isinstance(entry, tuple) and entry]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__


def describe_tls_failure_from_client(exc: SSL.Error) -> str:
    """One line for the server's log: why a client's handshake failed, and what to fix."""
    reasons = openssl_reasons(exc)
    lowered = reasons.lower()
    if any(r in lowered for r in _PLAIN_HTTP_FROM_CLIENT_REASONS):
        return "client sent plain HTTP, not TLS (does it use --ssl-public-key or --ssl-ca?)"
    if any(r in lowered for r in _NO_CLIENT_CERT_REASONS):
        return "client sent no certificate; ssl_client_ca requires one (--ssl-cert/--ssl-key)"
    if "certificate verify failed" in lowered:
        return f"client certificate is not signed by the ssl_client_ca ({reasons})"
    if any(r in lowered for r in _VERSION_REASONS):
        return f"client offers no TLS version deploy accepts (1.2 or newer) ({reasons})"
    if any(r in lowered for r in _NOT_TLS_REASONS):
        return f"client does not speak TLS ({reasons})"
    if "alert" in lowered:
        # The client refused us: most often our certificate (wrong pin, unknown CA, host name).
        return f"client refused the handshake ({reasons}); check its pin or CA"
    return f"TLS error: {reasons}"


def describe_tls_failure(failure_or_exc: Failure | BaseException) -> str:
    """One readable line for why a TLS connection failed, as the client saw it.

    Reasons found during the handshake by our own checks (pin, CA, host name) come back as they
    were given; OpenSSL errors are mapped by their reason strings, else shown as they are.
    """
    exc = failure_or_exc.value if isinstance(failure_or_exc, Failure) else failure_or_exc
    if isinstance(exc, TLSVerificationError | TLSConfigError):
        return str(exc)
    if isinstance(exc, SSL.Error):
        reasons = openssl_reasons(exc)
        lowered = reasons.lower()
        if any(r in lowered for r in _PLAIN_HTTP_FROM_CLIENT_REASONS):
            return "client sent plain HTTP, not TLS (is ssl enabled on the client?)"
        if any(r in lowered for r in _NOT_TLS_REASONS):
            return NOT_TLS_MESSAGE
        if any(r in lowered for r in _CLIENT_CERT_REQUIRED_REASONS):
            return CLIENT_CERT_REQUIRED_MESSAGE
        if any(r in lowered for r in _CLIENT_CERT_REFUSED_REASONS):
            return f"server refused our client certificate ({reasons})"
        if any(r in lowered for r in _VERSION_REASONS):
            return f"no common TLS version; deploy needs TLS 1.2 or newer ({reasons})"
        if "certificate verify failed" in lowered:
            return "server certificate could not be verified"
        return f"TLS error: {reasons}"
    if isinstance(exc, twisted_error.ConnectionDone | twisted_error.ConnectionLost):
        # Twisted reports an EOF in the middle of the handshake as ConnectionLost; a plain server
        # that hangs up on our ClientHello looks exactly like that.
        return CLOSED_MESSAGE
    return str(exc) or type(exc).__name__
