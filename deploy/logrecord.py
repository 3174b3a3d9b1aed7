"""What a request leaves in the daemons' logs: its access line and audit record, with every
request-derived string escaped so it cannot forge, break or hide a log line, and with secrets (API
keys, the legacy auth_key) redacted wherever a request could carry them."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus

ACCESS_FORMAT = '{remote_addr} {remote_host} [{when}] "{request}" {status} {size}{note}'
ACCESS_TIME = "%Y/%m/%d %H:%M:%S"
# Longest text value an audit record keeps.
MAX_AUDIT_TEXT = 4096
# What an access line and an audit record add when the client hung up before its answer.
CLIENT_GONE_NOTE = "client went away"

# Request fields that hold a secret, in a query string or a form body.
SECRET_FIELDS = ("api_key", "auth_key")
REDACTED = "<redacted>"
# `/api/<order>/<options>/<args>/<api_key>`: the proxy's path form carries the key as its fifth
# segment; anything after it is redacted too (a key typed with a `/` in it).
_API_KEY_SEGMENT = 5

# Characters that could forge or hide a line, or reorder what a reader sees: C0 controls and DEL,
# C1 controls, the line and paragraph separators, and the bidi marks, embeddings, overrides and
# isolates (U+061C, U+200E/F, U+202A-E, U+2066-9).
_UNSAFE_ABOVE_ASCII = "\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f{_UNSAFE_ABOVE_ASCII}]")
_UNSAFE_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f{_UNSAFE_ABOVE_ASCII}]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def log_safe(text: str) -> str:
    """`text` with every character that could forge or hide a log line written as an escape
    (`\\x0a`, `\\u202e`); everything else, other scripts included, as it is."""
    return _UNSAFE.sub(_escape_char, text)


def log_safe_lines(text: str) -> str:
    """As `log_safe`, but newlines stay: for a traceback, whose lines the caller indents."""
    return _UNSAFE_BUT_NEWLINE.sub(_escape_char, text)


def json_line(obj: Any) -> str:
    """`obj` as one line of JSON, non-ASCII text readable, but the characters `log_safe` escapes
    written as `\\uXXXX` escapes (JSON itself leaves C1 controls, bidi overrides and U+2028/9 as
    they are)."""
    text = json.dumps(obj, ensure_ascii=False)
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def escape_access(text: str) -> str:
    """Printable ASCII as is; `"` and `\\` backslashed; anything else as an escape, so a
    request line cannot forge or break an access line."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif " " <= c <= "~":
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


# --------------------------------------------------------------------------- redaction


def redact_form(text: str) -> str:
    """A query string or form body with the value of every secret field replaced."""
    if "=" not in text:
        return text
    pairs = []
    for pair in text.split("&"):
        name, eq, _ = pair.partition("=")
        # The name as decode_form reads it: `api%5Fkey` is `api_key` too.
        if eq and unquote_plus(name, errors="replace") in SECRET_FIELDS:
            pair = f"{name}={REDACTED}"
        pairs.append(pair)
    return "&".join(pairs)


def redact_path(path: str) -> str:
    """A request path with the proxy's path-form API key (`/api/<order>/<options>/<args>/KEY`)
    replaced."""
    segments = path.split("/")
    # segments[0] is the empty string before the leading `/`.
    if len(segments) > _API_KEY_SEGMENT and segments[1] == "api":
        return "/".join(segments[:_API_KEY_SEGMENT] + [REDACTED])
    return path


def redact_target(target: str) -> str:
    """A request target (path and query string) with its secrets replaced."""
    path, sep, query = target.partition("?")
    return redact_path(path) + sep + redact_form(query)


def api_key_id(api_key: str | None) -> str | None:
    """What the audit log says of an API key: the first 12 hex digits of its sha256, never the
    key (`printf %s KEY | sha256sum | cut -c1-12` gives the same)."""
    if not api_key:
        return None
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


# --------------------------------------------------------------------------- the records


def access_fields(proto: Any, response: Any, now: float) -> dict[str, Any]:
    """The fields of one access line. REMOTE_HOST is the peer address: a reverse lookup would
    block the event loop (or delay the line), and the original logged the address too when no
    name was known. A client that hung up before its answer gets a note after the size."""
    peer = escape_access(getattr(proto, "peer", "") or "-")
    remote_host = getattr(proto, "remote_host", None)
    return {
        "remote_addr": peer,
        "remote_host": escape_access(remote_host) if remote_host else peer,
        "when": time.strftime(ACCESS_TIME, time.localtime(now)),
        "request": escape_access(redact_request_line(getattr(proto, "request_line", "") or "-")),
        "status": response.status,
        "size": len(response.body),
        "note": f' "{CLIENT_GONE_NOTE}"' if getattr(proto, "client_gone", False) else "",
    }


def redact_request_line(line: str) -> str:
    """`METHOD TARGET VERSION` with the target's secrets replaced."""
    method, sep, rest = line.partition(" ")
    if not sep:
        return line
    target, sep, version = rest.rpartition(" ")
    if not sep:
        return f"{method} {redact_target(rest)}"
    return f"{method} {redact_target(target)} {version}"


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_AUDIT_TEXT:
        return value[:MAX_AUDIT_TEXT] + "..."
    return value


def audit_record(proto: Any, response: Any, daemon: str, now: float) -> dict[str, Any]:
    """One audit line: who (peer, API key id), what (order, options, args), the answer's
    status and size, how long from connect to answer, and whether the client was still there
    to get it."""
    request = getattr(proto, "request", None)
    opened = getattr(proto, "opened_at", None)
    record: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(
            timespec="milliseconds"
        ),
        "daemon": daemon,
        "peer": getattr(proto, "peer", ""),
        "method": request.method if request is not None else None,
        "path": redact_path(request.path) if request is not None else None,
    }
    for key, value in (getattr(proto, "audit", None) or {}).items():
        record[key] = _clip(value)
    record["status"] = response.status
    record["bytes"] = len(response.body)
    record["duration"] = round(time.monotonic() - opened, 3) if opened is not None else None
    if getattr(proto, "client_gone", False):
        record["clientGone"] = True
    return record


def proxy_audit(request: Any, granted_hosts: Callable[[str, str], list[str]]) -> dict[str, Any]:
    """What the proxy puts in a request's audit record: the order and its target, the API key's
    id and how many hosts the key grants for it (0 when it grants none)."""
    try:
        hosts = len(granted_hosts(request.api_key, request.args))
    except Exception:
        hosts = 0
    return {
        "order": request.order,
        "options": request.options,
        "args": request.args,
        "apiKeyId": api_key_id(request.api_key),
        "hosts": hosts,
    }
