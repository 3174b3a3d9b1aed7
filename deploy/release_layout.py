"""The on-disk layout of release mode: release ids, the `<releases_path>/<id>` and `.partial-<id>`
directories, the atomic switch of the live symlink (one rename(2) of a fresh symlink) and the
conversion of a live directory into the first release (renameat2(RENAME_EXCHANGE) via ctypes)."""

from __future__ import annotations

import errno
import os
import shutil

PARTIAL = ".partial-"
DOOMED = ".delete-"
# a release cleanup took out of the set, kept as the base the next sync brings up to date
SPARE = ".spare-"
# a hard-link copy of a release (`.base-<its id>`), the base of the next two-pass sync
# (deploy.release_sync), made as `.basetmp-<maker's pid>-<its start ticks>-<random>`
BASE = ".base-"
BASE_TEMP = ".basetmp-"
# where a two-pass sync makes its private copies: `.private-` + the partial's name
SCRATCH = ".private-"
# renameat2(2) flag (linux/fs.h)
RENAME_EXCHANGE = 2
AT_FDCWD = -100


class ReleaseError(Exception):
    """A release-mode step that cannot be done; the message says what and why."""


class ConversionRefused(ReleaseError):
    """The kernel or filesystem refuses the atomic exchange a conversion needs."""


def new_release_id(now: float) -> str:
    """Unique and sortable: UTC time to the microsecond, then a short random suffix."""
    import datetime  # here: the supervisor, which imports this module, never needs it

    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{os.urandom(3).hex()}"


def is_release_id(name: str) -> bool:
    stamp, dash, suffix = name.partition("-")
    return bool(dash) and len(stamp) == 22 and stamp.endswith("Z") and len(suffix) == 6


def default_releases_path(src: str) -> str:
    return src.rstrip("/") + ".releases"


class ReleaseLayout:
    """Where the releases of one live path are; every change is a rename, so a crash at any
    moment leaves either the old or the new name."""

    def __init__(self, src: str, releases_path: str) -> None:
        self.src = src.rstrip("/") or "/"
        self.root = releases_path.rstrip("/")

    def path(self, release_id: str) -> str:
        return os.path.join(self.root, release_id)

    def partial(self, release_id: str) -> str:
        return os.path.join(self.root, PARTIAL + release_id)

    def exists(self, release_id: str) -> bool:
        return os.path.isdir(self.path(release_id)) and not os.path.islink(self.path(release_id))

    def live_id(self) -> str | None:
        """The release `src` points at, or None (no symlink, or one that points elsewhere)."""
        try:
            target = os.readlink(self.src)
        except OSError:
            return None
        if os.path.dirname(target.rstrip("/")) != self.root:
            return None
        name = os.path.basename(target.rstrip("/"))
        return name if is_release_id(name) else None

    def src_is_directory(self) -> bool:
        return os.path.isdir(self.src) and not os.path.islink(self.src)

    def partials(self) -> list[str]:
        """Ids of the `.partial-<id>` directories, oldest first."""
        return sorted(n[len(PARTIAL) :] for n in self._names() if n.startswith(PARTIAL))

    def spares(self) -> list[str]:
        return sorted(n[len(SPARE) :] for n in self._names() if n.startswith(SPARE))

    def scratches(self) -> list[str]:
        """Names of the scratch directories of two-pass syncs (see deploy.release_private)."""
        return [n for n in self._names() if n.startswith(SCRATCH)]

    def bases(self) -> list[str]:
        """Ids of the releases a prepared base is a copy of, oldest first."""
        return sorted(n[len(BASE) :] for n in self._names() if n.startswith(BASE))

    def release_dirs(self) -> list[str]:
        return sorted(n for n in self._names() if is_release_id(n))

    def _names(self) -> list[str]:
        try:
            return os.listdir(self.root)
        except FileNotFoundError:
            return []

    # -- changes

    def ensure_root(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def switch(self, release_id: str) -> None:
        """Point `src` at `release_id`: a fresh symlink beside `src`, renamed over it. A reader
        sees the old target or the new one, never no `src`."""
        if not self.exists(release_id):
            raise ReleaseError(f"release {release_id} does not exist in {self.root}")
        parent, name = os.path.split(self.src)
        temp = os.path.join(parent, f".{name}.switch-{os.urandom(4).hex()}")
        os.symlink(self.path(release_id), temp)
        try:
            os.rename(temp, self.src)
        except OSError as e:
            _unlink_quietly(temp)
            raise ReleaseError(f"cannot switch {self.src} to {release_id}: {e.strerror}") from e
        _fsync_dir(parent)

    def stage_to_release(self, release_id: str) -> None:
        """`.partial-<id>` → `<id>` (done once rsync ended ok)."""
        os.rename(self.partial(release_id), self.path(release_id))
        _fsync_dir(self.root)

    def rename_partial(self, old_id: str, new_id: str) -> None:
        os.rename(self.partial(old_id), self.partial(new_id))

    def make_spare(self, release_id: str) -> None:
        """Take a release out of the set (cleanup) but keep its tree as the next base."""
        os.rename(self.path(release_id), os.path.join(self.root, SPARE + release_id))

    def recycle(self, spare_id: str, new_id: str) -> None:
        """A spare (a complete older tree) becomes the base of a new release: rsync only brings
        it up to date, instead of creating every entry anew."""
        os.rename(os.path.join(self.root, SPARE + spare_id), self.partial(new_id))

    def take_base(self, base_id: str, new_id: str) -> None:
        """A prepared base becomes the partial of a new release (see deploy.release_sync)."""
        os.rename(os.path.join(self.root, BASE + base_id), self.partial(new_id))

    def copy_release(self, release_id: str, owner: tuple[int, int]) -> str | None:
        """A hard-link copy of a release (`cp -al`: its own directories, every other entry a
        link to the release's inode) under a temporary name that names its maker (`owner`: pid,
        start ticks); the name, or None when the copy failed (it is then doomed)."""
        import subprocess  # here: only the sync supervisor, after the sync's end, copies

        name = f"{BASE_TEMP}{owner[0]}-{owner[1]}-{os.urandom(3).hex()}"
        argv = ["cp", "-al", "--no-target-directory", "--", self.path(release_id)]
        done = subprocess.run(
            [*argv, os.path.join(self.root, name)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            self.doom(name)
            return None
        return name

    def make_base(self, temp: str, release_id: str) -> None:
        """A finished copy (`copy_release`) becomes the prepared base; older bases are doomed."""
        older = self.bases()
        os.rename(os.path.join(self.root, temp), os.path.join(self.root, BASE + release_id))
        for old in older:
            if old != release_id:
                self.doom(BASE + old)

    def base_copies(self) -> list[tuple[str, int, int]]:
        """The copies in the making (`copy_release`): name, maker's pid and start ticks."""
        copies = []
        for name in (n for n in self._names() if n.startswith(BASE_TEMP)):
            pid, _, rest = name[len(BASE_TEMP) :].partition("-")
            ticks = rest.partition("-")[0]
            ours = pid.isdigit() and ticks.isdigit()  # else a name no maker of ours gave
            copies.append((name, int(pid) if ours else 0, int(ticks) if ours else 0))
        return copies

    def doom(self, name: str) -> None:
        """Take a directory of the layout out of sight (atomic); `purge` removes it later."""
        try:
            os.rename(os.path.join(self.root, name), os.path.join(self.root, DOOMED + name))
        except FileNotFoundError:
            pass

    def purge(self) -> None:
        """Remove the doomed directories (slow for big trees: run outside the event loop)."""
        for name in self._names():
            if name.startswith(DOOMED):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def clear_switch_leftovers(self) -> None:
        """Temporary symlinks a process killed mid-switch or mid-conversion left beside `src`."""
        parent, name = os.path.split(self.src)
        for entry in _listdir(parent):
            if entry.startswith((f".{name}.switch-", f".{name}.convert-")):
                path = os.path.join(parent, entry)
                if os.path.islink(path):
                    _unlink_quietly(path)
        for entry in self._names():
            # a conversion's forwarding link (see convert), replaced by the tree or abandoned
            path = os.path.join(self.root, entry)
            if is_release_id(entry) and os.path.islink(path):
                self._finish_conversion(entry)

    # -- conversion of a live directory

    def convert(self, release_id: str) -> None:
        """Make the real directory `src` the release `release_id` with `src` a symlink to it,
        and no moment where `src` does not resolve:
          1. `<root>/<id>` → `.NAME.convert-<id>` and `.NAME.convert-<id>` → `<root>/<id>`
             (two symlinks; nothing reads them yet);
          2. exchange `src` and `.NAME.convert-<id>`: `src` is now the symlink, resolving
             through `<root>/<id>` to the old tree, which sits at `.NAME.convert-<id>`;
          3. exchange `<root>/<id>` and `.NAME.convert-<id>`: the tree is at `<root>/<id>`;
          4. remove the now self-referring `.NAME.convert-<id>`.
        A crash between steps leaves `src` resolving; `clear_switch_leftovers` finishes it."""
        parent, name = os.path.split(self.src)
        hold = os.path.join(parent, f".{name}.convert-{release_id}")
        forward = self.path(release_id)
        self.ensure_root()
        os.symlink(hold, forward)
        os.symlink(forward, hold)
        try:
            exchange(self.src, hold)
        except ConversionRefused:
            _unlink_quietly(hold)
            _unlink_quietly(forward)
            raise
        _fsync_dir(parent)
        self._finish_conversion(release_id)

    def _finish_conversion(self, release_id: str) -> None:
        forward = self.path(release_id)
        parent, name = os.path.split(self.src)
        hold = os.path.join(parent, f".{name}.convert-{release_id}")
        if os.path.isdir(hold) and not os.path.islink(hold):
            exchange(forward, hold)  # step 3: the tree moves under <root>
            _fsync_dir(self.root)
        elif os.path.islink(forward) and self.live_id() != release_id:
            _unlink_quietly(forward)  # step 2 never happened
        if os.path.islink(hold):
            _unlink_quietly(hold)


_renameat2 = None


def exchange(a: str, b: str) -> None:
    """Swap two names atomically (Linux renameat2 RENAME_EXCHANGE); ConversionRefused when the
    kernel, libc or filesystem cannot."""
    global _renameat2
    import ctypes  # here: the supervisor, which imports this module, never converts
    import ctypes.util

    if _renameat2 is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = getattr(libc, "renameat2", None)
        if function is None:
            raise ConversionRefused("this C library has no renameat2(): cannot convert atomically")
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        function.argtypes += [ctypes.c_uint]
        function.restype = ctypes.c_int
        _renameat2 = function
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP):
        raise ConversionRefused(
            f"cannot exchange {a} and {b} atomically ({os.strerror(code)}): the kernel or "
            "filesystem refuses renameat2(RENAME_EXCHANGE); releases_path must be on the "
            "filesystem of the live path"
        )
    raise OSError(code, f"renameat2({a}, {b}): {os.strerror(code)}")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
