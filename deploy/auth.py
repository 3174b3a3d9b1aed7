"""Request signing and checking: HMAC-SHA256 over method, path, time, nonce and body (and, in
the bound form, the host the client addressed), with a clock window, a nonce replay cache and
named keys (``kid=``); the original's one-time ``auth_key``, only when enabled; and
`RequestAuthenticator`, the one check the agent and the proxy both run on a request.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

DEFAULT_KEY_CIPHER = "65535"
SCHEME = "Deploy-HMAC-SHA256"

MAX_HEADER_LENGTH = 512

_TS = re.compile(r"[0-9]{1,15}")
_NONCE = re.compile(r"[0-9a-fA-F]{16,64}")
_SIG = re.compile(r"[0-9a-fA-F]{64}")
_DIGITS = re.compile(r"[0-9]{1,20}")
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# host[:port] as a Host header carries it: a name, an IPv4 address or a bracketed IPv6 one.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{1,253})(:[0-9]{1,5})?")
_MD5_HEX_LENGTH = 32


class AuthError(Exception):
    """A request failed authentication; the message is what the user reads."""


def _sha256_hex(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _signature(
    key: str, method: str, path: str, ts: int, nonce: str, body: bytes, host: str | None = None
) -> str:
    # surrogatepass: a path decoded leniently by the wire layer must still sign, never crash.
    message = f"{method}\n{path}\n{ts}\n{nonce}\n{_sha256_hex(body)}"
    if host is not None:
        # The bound form: a last line names the receiver, so the signature is worth nothing
        # to another agent that checks `server_names`.
        message += f"\n{host.lower()}"
    return hmac.new(
        key.encode("utf-8", "surrogatepass"),
        message.encode("utf-8", "surrogatepass"),
        hashlib.sha256,
    ).hexdigest()


def sign_request(
    key: str,
    method: str,
    path: str,
    body: bytes,
    *,
    now: float,
    nonce: str | None = None,
    key_id: str | None = None,
    host: str | None = None,
) -> str:
    """Return the ``Authorization`` header value for one request sent at ``now``.

    ``key_id`` names the key (``kid=``); ``host`` (``host[:port]`` as addressed) binds the
    signature to the receiver (``host=``). Without both the header is the original form every
    agent reads."""
    if not key:
        raise ValueError("key must not be empty")
    if nonce is None:
        nonce = secrets.token_hex(16)
    elif not _NONCE.fullmatch(nonce):
        raise ValueError("nonce must be 16 to 64 hex characters")
    if key_id is not None and not KEY_ID.fullmatch(key_id):
        raise ValueError("key id must be 1 to 64 letters, digits, '.', '_' or '-'")
    if host is not None and not _HOST.fullmatch(host):
        raise ValueError(f"cannot sign for host {host!r}")
    ts = int(now)
    sig = _signature(key, method, path, ts, nonce, body, host)
    named = f"kid={key_id}, " if key_id is not None else ""
    bound = f"host={host}, " if host is not None else ""
    return f"{SCHEME} {named}{bound}ts={ts}, nonce={nonce}, sig={sig}"


@dataclass(frozen=True)
class Authorization:
    """The parameters of one ``Authorization`` header."""

    ts: int
    nonce: str
    sig: str
    kid: str | None = None
    host: str | None = None


def parse_authorization(header: object) -> Authorization:
    """The parameters of a header value, or AuthError: ``ts``, ``nonce`` and ``sig`` always,
    ``kid`` and ``host`` when the client named its key or bound the signature."""
    ts, nonce, sig, extra = _parse_fields(header)
    kid, host = extra.get("kid"), extra.get("host")
    if (kid is not None and not KEY_ID.fullmatch(kid)) or (
        host is not None and not _HOST.fullmatch(host)
    ):
        raise AuthError("malformed Authorization header")
    return Authorization(ts, nonce, sig, kid, host)


def _parse_header(header: object) -> tuple[int, str, str]:
    """Split a header value into (ts, nonce, sig), or raise AuthError."""
    ts, nonce, sig, _ = _parse_fields(header)
    return ts, nonce, sig


_OPTIONAL_FIELDS = ("kid", "host")


def _parse_fields(header: object) -> tuple[int, str, str, dict[str, str]]:
    """(ts, nonce, sig) of a header value and its optional fields, or AuthError."""
    if header is None or header == "":
        raise AuthError("missing Authorization header")
    if not isinstance(header, str) or len(header) > MAX_HEADER_LENGTH:
        raise AuthError("malformed Authorization header")
    scheme, _, params = header.strip(" \t").partition(" ")
    # Auth schemes are case-insensitive (RFC 9110 section 11.1).
    if scheme.lower() != SCHEME.lower():
        raise AuthError(f"unsupported authorization scheme, expected {SCHEME}")
    fields: dict[str, str] = {}
    for part in params.split(","):
        name, eq, value = part.strip(" \t").partition("=")
        if not eq or name not in ("ts", "nonce", "sig", *_OPTIONAL_FIELDS) or name in fields:
            raise AuthError("malformed Authorization header")
        fields[name] = value
    extra = {name: fields.pop(name) for name in _OPTIONAL_FIELDS if name in fields}
    if (
        len(fields) != 3
        or not _TS.fullmatch(fields["ts"])
        or not _NONCE.fullmatch(fields["nonce"])
        or not _SIG.fullmatch(fields["sig"])
    ):
        raise AuthError("malformed Authorization header")
    return int(fields["ts"]), fields["nonce"], fields["sig"].lower(), extra


def _split_host_port(text: str) -> tuple[str, int | None]:
    """``name``, ``name:port``, ``[v6]`` or ``[v6]:port`` → (lowercased name, port); a bare
    IPv6 address (a `server_names` entry) is a name."""
    text = text.strip().lower()
    match = _HOST.fullmatch(text)
    if match is None:
        return text, None
    port = match.group(2)
    return match.group(1).strip("[]"), int(port[1:]) if port else None


class ServerNames:
    """The names (and addresses) an agent answers to, ``name`` or ``name:port`` each; a signed
    host matches an entry with its name and, when the entry has one, its port."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = [_split_host_port(entry) for entry in entries if entry.strip()]

    def matches(self, host: str) -> bool:
        name, port = _split_host_port(host)
        return any(name == n and (p is None or p == port) for n, p in self.entries)


class HmacVerifier:
    """Checks signed requests against one shared key and remembers recent nonces.

    One instance per daemon (the factory holds it), so the replay cache covers every connection.
    """

    def __init__(
        self,
        key: str | None,
        *,
        clock: IReactorTime,
        window: float = 60.0,
        max_nonces: int = 100_000,
        keys: Mapping[str, str] | None = None,
        server_names: Iterable[str] | None = None,
    ) -> None:
        if not key and not keys:
            raise ValueError("key must not be empty")
        if window < 0:
            raise ValueError("window must not be negative")
        if max_nonces < 1:
            raise ValueError("max_nonces must be at least 1")
        self._key = key or None
        self._keys = dict(keys or {})
        self.server_names = ServerNames(server_names) if server_names else None
        self._clock = clock
        self.window = window
        self.max_nonces = max_nonces
        # nonce -> time after which the ts check alone refuses it; the heap orders the same
        # entries by that time so pruning only ever looks at the front.
        self._nonces: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    def carry_nonces(self, running: HmacVerifier) -> None:
        """Take over the nonces `running` has seen: a reload must not reopen the replay window."""
        self._nonces, self._expiries = running._nonces, running._expiries

    def verify(self, header: str | None, method: str, path: str, body: bytes) -> str | None:
        """Accept the request (and remember its nonce) or raise AuthError; the answer is the id
        of the key that signed it (None: the unnamed key, ``key_cipher``)."""
        fields = parse_authorization(header)
        ts, nonce, sig = fields.ts, fields.nonce, fields.sig
        now = self._clock.seconds()
        if abs(now - ts) > self.window:
            raise AuthError("request time outside the allowed window")
        # The signature is checked before the replay cache so that someone without the key
        # learns nothing about which nonces were seen.
        expected = _signature(self.key_for(fields.kid), method, path, ts, nonce, body, fields.host)
        if not hmac.compare_digest(expected, sig):
            raise AuthError("bad signature")
        self.check_host(fields.host)
        self._prune(now)
        if nonce in self._nonces:
            raise AuthError("replayed request")
        if len(self._nonces) >= self.max_nonces:
            # Forgetting an unexpired nonce would reopen a replay, so when full we refuse new
            # requests until old nonces expire (at most one window). Only correctly signed
            # requests get here, so filling the cache needs the key.
            raise AuthError("too many requests inside the replay window, try again later")
        expiry = ts + self.window
        self._nonces[nonce] = expiry
        heapq.heappush(self._expiries, (expiry, nonce))
        return fields.kid

    def key_for(self, key_id: str | None) -> str:
        """The secret of the key a request names, or AuthError."""
        key = self._key if key_id is None else self._keys.get(key_id)
        if key is None:
            if key_id is None:
                raise AuthError("this agent takes named keys only: sign with a key id (kid=)")
            raise AuthError(f"unknown key id {key_id}")
        return key

    def check_host(self, host: str | None) -> None:
        """With ``server_names``, a signature must be bound to one of them; else AuthError."""
        if self.server_names is None:
            return
        if host is None:
            raise AuthError("signature not bound to a host (this agent checks server_names)")
        if not self.server_names.matches(host):
            raise AuthError("signed for another host")

    def _prune(self, now: float) -> None:
        # A nonce can go once its ts is outside the window: the ts check then refuses a replay.
        # If the system clock steps backwards after pruning, a pruned nonce could be replayed
        # until the clock catches up; NTP slewing does not do that.
        expiries = self._expiries
        while expiries and expiries[0][0] < now:
            _, nonce = heapq.heappop(expiries)
            del self._nonces[nonce]

    def __len__(self) -> int:
        """How many nonces are remembered right now."""
        return len(self._nonces)


def _md5_hex(key: str) -> str:
    return hashlib.md5(key.encode("utf-8", "surrogatepass")).hexdigest()


def _xor_digits(digits: str) -> str:
    return "".join(chr(ord(d) ^ 1) for d in digits)


def legacy_auth_key(key: str, now: float) -> str:
    """The original's one-time key: md5hex(key) + the Unix time, each digit XOR 1, reversed."""
    t = int(now)
    if t < 0:
        raise ValueError("time must not be negative")
    return _md5_hex(key) + _xor_digits(str(t))[::-1]


def check_legacy_auth_key(key: str, auth_key: str, *, now: float, window: float = 60.0) -> None:
    """Accept an original-style ``auth_key`` made with ``key`` less than ``window`` seconds from
    ``now``, or raise AuthError.

    The old scheme binds nothing but the time: anyone who sees a key can reuse it, for any
    request, inside the window. It is only for fleets that still run the original clients.
    """
    if (
        not isinstance(auth_key, str)
        or not auth_key.isascii()
        or not _MD5_HEX_LENGTH < len(auth_key) <= _MD5_HEX_LENGTH + 20
    ):
        raise AuthError("bad auth_key")
    prefix, suffix = auth_key[:_MD5_HEX_LENGTH], auth_key[_MD5_HEX_LENGTH:]
    if not hmac.compare_digest(_md5_hex(key), prefix) or not _DIGITS.fullmatch(suffix):
        raise AuthError("bad auth_key")
    t = int(_xor_digits(suffix[::-1]))
    if not abs(now - t) < window:
        raise AuthError("auth_key time outside the allowed window")


class SignedRequest(Protocol):
    """What `RequestAuthenticator` reads of a request (`deploy.wire.Request` has it)."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def query(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def body(self) -> bytes: ...


class RequestAuthenticator:
    """How a daemon checks who sent a request: a signed ``Authorization`` header, or the
    original's ``auth_key`` field when ``legacy`` is set. One per daemon, so the replay cache
    covers every connection.

    ``legacy_refusal``, when given, is what an ``auth_key`` gets while ``legacy`` is off;
    otherwise it is answered like a request without credentials.
    """

    def __init__(
        self,
        key: str | None,
        *,
        clock: IReactorTime,
        window: float = 60.0,
        legacy: bool = False,
        legacy_refusal: str | None = None,
        keys: Mapping[str, str] | None = None,
        server_names: Iterable[str] | None = None,
    ) -> None:
        self.key = key
        self.clock = clock
        self.window = window
        self.legacy = legacy
        self.legacy_refusal = legacy_refusal
        self.verifier = HmacVerifier(
            key, clock=clock, window=window, keys=keys, server_names=server_names
        )

    def authenticate(self, request: SignedRequest, fields: Mapping[str, str]) -> str | None:
        """Accept ``request`` (whose form fields are ``fields``) or raise AuthError; the answer
        is the id of the key it was signed with (None: the unnamed key or a legacy auth_key)."""
        header = request.headers.get("authorization")
        auth_key = fields.get("auth_key")
        if header:
            target = request.path + (f"?{request.query}" if request.query else "")
            return self.verifier.verify(header, request.method, target, request.body)
        elif auth_key and self.legacy and self.key:
            check_legacy_auth_key(self.key, auth_key, now=self.clock.seconds(), window=self.window)
            return None
        elif auth_key and self.legacy_refusal:
            raise AuthError(self.legacy_refusal)
        else:
            raise AuthError("missing Authorization header")
