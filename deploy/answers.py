"""Reading one host's answer, bounded, free of any event loop: the head, the body up to a limit
(per order in the proxy) and within a budget shared by every host an order waits for, and the
body decoded — an answer that cannot be decoded safely is that host's `ResponseError`."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

MAX_RESPONSE = 256 * 1024 * 1024
MAX_HEAD = 64 * 1024
MIB = 1024 * 1024

# What a proxy keeps of one agent's answer, by order: a status, rsync or rkill answer is a few
# KiB, an exec answer carries at most 1 MiB of output (base64), an rlist lists every file it
# would change (about 5 MB for 150,000 files). Other orders: MAX_RESPONSE.
PROXY_ANSWER_LIMITS: Mapping[str, int] = {
    "status": 1 * MIB,
    "rsync": 1 * MIB,
    "rkill": 1 * MIB,
    "exec": 4 * MIB,
    "rlist": 16 * MIB,
}
# What a proxy holds of all the answers of all its orders at once: bytes still arriving, and
# the decoded answers kept until their order is answered (their Python size).
PROXY_ANSWERS_TOTAL = 128 * MIB

# Deeper JSON is refused: agents and proxies answer a few levels deep, and decoding or printing
# thousands of levels ends in a RecursionError.
MAX_NESTING = 64


class ResponseError(Exception):
    """An answer that is not one: not HTTP, too large, cut, or not decodable."""


class AnswerBudget:
    """Bytes of answers held at once, shared by all the hosts of all the orders of a proxy."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        """Hold `n` more bytes; False (nothing taken) if that would pass the limit."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give_back(self, n: int) -> None:
        self.held = max(0, self.held - n)


class AnswerAccount:
    """One order's part of an `AnswerBudget`: what its hosts' answers hold, all given back at
    once by `close()` when the order has been answered."""

    def __init__(self, budget: AnswerBudget) -> None:
        self.budget = budget
        self.held = 0

    @property
    def limit(self) -> int:
        return self.budget.limit

    def take(self, n: int) -> bool:
        if not self.budget.take(n):
            return False
        self.held += n
        return True

    def give_back(self, n: int) -> None:
        n = min(n, self.held)
        self.held -= n
        self.budget.give_back(n)

    def close(self) -> None:
        self.give_back(self.held)


def over_budget(account: AnswerAccount) -> ResponseError:
    return ResponseError(f"the answers held at once would pass {account.limit} bytes")


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
    """One answer read as its bytes arrive, bounded: the head by MAX_HEAD, the body by `limit`,
    and everything arriving by `account` when one is given (bytes are taken as they come and
    given back once the answer is whole or dropped). The part both clients share, whatever
    carries the bytes. `feed` and `end` raise ResponseError."""

    def __init__(
        self, limit: int = MAX_RESPONSE, account: AnswerAccount | None = None, order: str = ""
    ) -> None:
        self.buffer = bytearray()
        self.head: tuple[int, str, dict[str, str]] | None = None
        self.length: int | None = None
        self.limit = limit
        self.account = account
        self.order = order
        self.taken = 0

    def feed(self, data: bytes) -> Answer | None:
        """The whole answer once `data` completes it (by Content-Length), else None."""
        if self.account is not None:
            if not self.account.take(len(data)):
                self.release()
                raise over_budget(self.account)
            self.taken += len(data)
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._fail("answer headers too large")
                return None
            self.head = _parse_head(bytes(self.buffer[:end]))
            del self.buffer[: end + 4]
            length = self.head[2].get("content-length")
            if length is not None:
                # isascii: "²" (latin-1 0xB2) passes isdigit() but not int()
                if not (length.isascii() and length.isdigit()):
                    self._fail(f"bad Content-Length in answer: {length[:20]!r}")
                self.length = int(length)
                if self.length > self.limit:
                    self._too_large()
        if len(self.buffer) > self.limit:
            self._too_large()
        if self.length is not None and len(self.buffer) >= self.length:
            return self._answer()
        return None

    def end(self) -> Answer | None:
        """The connection closed: the answer if it is whole (no Content-Length: up to the close),
        None if not a byte of a head came (the caller says why the connection ended)."""
        if self.head is None:
            self.release()
            return None
        if self.length is None or len(self.buffer) >= self.length:
            return self._answer()
        self._fail("connection closed before the whole answer arrived")
        return None  # pragma: no cover - _fail raises

    def release(self) -> None:
        """Drop what was read and give its bytes back (the answer will not be kept)."""
        self.buffer = bytearray()
        if self.account is not None:
            self.account.give_back(self.taken)
        self.taken = 0

    def _too_large(self) -> None:
        what = f"a {self.order} answer" if self.order else "answer"
        self._fail(f"{what} larger than {self.limit} bytes")

    def _fail(self, message: str) -> None:
        self.release()
        raise ResponseError(message)

    def _answer(self) -> Answer:
        assert self.head is not None
        code, reason, headers = self.head
        body = bytes(self.buffer if self.length is None else self.buffer[: self.length])
        self.release()
        return code, reason, headers, body


def decode_content(headers: dict[str, str], body: bytes) -> Any:
    """Agent JSON (and proxy JSON sent as text/plain by the original) parsed; else the text.
    ResponseError when the answer says it is JSON and is not, or is nested too deeply."""
    return decode_measured(headers, body)[0]


def decode_measured(headers: dict[str, str], body: bytes) -> tuple[Any, int]:
    """`decode_content` and about how many bytes of memory the decoded value holds."""
    text = body.decode("utf-8", "replace")
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            value = json.loads(text)
        except RecursionError:
            raise ResponseError(f"JSON nested more than {MAX_NESTING} levels deep") from None
        except ValueError as e:
            if headers.get("content-type", "").startswith("application/json"):
                raise ResponseError(f"undecodable JSON: {e}") from None
        else:
            return value, measure(value)
    return text, sys.getsizeof(text)


def measure(value: Any) -> int:
    """About how many bytes of memory a decoded JSON value holds (shared objects counted each
    time: an over-estimate); ResponseError when it is nested more than MAX_NESTING deep."""
    size = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        size += sys.getsizeof(item)
        if isinstance(item, dict):
            size += sum(sys.getsizeof(key) for key in item)
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_NESTING:
            raise ResponseError(f"JSON nested more than {MAX_NESTING} levels deep")
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            else:
                size += sys.getsizeof(child)
    return size
