"""A background sync's state record on disk (atomic JSON writes), the outcomes it can end with, and
rsync's own explanation of an end from its stderr."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

OUTCOME_OK = "ok"
OUTCOME_WARNING = "warning"
OUTCOME_FAILED = "failed"
OUTCOME_KILLED = "killed"
OUTCOME_LOST = "lost"
OUTCOME_REFUSED = "refused"

# The `state` field of a record: the agent writes `starting` before it spawns the supervisor, the
# supervisor `running` once it runs and `ended` with the outcome; the agent writes `ended` itself
# only for a sync whose supervisor died without recording one.
STATE_STARTING = "starting"
STATE_RUNNING = "running"
STATE_ENDED = "ended"

MAX_STATE_BYTES = 1024 * 1024


def write_state(path: str, state: dict[str, Any]) -> None:
    """Write `state` as JSON so a reader sees the old record or the new one, never half of one."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, ensure_ascii=True, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_state(path: str) -> dict[str, Any] | None:
    """The record at `path`, or None when there is none or it is unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_STATE_BYTES:
        return None
    try:
        state = json.loads(data)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


# What rsync writes to stderr to explain itself; anything else there is noise around it.
_EXPLAINING = (
    "rsync:",
    "rsync error:",
    "rsync warning:",
    "@ERROR",
    "file has vanished:",
    "Deletions stopped",
)


def error_message(stderr_text: str, limit: int = 2000) -> str:
    """rsync's own explanation from its stderr: its `rsync:`/`rsync error:`/... lines, else the
    tail."""
    lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
    picked = [line for line in lines if line.startswith(_EXPLAINING)]
    text = "\n".join(picked or lines[-5:])
    return text[-limit:]
