"""What `deploy-client` shows: the outcome of each host's answer (looking through a proxy's answer
to its agents), the exit code those outcomes make, and the three renderings of them — the original
JSON, a table for people, NDJSON for streams — plus the progress line on a terminal.

Pure Python with no Twisted import: the client imports it before it knows it will connect."""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO, TypeGuard

from deploy.orders import SKIPPED

BAD_ANSWER = "bad answer from "  # deploy.orders.bad_answer: garbage, too large, undecodable

# -------------------------------------------------------------------------------- exit codes

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_FAILED = 2
EXIT_UNREACHABLE = 3
EXIT_STOPPED = 4

# The one table of exit codes: `exit_code()` decides them, `--help` prints this.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "every host answered and succeeded (a sync ended ok or warning)",
    EXIT_USAGE: "usage or local error (bad option, config file, result file)",
    EXIT_FAILED: "at least one host answered with a failure (or its sync failed)",
    EXIT_UNREACHABLE: "at least one host was unreachable or timed out (and none failed)",
    EXIT_STOPPED: "a rolling deploy stopped at its failure budget (--max-fail)",
}

FORMATS = ("json", "table", "ndjson")

# Outcomes a row can have. The sync outcomes (`warning`, `killed`, `lost`, `refused`) come from
# the agent's `lastRsync`/`outcome`; `timeout` is also a `--wait` that ran out of time.
GOOD = frozenset({"ok", "warning"})
NO_ANSWER = frozenset({"unreachable", "timeout"})

MESSAGE_WIDTH = 100


@dataclass
class Row:
    """One agent's answer to one order: ordered directly, or through the proxy `via`."""

    host: str
    order: str
    outcome: str
    entry: dict[str, Any]  # the original shape: return, serverStatus, returnCode, ..., content
    via: str | None = None
    seconds: float | None = None  # the client's round trip (for a proxy: the proxy's)

    @property
    def good(self) -> bool:
        return self.outcome in GOOD

    @property
    def content(self) -> Any:
        return self.entry.get("content")

    def to_json(self) -> dict[str, Any]:
        """The NDJSON line of this row: who, what, outcome, then the original answer's keys."""
        line: dict[str, Any] = {"host": self.host}
        if self.via is not None:
            line["via"] = self.via
        line["order"] = self.order
        line["outcome"] = self.outcome
        if self.seconds is not None:
            line["seconds"] = round(self.seconds, 3)
        line.update(self.entry)
        return line


def is_proxy_answer(content: Any) -> TypeGuard[dict[str, dict[str, Any]]]:
    """A proxy's answer, `{agent: {order: {serverStatus, ...}}}`, as opposed to an agent's JSON."""
    if not isinstance(content, dict) or not content or "return" in content:
        return False
    return all(
        isinstance(per_order, dict)
        and per_order
        and all(isinstance(e, dict) and "serverStatus" in e for e in per_order.values())
        for per_order in content.values()
    )


def _false(value: Any) -> bool:
    return value in ("false", False, 0, "0")


def _last_rsync(content: Mapping[str, Any]) -> dict[str, Any]:
    """The agent's `lastRsync` in an answer's content; empty when there is none."""
    last = content.get("lastRsync")
    return last if isinstance(last, dict) else {}


def outcome_of(order: str, entry: Mapping[str, Any]) -> str:
    """The outcome of one original-shape answer (not looking inside a proxy's answer)."""
    if entry.get("skipped"):
        return SKIPPED
    content = entry.get("content")
    if entry.get("serverStatus") == 0:
        if isinstance(content, str) and content.startswith("Process Timeout"):
            return "timeout"
        if isinstance(content, str) and content.startswith(BAD_ANSWER):
            return "failed"  # it answered, with something that is not an answer
        return "unreachable"
    if str(entry.get("returnCode")) != "200":
        return "failed"
    if not isinstance(content, dict):
        return "ok"
    if order == "rsync":
        # A sync that ended at once, or one `--wait` followed: the sync's own outcome.
        outcome = content.get("outcome") or _last_rsync(content).get("outcome")
        if isinstance(outcome, str) and outcome:
            return outcome
    if _false(content.get("return")):
        return "failed"
    return "ok"


def rows_for(
    host: str, order: str, entry: Mapping[str, Any], seconds: float | None = None
) -> list[Row]:
    """The rows of one host's answer: one, or one per agent when the host is a proxy that
    answered for its agents."""
    entry = dict(entry)
    content = entry.get("content")
    if outcome_of(order, entry) == "ok" and is_proxy_answer(content):
        rows = []
        for agent, per_order in content.items():
            for agent_order, agent_entry in per_order.items():
                rows.append(
                    Row(
                        agent,
                        agent_order,
                        outcome_of(agent_order, agent_entry),
                        dict(agent_entry),
                        via=host,
                        seconds=seconds,
                    )
                )
        return rows
    return [Row(host, order, outcome_of(order, entry), entry, seconds=seconds)]


def rows_from_result_map(result: Mapping[str, Any]) -> list[Row]:
    """Rows of a whole `host → order → answer` map (the client's JSON output)."""
    rows: list[Row] = []
    for host, per_order in result.items():
        if not isinstance(per_order, dict):
            raise ValueError(f"{host!r}: expected an object of orders")
        for order, entry in per_order.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{host!r}/{order!r}: expected an answer object")
            rows.extend(rows_for(host, order, entry))
    return rows


def exit_code(rows: Iterable[Row], stopped: bool = False) -> int:
    """Budget stop → 4; else any failure → 2; else any host without an answer → 3; else 0."""
    outcomes = [r.outcome for r in rows]
    if stopped or SKIPPED in outcomes:
        return EXIT_STOPPED
    if any(o not in GOOD and o not in NO_ANSWER for o in outcomes):
        return EXIT_FAILED
    if any(o in NO_ANSWER for o in outcomes):
        return EXIT_UNREACHABLE
    return EXIT_OK


def counts(rows: Iterable[Row]) -> dict[str, int]:
    """Rows per outcome, the good ones first, then the rest by name."""
    found = Counter(r.outcome for r in rows)
    order = ["ok", "warning", *sorted(k for k in found if k not in GOOD)]
    return {k: found[k] for k in order if found[k]}


def summary_line(rows: list[Row], stopped: bool = False) -> str:
    """`5 hosts: 3 ok, 1 failed, 1 unreachable`."""
    n = len(rows)
    parts = ", ".join(f"{v} {k}" for k, v in counts(rows).items())
    text = f"{n} host{'s' if n != 1 else ''}" + (f": {parts}" if parts else "")
    if stopped:
        text += " (rollout stopped at its failure budget)"
    return text


def summary_json(rows: list[Row], stopped: bool, code: int) -> dict[str, Any]:
    """The last NDJSON line."""
    return {
        "summary": {
            "total": len(rows),
            "outcomes": counts(rows),
            "stopped": stopped,
            "exitCode": code,
        }
    }


# -------------------------------------------------------------------------------- renderings


def render_json(result_map: Mapping[str, Any]) -> str:
    """The original client's output, unchanged."""
    return json.dumps(result_map, indent=3, ensure_ascii=False)


def ndjson_line(data: Mapping[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _figures(row: Row) -> dict[str, Any]:
    content = row.content if isinstance(row.content, dict) else {}
    last = _last_rsync(content)
    files = content.get("transferFilesCount", last.get("transferFilesCount"))
    size = content.get("transferFilesSize", last.get("transferFilesSize"))
    code = content.get("exitCode", last.get("exitCode"))
    # The time the client spent on the host (with --wait: until its sync ended), which is finer
    # than lastRsync's whole-second timestamps.
    return {"files": files, "bytes": size, "exit": code, "seconds": row.seconds}


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


def message_of(row: Row) -> str:
    """What a person wants to read about this row, on one line."""
    content = row.content
    text = ""
    if isinstance(content, str):
        text = content
    elif isinstance(content, dict):
        last = _last_rsync(content)
        if content.get("message"):
            text = str(content["message"])
        elif last.get("message"):
            text = str(last["message"])
        elif row.order == "exec" and isinstance(content.get("content"), str):
            text = _decoded(content["content"])
        elif content.get("alreadyRsync") == "true":
            progress = content.get("progress")
            percent = progress.get("percent") if isinstance(progress, dict) else None
            text = "running" + (f" {percent}%" if percent is not None else "")
        elif row.order == "rsync" and content.get("checksum"):
            done = "synced" if last else "started"
            text = f"{done}, job {str(content['checksum'])[:12]}"
    if not text and not row.good and row.entry.get("returnString"):
        text = str(row.entry["returnString"])
    text = " ".join(text.split())
    if len(text) > MESSAGE_WIDTH:
        text = text[: MESSAGE_WIDTH - 3] + "..."
    return text


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


def render_table(rows: list[Row], stopped: bool = False) -> str:
    """One row per host (per agent through a proxy), then the summary line."""
    with_via = any(r.via is not None for r in rows)
    releases = [release_of(r) for r in rows]  # release mode
    with_release = any(releases)
    head = ["HOST", *(["VIA"] if with_via else []), "ORDER", "OUTCOME"]
    head += ["RELEASE"] * with_release + ["FILES", "BYTES", "EXIT", "TIME", "MESSAGE"]
    lines = [head]
    for r, release in zip(rows, releases, strict=True):
        f = _figures(r)
        cells = [r.host, *([r.via or "-"] if with_via else []), r.order, r.outcome]
        cells += [release or "-"] * with_release
        cells += [
            "-" if f["files"] is None else str(f["files"]),
            human_bytes(f["bytes"]),
            "-" if f["exit"] is None else str(f["exit"]),
            human_seconds(f["seconds"]),
            message_of(r),
        ]
        lines.append(cells)
    numeric = {head.index(h) for h in ("FILES", "BYTES", "EXIT", "TIME")}
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for line in lines:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
    out.append(summary_line(rows, stopped))
    return "\n".join(out)


# -------------------------------------------------------------------------------- progress


class ProgressLine:
    """One line on stderr, rewritten in place, only when stderr is a terminal: `12/50 answered,
    1 failed`, or the syncs `--wait` follows. Other stderr output goes through `message()` so it
    does not mix with the line."""

    def __init__(self, stream: TextIO, enabled: bool | None = None) -> None:
        self.stream = stream
        if enabled is None:
            try:
                enabled = stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self.shown = False

    def width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        # A terminal that does not know its size (a bare pty) says 0.
        return columns or shutil.get_terminal_size().columns or 80

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        width = max(20, self.width() - 1)
        if len(text) > width:
            text = text[: width - 3] + "..."
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def message(self, text: str) -> None:
        """A whole line on stderr (e.g. --verbose), above the progress line."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()


def answered_text(done: int, total: int, failed: int) -> str:
    """`12/50 answered, 1 failed`."""
    return f"{done}/{total} answered, {failed} failed"


def sync_progress_text(progress: Any) -> str:
    """`42% 1.20MB/s eta 0:00:03` from an agent's `progress`, or `running`."""
    if not progress or not isinstance(progress, Mapping):
        return "running"
    parts = []
    if progress.get("percent") is not None:
        parts.append(f"{progress['percent']}%")
    if progress.get("rate"):
        parts.append(str(progress["rate"]))
    if progress.get("eta"):
        parts.append(f"eta {progress['eta']}")
    return " ".join(parts) or "running"
