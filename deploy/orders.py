"""The client side's values, free of any event loop: an order, the client's options, one host's
result in the original client's shape, the request bytes, the answer's head, and the output
map. `deploy.client` (Twisted) and `deploy.plainclient` (stdlib) both build on them."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from deploy import auth
from deploy.message import STATUS_TEXT, encode_form

MAX_RESPONSE = 256 * 1024 * 1024
MAX_HEAD = 64 * 1024

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
    legacy_auth: bool = False
    socket_timeout: float = 5.0
    thread_timeout: float = 10.0
    tls: Callable[[str], Any] | None = None  # host -> IOpenSSLClientConnectionCreator
    max_parallel: int = 64


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


class ResponseError(Exception):
    pass


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ResponseError(f"not an HTTP answer: {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


Answer = tuple[int, str, dict[str, str], bytes]  # code, reason, headers, body


class AnswerReader:
    """One answer read as its bytes arrive, bounded (MAX_HEAD, MAX_RESPONSE): the part both
    clients share, whatever carries the bytes. `feed` and `end` raise ResponseError."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.head: tuple[int, str, dict[str, str]] | None = None
        self.length: int | None = None

    def feed(self, data: bytes) -> Answer | None:
        """The whole answer once `data` completes it (by Content-Length), else None."""
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise ResponseError("answer headers too large")
                return None
            self.head = _parse_head(bytes(self.buffer[:end]))
            del self.buffer[: end + 4]
            length = self.head[2].get("content-length")
            if length is not None:
                # isascii: "²" (latin-1 0xB2) passes isdigit() but not int()
                if not (length.isascii() and length.isdigit()):
                    raise ResponseError(f"bad Content-Length in answer: {length[:20]!r}")
                self.length = int(length)
        if len(self.buffer) > MAX_RESPONSE:
            raise ResponseError(f"answer larger than {MAX_RESPONSE} bytes")
        if self.length is not None and len(self.buffer) >= self.length:
            return self._answer()
        return None

    def end(self) -> Answer | None:
        """The connection closed: the answer if it is whole (no Content-Length: up to the close),
        None if not a byte of a head came (the caller says why the connection ended)."""
        if self.head is None:
            return None
        if self.length is None or len(self.buffer) >= self.length:
            return self._answer()
        raise ResponseError("connection closed before the whole answer arrived")

    def _answer(self) -> Answer:
        assert self.head is not None
        code, reason, headers = self.head
        body = bytes(self.buffer if self.length is None else self.buffer[: self.length])
        return code, reason, headers, body


def answered(host_spec: str, order: Order, answer: Answer) -> HostResult:
    """The result of a host that answered."""
    code, reason, headers, body = answer
    return HostResult(
        host_spec,
        order.order,
        1,
        code,
        reason or STATUS_TEXT.get(code, ""),
        decode_content(headers, body),
    )


def unanswered(host_spec: str, order: Order, message: str) -> HostResult:
    """The result of a host that gave no answer, `message` saying why."""
    return HostResult(host_spec, order.order, 0, content=message)


# What both clients say when a host gives no answer: the same words whichever client sent it.


def cant_connect(host: str, port: int) -> str:
    return f"can't connect to {host}:{port}"


def timed_out(options: ClientOptions) -> str:
    return f"Process Timeout({options.thread_timeout:g})!"


def bad_answer(host: str, port: int, error: ResponseError) -> str:
    return f"bad answer from {host}:{port}: {error}"


def hung_up(host: str, port: int) -> str:
    # Every deploy daemon answers, if only with an error: a port that hangs up on a request
    # without a word is most likely a TLS port.
    return (
        f"{host}:{port} closed the connection without an answer "
        "(is it a TLS port? then use --ssl-public-key or --ssl-ca)"
    )


def build_request(order: Order, options: ClientOptions, host: str, now: float) -> bytes:
    """The original client's request bytes, signed (or with the legacy auth_key)."""
    fields = {
        "auth_key": auth.legacy_auth_key(options.key_cipher, now) if options.legacy_auth else "",
        "options": order.options,
        "args": order.args,
        "api_key": order.api_key,
        **order.extra,
    }
    body = encode_form(fields)
    lines = [
        f"POST {order.path} HTTP/1.1",
        f"Host: [{host}]" if ":" in host else f"Host: {host}",  # an IPv6 literal is bracketed
        "Connection: close",
        "Content-Type: application/x-www-form-urlencoded",
        f"Content-Length: {len(body)}",
    ]
    if not options.legacy_auth:
        lines.append(
            "Authorization: "
            + auth.sign_request(options.key_cipher, "POST", order.path, body, now=now)
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


def decode_content(headers: dict[str, str], body: bytes) -> Any:
    """Agent JSON (and proxy JSON sent as text/plain by the original) parsed; else the text."""
    text = body.decode("utf-8", "replace")
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


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
