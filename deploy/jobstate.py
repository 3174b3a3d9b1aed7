"""A background sync's state record and log on disk — atomic JSON writes, and reads that never
follow a link, wait on a FIFO or take a file the agent did not make — the outcomes a sync can end
with, and rsync's own explanation of an end from its stderr."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Collection
from typing import Any

OUTCOME_OK = "ok"
OUTCOME_WARNING = "warning"
OUTCOME_FAILED = "failed"
OUTCOME_KILLED = "killed"
OUTCOME_LOST = "lost"
OUTCOME_REFUSED = "refused"
# the outcomes of a sync that did its work (a warning: some files vanished at the source, ...)
GOOD_OUTCOMES = (OUTCOME_OK, OUTCOME_WARNING)

# The `state` field of a record: the agent writes `starting` before it spawns the supervisor, the
# supervisor `running` once it runs and `ended` with the outcome; the agent writes `ended` itself
# only for a sync whose supervisor died without recording one.
STATE_STARTING = "starting"
STATE_RUNNING = "running"
STATE_ENDED = "ended"

MAX_STATE_BYTES = 256 * 1024
# Errors that say the file system holding the records is full, not that it is unusable.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UntrustedFile(OSError):
    """A file where a record or a job log belongs that the agent will not read: a link, not a
    regular file, another user's, or too big. The message says which and why."""


def open_owned(
    path: str, owners: Collection[int] | None = None, max_bytes: int | None = None
) -> int:
    """A read-only descriptor of the regular file `path`, owned by one of `owners` (default: root
    and us) and linked once. Never follows a symbolic link, never waits on a FIFO; raises
    UntrustedFile for anything else, OSError when there is no file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UntrustedFile(f"{path} is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        trusted = owners if owners is not None else (0, os.geteuid())
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFile(f"{path} is not a regular file")
        if info.st_uid not in trusted:
            raise UntrustedFile(f"{path} belongs to uid {info.st_uid}, not to the agent")
        if info.st_nlink != 1:
            raise UntrustedFile(f"{path} has {info.st_nlink} hard links")
        if max_bytes is not None and info.st_size > max_bytes:
            raise UntrustedFile(f"{path} is too big for a record ({info.st_size} bytes)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private(path: str) -> int:
    """A new, empty file at `path` for writing, mode 0600: whatever was there (a link to another
    file, a FIFO) is removed first, never written through."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o600)


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


def read_state(
    path: str,
    owners: Collection[int] | None = None,
    *,
    refused: Callable[[UntrustedFile], None] | None = None,
) -> dict[str, Any] | None:
    """The record at `path`, or None when there is none, it is unreadable, or it is not a file
    the agent trusts (see open_owned; `refused` is told why)."""
    try:
        fd = open_owned(path, owners, MAX_STATE_BYTES)
    except UntrustedFile as e:
        if refused is not None:
            refused(e)
        return None
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
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


def last_line(path: str, owners: Collection[int] | None = None, limit: int = 4096) -> str:
    """The last non-empty line of a job's log file, or "" (also when it is not a file the agent
    trusts)."""
    try:
        fd = open_owned(path, owners)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        try:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            tail = f.read(limit)
        except OSError:
            return ""
    lines = [line.strip() for line in tail.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:500] if lines else ""


def is_disk_full(error: OSError) -> bool:
    return error.errno in DISK_FULL


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


EXIT_VANISHED = 24


def outcome_of(exit_code: int | None, sig: int | None, stderr_text: str) -> tuple[str, str]:
    """The outcome and message of an rsync that ended by itself (not by rkill)."""
    if exit_code == 0:
        return OUTCOME_OK, ""
    if exit_code == EXIT_VANISHED:
        return OUTCOME_WARNING, error_message(stderr_text) or "some source files vanished"
    if sig is not None:
        return OUTCOME_FAILED, error_message(stderr_text) or f"rsync killed by signal {sig}"
    return OUTCOME_FAILED, error_message(stderr_text) or f"rsync exited with code {exit_code}"


def iso_time(t: Any) -> str | None:
    """A record's Unix time as the answers show it (`2023-11-14T22:13:20Z`), None when unset."""
    if not isinstance(t, int | float):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
