"""The client side's values, free of any event loop: an order, the client's options, one host's
result in the original client's shape, the request bytes, the answer's head, and the output
map. `deploy.client` (Twisted) and `deploy.plainclient` (stdlib) both build on them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deploy import auth
from deploy.answers import (  # noqa: F401  (re-exported: what both clients read answers with)
    MAX_HEAD,
    MAX_RESPONSE,
    Answer,
    AnswerReader,
    ResponseError,
    decode_content,
    decode_measured,
)
from deploy.message import STATUS_TEXT, encode_form

SKIPPED = "skipped"


@dataclass
class Order:
    """What to ask: `order` with `options`, and for a proxy `args`/`api_key` (+ rolling fields)."""

    order: str
    options: str = ""
    args: str = ""
    api_key: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    target: str = "agent"

    @property
    def path(self) -> str:
        return f"/{self.target}/{self.order}"


@dataclass
class ClientOptions:
    port: int = 3440
    key_cipher: str = auth.DEFAULT_KEY_CIPHER
    key_id: str | None = None  # sign with this named key (kid=); implies bind_host
    bind_host: bool = False  # bind the signature to the host:port addressed (host=)
    legacy_auth: bool = False
    socket_timeout: float = 5.0
    thread_timeout: float = 10.0
    tls: Callable[[str], Any] | None = None  # host -> IOpenSSLClientConnectionCreator
    max_parallel: int = 64
    # order -> most bytes of one host's answer kept (the proxy's PROXY_ANSWER_LIMITS); an order
    # not named, or None: MAX_RESPONSE
    answer_limits: Mapping[str, int] | None = None

    def answer_limit(self, order: str) -> int:
        return (self.answer_limits or {}).get(order, MAX_RESPONSE)


@dataclass
class HostResult:
    """One host's answer in the original client's shape."""

    host: str
    order: str
    server_status: int  # 1: the host answered; 0: it did not
    code: int | None = None
    reason: str = ""
    content: Any = ""
    skipped: bool = False
    size: int = field(default=0, compare=False, repr=False)  # about the bytes `content` holds

    @property
    def http_ok(self) -> bool:
        return self.server_status == 1 and self.code == 200

    @property
    def succeeded(self) -> bool:
        """Answered 200 and, when the answer is agent JSON, with `return` true."""
        if not self.http_ok:
            return False
        if isinstance(self.content, dict) and "return" in self.content:
            return self.content["return"] in ("true", True, 1)
        return True

    @property
    def unreachable(self) -> bool:
        return self.server_status == 0 and not self.skipped

    def to_json(self, *, numeric_code: bool = False) -> dict[str, Any]:
        """The original's shape. `returnCode` is a string ("200") in the client's output and a
        number (200) in a proxy's answer, as the original has them; a host that did not answer
        has null for both `returnCode` and `returnString`, at either level."""
        code: Any = self.code
        if code is not None and not numeric_code:
            code = str(code)
        body = {
            "return": 1 if self.http_ok else 0,
            "serverStatus": self.server_status,
            "returnCode": code,
            "returnString": self.reason if self.code is not None else None,
            "content": self.content,
        }
        if self.skipped:
            body["skipped"] = True
        return body


def answered(host_spec: str, order: Order, answer: Answer) -> HostResult:
    """The result of a host that answered; ResponseError when its body cannot be decoded."""
    code, reason, headers, body = answer
    content, size = decode_measured(headers, body)
    return HostResult(
        host_spec,
        order.order,
        1,
        code,
        reason or STATUS_TEXT.get(code, ""),
        content,
        size=size,
    )


def result_of(host_spec: str, order: Order, answer: Answer, host: str, port: int) -> HostResult:
    """What both clients make of a whole answer: `answered`, or that host's `bad answer`."""
    try:
        return answered(host_spec, order, answer)
    except ResponseError as e:
        return unanswered(host_spec, order, bad_answer(host, port, e))


def unanswered(host_spec: str, order: Order, message: str) -> HostResult:
    """The result of a host that gave no answer, `message` saying why."""
    return HostResult(host_spec, order.order, 0, content=message)


def send_failed(host_spec: str, order: Order, error: BaseException | None) -> HostResult:
    """The result of a host whose exchange failed in the client itself (a bug, not the host)."""
    message = (str(error) or type(error).__name__) if error is not None else "unknown error"
    return HostResult(host_spec, order.order, 0, content=f"{host_spec}: {message}")


# What both clients say when a host gives no answer: the same words whichever client sent it.


def cant_connect(host: str, port: int) -> str:
    return f"can't connect to {host}:{port}"


def process_timeout(seconds: float) -> str:
    """The original's words for a host that did not answer within `seconds`."""
    return f"Process Timeout({seconds:g})!"


def timed_out(options: ClientOptions) -> str:
    return process_timeout(options.thread_timeout)


def not_ordered(deadline: float) -> str:
    """A host still waiting for a free slot (max_parallel) or its batch when the order's
    deadline passed: never ordered, so nothing ran there."""
    return f"{process_timeout(deadline)} (not ordered before the deadline)"


def bad_answer(host: str, port: int, error: ResponseError) -> str:
    return f"bad answer from {host}:{port}: {error}"


def hung_up(host: str, port: int) -> str:
    # Every deploy daemon answers, if only with an error: a port that hangs up on a request
    # without a word is most likely a TLS port.
    return (
        f"{host}:{port} closed the connection without an answer "
        "(is it a TLS port? then use --ssl-public-key or --ssl-ca)"
    )


def build_request(
    order: Order, options: ClientOptions, host: str, now: float, port: int | None = None
) -> bytes:
    """The original client's request bytes, signed (or with the legacy auth_key); with a key
    id or `bind_host`, signed in the named/bound form for `host:port`."""
    fields = {
        "auth_key": auth.legacy_auth_key(options.key_cipher, now) if options.legacy_auth else "",
        "options": order.options,
        "args": order.args,
        "api_key": order.api_key,
        **order.extra,
    }
    body = encode_form(fields)
    addressed = f"[{host}]" if ":" in host else host  # an IPv6 literal is bracketed
    bound = options.bind_host or options.key_id is not None
    if bound:
        addressed += f":{port or options.port}"
    lines = [
        f"POST {order.path} HTTP/1.1",
        f"Host: {addressed}",
        "Connection: close",
        "Content-Type: application/x-www-form-urlencoded",
        f"Content-Length: {len(body)}",
    ]
    if not options.legacy_auth:
        lines.append(
            "Authorization: "
            + auth.sign_request(
                options.key_cipher,
                "POST",
                order.path,
                body,
                now=now,
                key_id=options.key_id,
                host=addressed if bound else None,
            )
        )
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def split_host(spec: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif spec.count(":") == 1:
        host, _, port = spec.partition(":")
    else:
        host, port = spec, ""
    if port and not port.isdigit():
        raise ValueError(f"bad port in host {spec!r}")
    return host, int(port) if port else default_port


# A host ordered late in a large fan-out is given at least this long, even if then not every
# host can be ordered before the deadline.
MIN_HOST_SECONDS = 1.0


def rounds_to_order(position: int, total: int, batch_size: int, limit: int, in_flight: int) -> int:
    """Rounds of `limit` hosts at once (0: no limit) still needed for the `in_flight` hosts and
    those from `position` on, each batch starting once the one before has answered."""
    limit = limit if limit > 0 else max(1, total)
    batch_end = min(total, (position // batch_size + 1) * batch_size)
    later = total - batch_end
    full, rest = divmod(later, batch_size)
    return (
        math.ceil((in_flight + batch_end - position) / limit)
        + full * math.ceil(batch_size / limit)
        + math.ceil(rest / limit)
    )


def host_share(remaining: float, rounds: int, thread_timeout: float) -> float | None:
    """How long a host being ordered now may take, so that the hosts after it are ordered
    before the deadline too: the time left split over the rounds still needed (at least
    MIN_HOST_SECONDS, at most the time left). None when thread_timeout is the shorter."""
    share = min(remaining, max(MIN_HOST_SECONDS, remaining / max(1, rounds)))
    if thread_timeout and share >= thread_timeout:
        return None
    return max(0.0, share)


def parse_budget(
    value: str | int | None, total: int, name: str, *, round_up: bool = True
) -> int | None:
    """`N` or `N%` of `total`; None when unset.

    A batch size rounds a percentage up (at least 1 host when the percentage is above 0); a
    failure budget rounds it down, so that "more than 10% failed" means exactly that: with 5
    hosts, one failure (20%) is already more than 10%."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            # rounded first so that float noise (1.1% of 110 = 1.2100000000000002) cannot
            # move a result across a whole number
            share = round(total * pct / 100, 9)
            if round_up:
                return max(1, math.ceil(share)) if pct else 0
            return math.floor(share)
        n = int(text)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        raise ValueError(f"{name}: expected N or N%, got {text!r}") from None


@dataclass
class FanOutResult:
    results: dict[str, HostResult]
    stopped: bool = False  # the failure budget stopped the rollout

    @property
    def failed(self) -> list[HostResult]:
        return [r for r in self.results.values() if not r.skipped and not r.succeeded]

    @property
    def skipped(self) -> list[HostResult]:
        return [r for r in self.results.values() if r.skipped]


def result_map(results: Iterable[HostResult], *, numeric_code: bool = False) -> dict[str, Any]:
    """host → order → answer, the original client's output shape."""
    return {r.host: {r.order: r.to_json(numeric_code=numeric_code)} for r in results}
