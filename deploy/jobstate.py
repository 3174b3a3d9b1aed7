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


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name: [0] state, [2] process group,
    [19] start time in clock ticks since boot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields if len(fields) > 19 else None


def proc_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except ValueError:
        return None


def is_same_process(pid: int | None, start_ticks: int | None) -> bool:
    """True when `pid` runs and is the process that started at `start_ticks` (not a reused pid,
    not a zombie)."""
    if not pid or start_ticks is None:
        return False
    fields = _stat_fields(pid)
    if fields is None or fields[0] == b"Z":
        return False
    try:
        return int(fields[19]) == start_ticks
    except ValueError:
        return False


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


class ProcessTable:
    """The process look-ups and signals a job registry needs, behind one object so tests can
    give it a fake /proc."""

    def same(self, pid: int | None, start_ticks: int | None) -> bool:
        return is_same_process(pid, start_ticks)

    def start_ticks(self, pid: int) -> int | None:
        return proc_start_ticks(pid)

    def group(self, pgid: int) -> list[int]:
        return process_group_pids(pgid)

    def signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def signal_group(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


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
