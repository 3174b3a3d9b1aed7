"""Running as `--user`/`--group` (or the ini's `user`/`group`): resolving them, preparing the
directories the daemon writes while it is still root, and dropping to them once the listening
port is bound, then proving the daemon can still write what it must."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.application import service
from twisted.logger import Logger


class PrivilegeError(Exception):
    """The daemon cannot run as the user/group it was given; the message says what to fix."""


@dataclass(frozen=True)
class Identity:
    """Who the daemon runs as after binding."""

    uid: int
    gid: int
    user: str | None  # the passwd name, for the supplementary groups; None for a bare uid

    @property
    def label(self) -> str:
        user = self.user or str(self.uid)
        try:
            group = grp.getgrgid(self.gid).gr_name
        except KeyError:
            group = str(self.gid)
        return f"{user}:{group}"


def resolve_identity(user: str | None, group: str | None) -> Identity | None:
    """`user`/`group` as names or numbers; None when neither is given. Without a group the
    user's primary group is used (as twistd -u does); without a user the uid stays."""
    if not user and not group:
        return None
    name: str | None
    if user:
        entry = _passwd(user)
        if entry is None:
            if not user.isdigit():
                raise PrivilegeError(f"unknown user {user!r}")
            uid, name, primary = int(user), None, None
        else:
            uid, name, primary = entry.pw_uid, entry.pw_name, entry.pw_gid
    else:
        uid = os.getuid()
        entry = _passwd(str(uid))
        name, primary = (entry.pw_name, entry.pw_gid) if entry else (None, None)
    if group:
        gid = _group_id(group)
    elif user:
        if primary is None:
            raise PrivilegeError(f"user {user} has no passwd entry: give a group too")
        gid = primary
    else:
        gid = os.getgid()
    return Identity(uid, gid, name)


def _passwd(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        return None


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise PrivilegeError(f"unknown group {group!r}") from None


def is_switch(identity: Identity | None) -> bool:
    """Whether running as `identity` changes anything for this process."""
    return identity is not None and (identity.uid != os.geteuid() or identity.gid != os.getegid())


# --------------------------------------------------------------------------- directories


def make_dirs_owned(path: str, identity: Identity, mode: int = 0o750) -> None:
    """Create `path` and its missing parents; the ones created here belong to `identity`."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.exists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue
        os.chown(directory, identity.uid, identity.gid)


def hand_over(directory: str, identity: Identity) -> bool:
    """Give a daemon-owned directory (the agent's state directory) and the files directly in it
    to `identity`. A shared directory (sticky or world-writable, like /tmp) or `/` is left
    alone: it is not the daemon's to give. Returns whether it was handed over."""
    path = os.path.abspath(directory)
    info = os.lstat(path)
    if (
        path == "/"
        or not stat.S_ISDIR(info.st_mode)
        or info.st_mode & (stat.S_ISVTX | stat.S_IWOTH)
    ):
        return False
    if (info.st_uid, info.st_gid) != (identity.uid, identity.gid):
        os.chown(path, identity.uid, identity.gid, follow_symlinks=False)
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            if (st.st_uid, st.st_gid) != (identity.uid, identity.gid):
                os.chown(entry.path, identity.uid, identity.gid, follow_symlinks=False)
    return True


def prepare_directories(
    identity: Identity, *, own: Iterable[str] = (), create: Iterable[str] = ()
) -> None:
    """Before dropping: create what is missing owned by `identity`, and hand the `own`
    directories over. Directories in `create` that exist already are not touched (a log
    directory may be /var/log): `unwritable` checks them after the drop."""
    for directory in own:
        make_dirs_owned(directory, identity)
        hand_over(directory, identity)
    for directory in create:
        make_dirs_owned(directory, identity)


def unwritable(dirs: Iterable[str], files: Iterable[str] = ()) -> list[str]:
    """What the current user cannot write: a directory (or, when it is missing, the nearest
    existing parent it would be created in), or an existing file."""
    problems = []
    for directory in dict.fromkeys(dirs):
        current = os.path.abspath(directory)
        while not os.path.exists(current) and os.path.dirname(current) != current:
            current = os.path.dirname(current)
        if not os.access(current, os.W_OK | os.X_OK):
            problems.append(current)
    for path in dict.fromkeys(files):
        if os.path.exists(path) and not os.access(path, os.W_OK):
            problems.append(path)
    return problems


# --------------------------------------------------------------------------- dropping


def drop_privileges(identity: Identity) -> None:
    """Become `identity` for good: supplementary groups, then gid, then uid (real, effective
    and saved), so nothing can switch back."""
    if not is_switch(identity):
        return
    if os.geteuid() != 0:
        raise PrivilegeError(f"cannot switch to {identity.label}: not started as root")
    if identity.user is not None:
        os.initgroups(identity.user, identity.gid)
    else:
        os.setgroups([identity.gid])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise PrivilegeError(f"dropped to {identity.label} but could become root again")


class DropPrivilegesService(service.Service):
    """Placed after the listening service in the daemon's MultiService: its
    `privilegedStartService` runs once the port is bound (twistd calls every
    `privilegedStartService` before any `startService`). It hands the `own` directories over
    (once more), drops to `identity`, then checks that the directories and files the daemon
    writes are still writable, and stops the daemon at start, naming them, when they are not."""

    log = Logger()

    def __init__(
        self,
        identity: Identity | None,
        *,
        own: Iterable[str] = (),
        dirs: Callable[[], Iterable[str]] = tuple,
        files: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.identity = identity
        self.own = list(own)
        self.dirs = dirs
        self.files = files
        self.dropped = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.dropped or not is_switch(self.identity):
            return
        assert self.identity is not None
        # Again, at the last moment as root: start-up (the agent re-reading the syncs a
        # previous agent left) may have rewritten state files as root since makeService.
        for directory in self.own:
            if os.path.isdir(directory):
                hand_over(directory, self.identity)
        drop_privileges(self.identity)
        self.dropped = True
        problems = unwritable(self.dirs(), self.files())
        if problems:
            label = self.identity.label
            raise PrivilegeError(
                f"running as {label}, the daemon cannot write {', '.join(problems)}: "
                f"chown them to {label}, or remove them so that they are created for it"
            )
        self.log.info(
            "running as {label} (uid {uid}, gid {gid})",
            label=self.identity.label,
            uid=self.identity.uid,
            gid=self.identity.gid,
        )

    def startService(self) -> None:
        # Started without privilegedStartService (a plain MultiService.startService): the
        # listening service before us has bound its port by now.
        if not self.dropped:
            self.privilegedStartService()
        super().startService()
