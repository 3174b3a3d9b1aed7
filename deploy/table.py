"""The table `deploy-client --format table` prints for people: a row per host (per agent through a
proxy) with the order's own figures and message, the last sync in columns of its own when the
order is not that sync, long messages wrapped under their column (whole, on one line, with
`--wide`), then the summary line. Pure Python, no Twisted."""

from __future__ import annotations

import base64
import binascii
import datetime
import math
import textwrap
import time
from typing import Any

from deploy.output import Row, last_rsync, summary_line

# A message longer than MESSAGE_WIDTH wraps onto lines of its own under the MESSAGE column; past
# MESSAGE_LINES lines its middle gives way, so both its start and its end (where a TLS error
# names the key's fingerprint, rsync its exit code) stay.
MESSAGE_WIDTH = 100
MESSAGE_LINES = 3
_ELIDED = " [...] "


def _own(row: Row) -> dict[str, Any]:
    """The answer's figures that belong to this order: for `rsync` followed by `--wait` the sync
    it started (its `lastRsync`), for any other order only what that order answered."""
    content = row.content if isinstance(row.content, dict) else {}
    if row.order == "rsync":
        return {**last_rsync(content), **content}
    return content


def _deletes(row: Row, own: dict[str, Any]) -> Any:
    count = own.get("transferDeleteCount")
    if count is None and isinstance(own.get("transferDeleteFiles"), list):
        count = len(own["transferDeleteFiles"])  # rlist lists them
    return count


def human_bytes(value: Any) -> str:
    """`80000` → `78.1K`; `-` when there is no number."""
    try:
        n = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int of 400 digits
        return "-"
    if not math.isfinite(n):
        return "-"
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"  # pragma: no cover - the loop always returns


def human_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.2f}s" if value < 10 else f"{value:.0f}s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def human_age(seconds: float) -> str:
    """`45s`, `12m`, `5h`, `3d`."""
    seconds = max(0.0, seconds)
    for limit, unit, size in ((90, "s", 1), (90 * 60, "m", 60), (48 * 3600, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds // 86400)}d"


def _timestamp(text: Any) -> float | None:
    """lastRsync's `2024-05-01T12:00:00Z` as a Unix time."""
    try:
        moment = datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def last_cell(row: Row, now: float) -> str:
    """The last sync of a row's target: `ok 5m ago`, `failed 2h ago`; `-` without one."""
    content = row.content if isinstance(row.content, dict) else {}
    last = last_rsync(content)
    if not last:
        return "-"
    text = str(last.get("outcome") or "?")
    ended = _timestamp(last.get("ended"))
    if ended is not None:
        text += f" {human_age(now - ended)} ago"
    return text


def message_of(row: Row) -> str:
    """What a person wants to read about this order's own result, on one line."""
    content = row.content
    own = _own(row)
    text = ""
    if isinstance(content, str):
        text = content
    elif isinstance(content, dict):
        if own.get("message"):
            text = str(own["message"])
        elif row.order == "exec" and isinstance(content.get("content"), str):
            text = _decoded(content["content"])
        elif content.get("alreadyRsync") == "true":
            progress = content.get("progress")
            progress = progress if isinstance(progress, dict) else {}
            text = "running"
            if progress.get("percent") is not None:
                text += f" {progress['percent']}%"
            if progress.get("eta"):
                text += f", eta {progress['eta']}"
        elif row.order == "rsync" and content.get("checksum"):
            text = "synced" if last_rsync(content) else "started"
        if row.order in ("rsync", "status") and own.get("runId") and row.good:
            text += f"{', ' if text else ''}run {own['runId']}"
    if not text and not row.good and row.entry.get("returnString"):
        text = str(row.entry["returnString"])
    return " ".join(text.split())


def message_lines(text: str, width: int = MESSAGE_WIDTH, lines: int = MESSAGE_LINES) -> list[str]:
    """`text` wrapped at `width` in at most about `lines` lines, its middle elided if need be."""
    if len(text) <= width:
        return [text]
    room = width * lines - len(_ELIDED)
    if len(text) > room:
        head = width // 2
        text = text[:head].rstrip() + _ELIDED + text[-(room - head) :].lstrip()
    # A word longer than the width (a fingerprint, a path) stays whole on a line of its own.
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]


def _decoded(b64: str) -> str:
    try:
        return base64.b64decode(b64, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return b64


def release_of(row: Row) -> str:
    """The release an answer names (release mode): the live one of status, releases, activate
    and rollback, the new one of rsync; `ID (LABEL)`, or ""."""
    content = row.entry.get("content")
    release = content.get("release") if isinstance(content, dict) else None
    if isinstance(release, str):
        return release
    if not isinstance(release, dict) or not release.get("id"):
        return ""
    label = release.get("label")
    return f"{release['id']} ({label})" if label else str(release["id"])


def render_table(
    rows: list[Row], stopped: bool = False, *, wide: bool = False, now: float | None = None
) -> str:
    """One row per host (per agent through a proxy), then the summary line."""
    now = time.time() if now is None else now
    with_via = any(r.via is not None for r in rows)
    with_last = any(
        r.order != "rsync" and isinstance(r.content, dict) and last_rsync(r.content) for r in rows
    )
    releases = [release_of(r) for r in rows]  # release mode
    with_release = any(releases)
    head = ["HOST", *(["VIA"] if with_via else []), "ORDER", "OUTCOME"]
    head += ["RELEASE"] * with_release + ["FILES", "BYTES", "DELETES", "EXIT", "TIME"]
    head += [*(["LAST"] if with_last else []), "MESSAGE"]
    lines = [head]
    messages: list[list[str]] = [[]]
    for r, release in zip(rows, releases, strict=True):
        own = _own(r)
        files, deletes, code = own.get("transferFilesCount"), _deletes(r, own), own.get("exitCode")
        cells = [r.host, *([r.via or "-"] if with_via else []), r.order, r.outcome]
        cells += [release or "-"] * with_release
        cells += [
            "-" if files is None else str(files),
            human_bytes(own.get("transferFilesSize")),
            "-" if deletes is None else str(deletes),
            "-" if code is None else str(code),
            # The host's own time: the client's round trip, through a proxy the agent's as the
            # proxy measured it (with --wait: until its sync ended).
            human_seconds(r.seconds),
            *([last_cell(r, now)] if with_last else []),
        ]
        text = message_of(r)
        wrapped = [text] if wide else message_lines(text)
        lines.append([*cells, wrapped[0]])
        messages.append(wrapped[1:])
    numeric = {head.index(h) for h in ("FILES", "BYTES", "DELETES", "EXIT", "TIME")}
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    indent = " " * (sum(widths[:-1]) + 2 * (len(head) - 1))
    out = []
    for line, more in zip(lines, messages, strict=True):
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        out.extend(indent + extra for extra in more)
    out.append(summary_line(rows, stopped))
    return "\n".join(out)
