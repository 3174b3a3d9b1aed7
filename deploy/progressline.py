"""What `deploy-client` shows while a run goes on: the line on a terminal (`ProgressLine`), kept to
the terminal's width, and for `--wait` what it knows of every sync it follows (`SyncBoard`): how
many run, ended well or not, the share of their bytes done, and when a host's NDJSON progress
event is due. Pure Python, no Twisted."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

STARTING = "starting"
RUNNING = "running"
ENDED = "ended"

# Seconds between two NDJSON progress events of one host: CI logs show life, not a flood.
EVENT_EVERY = 2.0

# The outcomes of a sync that ended well (as deploy.output.GOOD, which imports this module).
_GOOD = frozenset({"ok", "warning"})

SyncKey = tuple[str | None, str]  # (the proxy it goes through or None, the agent)


@dataclass(frozen=True)
class SyncEvent:
    """What `--wait` learnt of one sync: starting, running (with the agent's `progress`), or
    ended (with its outcome and the bytes it moved)."""

    host: str  # the agent: the host ordered directly, or one behind `via`
    via: str | None
    state: str
    progress: Mapping[str, Any] | None = None
    outcome: str | None = None
    size: int | None = None

    @property
    def key(self) -> SyncKey:
        return (self.via, self.host)


@dataclass
class _Sync:
    state: str = STARTING
    done: float = 0.0  # bytes
    total: float | None = None  # the whole sync's bytes, as far as its percent tells
    last_event: float | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


class SyncBoard:
    """The syncs `--wait` follows and the hosts that ended, for the summary line
    `3/50 syncing, 45 done, 2 failed, 41% of bytes`."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.syncs: dict[SyncKey, _Sync] = {}
        self.ended: dict[SyncKey, bool] = {}  # key → it ended well (also a sync never started)

    def update(self, event: SyncEvent) -> None:
        sync = self.syncs.setdefault(event.key, _Sync())
        sync.state = event.state
        if event.state == RUNNING and isinstance(event.progress, Mapping):
            done = _number(event.progress.get("bytes"))
            percent = _number(event.progress.get("percent"))
            if done is not None:
                sync.done = done
                if percent:
                    sync.total = max(done, done * 100 / percent)
        elif event.state == ENDED:
            good = event.outcome in _GOOD
            self.ended[event.key] = good
            size = _number(event.size)
            if good and size is not None:
                sync.done = sync.total = size
            elif good and sync.total is not None:
                sync.done = sync.total

    def result(self, via: str | None, host: str, good: bool) -> None:
        """A host's final answer: its sync ended well or not, or it never started one."""
        self.ended[(via, host)] = good
        sync = self.syncs.get((via, host))
        if sync is not None:
            sync.state = ENDED

    def event_due(self, key: SyncKey, now: float) -> bool:
        """True (and remembered) when this sync's last progress event is EVENT_EVERY old."""
        sync = self.syncs.setdefault(key, _Sync())
        if sync.last_event is not None and now - sync.last_event < EVENT_EVERY:
            return False
        sync.last_event = now
        return True

    def parts(self) -> list[str]:
        """The summary, most important first: what runs, what ended, the bytes done."""
        running = sum(1 for k, s in self.syncs.items() if s.state != ENDED and k not in self.ended)
        done = sum(1 for good in self.ended.values() if good)
        failed = len(self.ended) - done
        total = max(self.total, len(set(self.syncs) | set(self.ended)))
        parts = [f"{running}/{total} syncing", f"{done} done", f"{failed} failed"]
        measured = [s for k, s in self.syncs.items() if s.total and self.ended.get(k) is not False]
        whole = sum(s.total or 0 for s in measured)
        if whole > 0:
            moved = sum(min(s.done, s.total or 0) for s in measured)
            parts.append(f"{int(100 * moved / whole)}% of bytes")
        return parts


def answered_parts(done: int, total: int, failed: int) -> list[str]:
    """`12/50 answered`, `1 failed`."""
    return [f"{done}/{total} answered", f"{failed} failed"]


def fit(parts: list[str], width: int) -> str:
    """`parts` joined by `, `, leaving out from the end what does not fit in `width`."""
    text = ""
    for part in parts:
        longer = f"{text}, {part}" if text else part
        if len(longer) > width:
            break
        text = longer
    return text or (parts[0][:width] if parts else "")


class ProgressLine:
    """One line on stderr, rewritten in place, only when stderr is a terminal: `12/50 answered,
    1 failed`, or the summary of the syncs `--wait` follows, kept to the terminal's width. Other
    stderr output goes through `message()` so it does not mix with the line."""

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

    def update(self, text: str | list[str]) -> None:
        """Show `text`, or as many of the parts `text` as fit (the cursor takes a column)."""
        if not self.enabled:
            return
        width = max(20, self.width() - 1)
        if isinstance(text, list):
            text = fit(text, width)
        elif len(text) > width:
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


def progress_event(event: SyncEvent) -> dict[str, Any]:
    """The NDJSON line of a running sync: `{"host", "event": "progress", "percent", "bytes",
    "eta", "elapsed"}` (and `via` through a proxy)."""
    progress = event.progress if isinstance(event.progress, Mapping) else {}
    line: dict[str, Any] = {"host": event.host}
    if event.via is not None:
        line["via"] = event.via
    line["event"] = "progress"
    for key in ("percent", "bytes", "eta", "elapsed"):
        line[key] = progress.get(key)
    return line
