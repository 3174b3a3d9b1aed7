"""Private copies for the two-pass release sync (deploy.release_sync): an entry of a base that is a
hard link shared with another release becomes an inode of its own, with the same content, owner,
mode and times, before rsync may change it in place. A copy is made in a scratch directory beside
the base and renamed over the entry: a copy cut short by a kill is never in the tree."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

_COPY_CHUNK = 1 << 30


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def in_writable(directory: int, change: Callable[[], None]) -> None:
    """Make `change` (of an entry of `directory`, one of the base's own directories). When the
    directory is not writable to its owner and that refuses the change (an agent that does not
    run as root), write access is given to the owner for the change and taken back after, as
    rsync does."""
    try:
        change()
        return
    except PermissionError:
        st = os.fstat(directory)
        if st.st_mode & stat.S_IWUSR or st.st_uid != os.geteuid():
            raise
    os.fchmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
    try:
        change()
    finally:
        os.fchmod(directory, stat.S_IMODE(st.st_mode))


def privatize(directory: int, name: bytes, scratch: int) -> None:
    """Make the entry `name` of the directory `directory` an inode of its own when it shares one
    (a hard link to another release): a regular file is copied, a symlink made anew, each with its
    owner, mode and times, in the directory `scratch` (on the same file system, outside the tree)
    and renamed over the name; any other kind is unlinked (rsync makes it anew). A directory, or
    an entry with one link, is left alone."""
    in_writable(directory, lambda: _privatize(directory, name, scratch))


def _privatize(directory: int, name: bytes, scratch: int) -> None:
    st = os.stat(name, dir_fd=directory, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        os.unlink(name, dir_fd=directory)
        return
    temp = os.urandom(8).hex().encode()
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=directory), temp, dir_fd=scratch)
            os.chown(temp, st.st_uid, st.st_gid, dir_fd=scratch, follow_symlinks=False)
            os.utime(temp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=scratch,
                     follow_symlinks=False)  # fmt: skip
        else:
            _copy_file(directory, name, scratch, temp, st)
        os.rename(temp, name, src_dir_fd=scratch, dst_dir_fd=directory)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=scratch)
        except OSError:
            pass
        raise


def _copy_file(
    directory: int, name: bytes, scratch: int, temp: bytes, st: os.stat_result
) -> None:
    source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    try:
        if os.fstat(source).st_ino != st.st_ino:
            raise OSError(errno.EAGAIN, "the file changed while it was copied")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        target = os.open(temp, flags, 0o600, dir_fd=scratch)
        try:
            _copy_data(source, target)
            os.fchown(target, st.st_uid, st.st_gid)
            os.fchmod(target, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(target)
    finally:
        os.close(source)


def _copy_data(source: int, target: int) -> None:
    try:
        while os.copy_file_range(source, target, _COPY_CHUNK):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(source, 0, os.SEEK_SET)
    os.ftruncate(target, 0)
    os.lseek(target, 0, os.SEEK_SET)
    while chunk := os.read(source, 1 << 20):
        write_all(target, chunk)
