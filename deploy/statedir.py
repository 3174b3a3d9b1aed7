"""Which directories the agent keeps its sync records in: a state or queue directory that no other
local user can write, up to `/` (as sshd's StrictModes judges a home), or — in a shared sticky
directory such as /tmp — a private subdirectory the agent makes for itself; and the probe that a
record can be written there, and the temp records a killed writer left."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass

from deploy.jobstate import is_disk_full, write_state

PRIVATE_PREFIX = "deploy-agent-"
# A temp file of write_state this old was left by a process killed mid-write.
STALE_TEMP = 3600.0


class UnsafeStateDir(OSError):
    """A state or queue directory the agent will not keep records in; the message is the one
    start-up line that says why and what to change."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class StateDir:
    """A configured state/queue directory and the one the agent keeps its records in."""

    configured: str
    path: str
    full: bool = False  # the probe found the file system full

    @property
    def private(self) -> bool:
        return self.path != self.configured


def secure_state_dir(
    directory: str, *, owners: Collection[int], uid: int, gid: int | None = None
) -> StateDir:
    """Create `directory` if needed and judge it. Refused (UnsafeStateDir) when it, or a directory
    above it, belongs to a user outside `owners` or is writable by group or others without the
    sticky bit: another local user could plant records or swap the directory. A sticky shared
    one (like /tmp) gets a private `deploy-agent-UID` inside it, made mode 0700 for `uid`."""
    configured = os.path.abspath(directory)
    try:
        os.makedirs(configured, 0o750, exist_ok=True)
        real = os.path.realpath(configured)
        info = os.stat(real)
    except OSError as e:
        raise OSError(e.errno, f"{directory} is not a writable directory: {e.strerror or e}") from e
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeStateDir(f"{directory} is not a directory")
    _check_ancestors(directory, real, owners)
    _check_owner(directory, real, info, owners)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if not info.st_mode & stat.S_ISVTX:
            raise UnsafeStateDir(
                f"{directory} is writable by group or others (mode {_mode(info)}), so any "
                "local user could plant sync records there: "
                f"chmod go-w {real} (or chmod +t {real} to share it, and the agent keeps "
                f"its records in {os.path.join(real, PRIVATE_PREFIX + str(uid))})"
            )
        return StateDir(configured, _private_subdir(directory, real, uid, gid))
    return StateDir(configured, configured)


def probe(state_dir: StateDir) -> StateDir:
    """Prove a record can be written in `state_dir`: raises OSError naming it when not, except
    when its file system is full (answered with `full` set: the agent still starts)."""
    path = os.path.join(state_dir.path, ".probe.json")
    try:
        write_state(path, {"probe": True})
        os.unlink(path)
    except OSError as e:
        if is_disk_full(e):
            return StateDir(state_dir.configured, state_dir.path, full=True)
        raise OSError(
            e.errno, f"{state_dir.path} is not a writable directory: {e.strerror or e}"
        ) from e
    return state_dir


def remove_stale_temp(path: str) -> None:
    """Remove the temp record `path` once it is STALE_TEMP old (a link itself, never its target)."""
    try:
        if time.time() - os.lstat(path).st_mtime > STALE_TEMP:
            os.unlink(path)
    except OSError:
        pass


def _check_ancestors(directory: str, real: str, owners: Collection[int]) -> None:
    parent = os.path.dirname(real)
    while True:
        info = os.stat(parent)
        _check_owner(directory, parent, info, owners)
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise UnsafeStateDir(
                f"{directory} is inside {parent}, which is writable by group or others "
                f"(mode {_mode(info)}), so any local user could swap it: "
                f"chmod go-w {parent}, or choose a state directory elsewhere"
            )
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def _check_owner(directory: str, path: str, info: os.stat_result, owners: Collection[int]) -> None:
    if info.st_uid not in owners:
        where = "" if os.path.realpath(directory) == path else f" (above {directory})"
        raise UnsafeStateDir(
            f"{path}{where} belongs to uid {info.st_uid}, who could change what the agent "
            f"reads there: chown root {path}, or choose a state directory elsewhere"
        )


def _private_subdir(directory: str, shared: str, uid: int, gid: int | None) -> str:
    """`shared/deploy-agent-UID`, made 0700 for `uid`, or an existing one that is a real
    directory of `uid` that nobody else can enter."""
    path = os.path.join(shared, PRIVATE_PREFIX + str(uid))
    try:
        os.mkdir(path, 0o700)
        made = True
    except FileExistsError:
        made = False
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise UnsafeStateDir(
            f"{path} (the private directory for records in the shared {directory}) is not a "
            f"directory the agent made ({e.strerror}): remove it, or set a private "
            "state_path/queue_path such as /var/lib/deploy"
        ) from None
    try:
        if made and uid != os.geteuid():  # made as root for the user the agent will run as
            os.fchown(fd, uid, -1 if gid is None else gid)
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if info.st_uid != uid or info.st_mode & 0o077:
        raise UnsafeStateDir(
            f"{path} (the private directory for records in the shared {directory}) belongs to "
            f"uid {info.st_uid} with mode {_mode(info)}, not to uid {uid} alone: another user "
            f"may have made it; remove it (rm -r {path}), or set a private "
            "state_path/queue_path such as /var/lib/deploy"
        )
    return path


def _mode(info: os.stat_result) -> str:
    return f"{stat.S_IMODE(info.st_mode):04o}"
