"""A background sync's state record on disk (atomic JSON writes), the outcomes it can end with, and
the /proc look-ups that tell whether a recorded process is still the one we started."""

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


def proc_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    rest = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def is_same_process(pid: int | None, start_ticks: int | None) -> bool:
    """True when `pid` runs and is the process that started at `start_ticks` (not a reused pid)."""
    if not pid or start_ticks is None:
        return False
    ticks = proc_start_ticks(pid)
    if ticks is None or ticks != start_ticks:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def process_group_pids(pgid: int) -> list[int]:
    """Every live pid in process group `pgid`, the leader first."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields[0] is the state, fields[2] the process group
        if len(fields) > 2 and fields[0] != b"Z" and fields[2] == str(pgid).encode():
            pids.append(int(entry))
    pids.sort(key=lambda p: (p != pgid, p))
    return pids


def error_message(stderr_text: str, limit: int = 2000) -> str:
    """rsync's own explanation from its stderr: the `rsync:`/`rsync error:` lines, else the tail."""
    lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
    picked = [line for line in lines if line.startswith(("rsync:", "rsync error:", "@ERROR"))]
    text = "\n".join(picked or lines[-5:])
    return text[-limit:]
