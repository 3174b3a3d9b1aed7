"""The values one HTTP exchange is made of: `Request` and `Response`, and the JSON and form
encodings of their bodies. No event loop here; `deploy.wire` reads and writes them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

from deploy.errors import RequestError
from deploy.logrecord import redact_target
from deploy.message import STATUS_TEXT

JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"

MAX_FIELDS = 64


@dataclass
class Request:
    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    peer: str = ""

    def __repr__(self) -> str:
        # Secrets stay out of any log or traceback that shows a request: no headers (the
        # signature), no body (api_key, auth_key), the target redacted.
        target = self.path + (f"?{self.query}" if self.query else "")
        return (
            f"Request({self.method} {redact_target(target)!r}, {len(self.body)} body bytes,"
            f" peer={self.peer!r})"
        )

    @property
    def segments(self) -> list[str]:
        """The path split at `/`, without the empty leading segment, each percent-decoded."""
        return [unquote_to_bytes(s).decode("utf-8", "replace") for s in self.path.split("/")[1:]]

    def form(self) -> dict[str, str]:
        """The request's fields: the query string, then the form body (which wins)."""
        fields = decode_form(self.query.encode("latin-1", "replace")) if self.query else {}
        if self.body:
            fields.update(decode_form(self.body))
        return fields


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT_TYPE

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, encode_json(obj), JSON_TYPE)

    @classmethod
    def text(cls, status: int, message: str = "") -> Response:
        return cls(status, message.encode("utf-8"), TEXT_TYPE)

    def to_bytes(self) -> bytes:
        reason = STATUS_TEXT.get(self.status, "Unknown")
        head = (
            f"HTTP/1.1 {self.status} {reason}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("ascii") + self.body


def encode_json(obj: Any) -> bytes:
    """JSON laid out as the original agent wrote it: one key per line, no indentation."""
    return json.dumps(obj, indent=0, ensure_ascii=False).encode("utf-8", "surrogateescape")


def decode_form(data: bytes) -> dict[str, str]:
    """Decode `a=1&b=x+y%2C` (`+` is a space, `%XX` a byte) into text fields.

    Bytes that are not UTF-8 are refused: every field feeds a command line or a path."""
    fields: dict[str, str] = {}
    if not data:
        return fields
    pairs = data.split(b"&")
    if len(pairs) > MAX_FIELDS:
        raise RequestError(400, f"too many fields (more than {MAX_FIELDS})")
    for pair in pairs:
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        try:
            k = unquote_to_bytes(key.replace(b"+", b" ")).decode("utf-8")
            v = unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "request fields must be UTF-8") from None
        fields[k] = v
    return fields
