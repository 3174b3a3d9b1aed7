"""The two-pass release sync: a new release made from a prepared base (a hard-link copy of an
earlier release, see `ReleaseLayout.prepare_base`) at about the cost of an in-place sync, while no
inode another release holds is ever changed:

1. a dry run of the sync itemizes every entry it would change or delete (`TwoPass.on_item`);
2. each changed entry that is still a hard link shared with another release is replaced by a
   private copy before anything else touches it (`privatize`): rsync changes the attributes of
   an up-to-date file in place (chmod, chown, utime), which would change the live release and
   the rollback target too; after the dry run the entries it would delete are unlinked from the
   base (names in the base's own directories: the inodes stay with the releases holding them);
3. the real run syncs exactly the names the dry run itemized (`--files-from`, no recursion), so
   rsync touches no entry the dry run did not name.

The supervisor runs both passes (deploy.supervise); this module owns their command lines, the
plan between them and which groups can use them at all (`eligible`: options the passes cannot
mirror send a group back to --link-dest into a fresh directory)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from typing import Any

from deploy.jobstate import OUTCOME_FAILED, OUTCOME_KILLED, OUTCOME_OK, OUTCOME_WARNING, outcome_of
from deploy.rsync_output import RsyncOutputParser

# Options the two passes cannot mirror: hard links across the tree, file lists of the group's
# own, dry runs, in-place writes, backups beside the files, other base directories, and output
# options that would hide or reshape the dry run's itemized list.
_REFUSED = frozenset(
    (
        "--hard-links", "--relative", "--files-from", "--from0", "--link-dest", "--copy-dest",
        "--compare-dest", "--backup", "--backup-dir", "--suffix", "--inplace", "--append",
        "--append-verify", "--remove-source-files", "--write-batch", "--only-write-batch",
        "--read-batch", "--dry-run", "--list-only", "--keep-dirlinks", "--quiet", "--info",
        "--out-format", "--log-format", "--iconv", "--delete-missing-args", "--no-implied-dirs",
        "--old-args",
    )
)  # fmt: skip
_REFUSED_SHORT = frozenset("HRbKqn0")
# Short options whose value is the rest of their bundle (or the next word).
_VALUE_SHORT = frozenset("eBfTM@")
# Filter files rsync reads NUL-separated under --from0: the list is then one name per line.
_FILTER_FILES = frozenset(("--exclude-from", "--include-from", "--filter"))
_FILTER_FILES_SHORT = frozenset("fF")
_DELETE = frozenset(
    (
        "--del", "--delete", "--delete-before", "--delete-during", "--delete-delay",
        "--delete-after", "--delete-excluded", "--max-delete",
    )
)  # fmt: skip
_TRANSFER = (b"<", b">")
GOOD = (OUTCOME_OK, OUTCOME_WARNING)
PRIVATE_TEMP = ".deploy-private-"
_COPY_CHUNK = 1 << 30


class ReleaseSyncError(Exception):
    """The plan between the passes cannot be carried out; the message says what and why."""


def _shorts(option: str) -> str:
    """The letters of a bundle of short options, up to one that takes a value."""
    letters = ""
    for letter in option[1:]:
        letters += letter
        if letter in _VALUE_SHORT:
            break
    return letters


def eligible(options: Sequence[str]) -> bool:
    """Whether a group with these rsync options can make its releases in two passes."""
    for option in options:
        if option.startswith("--"):
            if option.partition("=")[0] in _REFUSED:
                return False
        elif option.startswith("-") and _REFUSED_SHORT.intersection(_shorts(option)):
            return False
    return True


def _uses_filter_files(options: Sequence[str]) -> bool:
    for option in options:
        if option.startswith("--"):
            if option.partition("=")[0] in _FILTER_FILES:
                return True
        elif option.startswith("-") and _FILTER_FILES_SHORT.intersection(_shorts(option)):
            return True
    return False


class TwoPass:
    """The two passes of one sync, made from its command line (as deploy.rsync builds it: rsync,
    options, `--`, SOURCE, the partial directory), and the plan between them: the names the real
    run syncs (an anonymous file in `spool_dir`) and the names the dry run would delete."""

    def __init__(self, sync_argv: Sequence[str], spool_dir: str) -> None:
        fence = len(sync_argv) - 3
        if fence < 1 or sync_argv[fence] != "--":
            raise ReleaseSyncError("the sync's command line does not end in -- SOURCE DEST")
        self.rsync = sync_argv[0]
        self.options = list(sync_argv[1:fence])
        self.source, self.dest = sync_argv[fence + 1], sync_argv[fence + 2]
        self.from0 = not _uses_filter_files(self.options)
        self.spool_dir = spool_dir
        self.listed = 0
        self.transfers = 0
        self.deletions = 0
        self.planned = False
        self.error: str | None = None
        # the dry run changes the transfer's top directory itself: `top_pass` sets it
        self.top = False
        self._names: int | None = None  # the real run's --files-from
        self._doomed: int | None = None  # what the dry run would delete, in its order
        self._root: int | None = None
        self._dirs: tuple[bytes, int] | None = None  # the last parent walked to, and its fd

    # -- the command lines

    # -- the passes, run by the supervisor (deploy.supervise: spawn, drain, finish)

    def first_pass(self, sup: Any, parser: RsyncOutputParser) -> int | None:
        """The dry run, the base's shared entries it names privatized as it names them, then
        its deletions. None once the real run may start; else the sync's end, recorded
        (`parser`: the sync's, which counts nothing the dry run only meant to do)."""
        try:
            self.start()
        except (OSError, ReleaseSyncError) as e:
            return int(sup.finish(OUTCOME_FAILED, None, None, str(e), parser))
        dry = RsyncOutputParser(keep_lists=False, on_item=self.on_item)
        if not sup.spawn(self.dry_argv()):
            return int(sup.finish(OUTCOME_FAILED, None, None, f"cannot run {self.rsync}", parser))
        code, text = sup.drain(dry, [], stop=lambda: self.error is not None)
        exit_code, sig = (code, None) if code >= 0 else (None, -code)
        if sup.kill_requested:
            return int(sup.finish(OUTCOME_KILLED, exit_code, sig, "stopped by rkill", parser, text))
        if self.error is None and sup.waited_for_source(exit_code, text):
            return int(sup.start_rsync(parser))
        outcome, message = outcome_of(exit_code, sig, text)
        if self.error is None and outcome in GOOD:
            # the guard, on the whole source's file list, before the base loses an entry
            outcome, message = sup.guarded(outcome, message, dry)
            if outcome not in GOOD:
                return int(sup.finish(outcome, exit_code, sig, message, parser, text))
            try:
                self.finish(dry.stats.files_transferred)
            except (OSError, ReleaseSyncError) as e:
                self.error = str(e)
        if self.error is not None or outcome not in GOOD:
            ended = OUTCOME_FAILED if self.error else outcome
            why = self.error or f"dry run: {message}"
            return int(sup.finish(ended, exit_code, sig, why, parser, text))
        sup.release_stats = dry
        return None

    def top_pass(self, sup: Any, outcome: str, message: str) -> tuple[str, str]:
        """After a real run that ended well: the top directory's own attributes, when the dry
        run said they change (a third, small run: `top_argv`). Answers the sync's outcome and
        message."""
        if not self.top:
            return outcome, message
        if not sup.spawn(self.top_argv()):
            return OUTCOME_FAILED, f"cannot run {self.rsync}"
        code, text = sup.drain(RsyncOutputParser(keep_lists=False), [])
        exit_code, sig = (code, None) if code >= 0 else (None, -code)
        if sup.kill_requested:
            return OUTCOME_KILLED, "stopped by rkill"
        ended, why = outcome_of(exit_code, sig, text)
        if ended in GOOD:
            return (outcome if ended == OUTCOME_OK else ended), message or why
        return ended, f"setting the top directory: {why}"

    def dry_argv(self) -> list[str]:
        options = [o for o in self.options if o != "--info=progress2"]
        # "%i %n": no " -> target" after a symlink's name, which a name could itself hold
        options += ["--dry-run", "--out-format=%i %n"]
        return [self.rsync, *options, "--", self.source, self.dest]

    def real_argv(self) -> list[str]:
        """The real run: the dry run's names (read from its stdin: `names_fd`), nothing else.
        (Not /dev/fd/N: rsync 3.4+ opens the --files-from path without following symlinks.)"""
        assert self._names is not None
        options = self._without_deletions()
        # --files-from implies --dirs: a listed directory is made, not its contents (those are
        # listed themselves); the top directory is never listed: "." would send its contents.
        options += ["--files-from=-", "--no-implied-dirs", "--no-recursive"]
        if self.from0:
            options.append("--from0")
        return [self.rsync, *options, "--", self.source, self.dest]

    def top_argv(self) -> list[str]:
        """The top directory alone: every entry in it excluded by the first filter rule (first
        match wins, so no rule of the group's can let one through)."""
        options = [*self._without_deletions(), "--dirs", "--no-recursive"]
        return [self.rsync, "--exclude=/*", *options, "--", self.source, self.dest]

    def _without_deletions(self) -> list[str]:
        options, skip = [], False
        for option in self.options:
            if skip:
                skip = False
            elif option.partition("=")[0] in _DELETE:
                skip = option == "--max-delete"  # its value is the next word
            else:
                options.append(option)
        return options

    def names_fd(self) -> int:
        assert self._names is not None
        os.lseek(self._names, 0, os.SEEK_SET)
        return self._names

    # -- the plan, fed the dry run's itemized lines

    def start(self) -> None:
        """A fresh plan (the dry run may run again, after a busy source)."""
        self.close()
        self.listed = self.transfers = self.deletions = 0
        self.planned = False
        self.error = None
        self.top = False
        self._names = self._spool()
        self._doomed = self._spool()
        try:
            self._root = os.open(
                self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError as e:
            raise ReleaseSyncError(f"cannot open {self.dest}: {e.strerror}") from e

    def _spool(self) -> int:
        """An anonymous file in `spool_dir` (the agent's state directory): gone with its fd."""
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            return os.open(self.spool_dir, flags | os.O_TMPFILE, 0o600)
        except OSError:  # a file system without O_TMPFILE: a named file, unlinked at once
            path = os.path.join(self.spool_dir, f".two-pass-{os.urandom(6).hex()}")
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.unlink(path)
            return fd

    def on_item(self, code: bytes, name: bytes) -> None:
        """One line of the dry run (`name` unescaped): an entry to delete after the dry run, or
        one to privatize now and list for the real run. The first error stops the plan
        (`error`, which the supervisor checks: the dry run is then stopped)."""
        if self.error is not None:
            return
        try:
            self._item(code, name)
        except ReleaseSyncError as e:
            self.error = str(e)
        except OSError as e:
            self.error = f"cannot plan the real run: {e}"

    def _item(self, code: bytes, name: bytes) -> None:
        assert self._names is not None and self._doomed is not None
        parts = _parts(name)
        if code.startswith(b"*"):
            self.deletions += 1
            _write_all(self._doomed, name + b"\0")
            return
        if code[:1] in _TRANSFER and code[1:2] == b"f":
            self.transfers += 1
        if not parts:
            self.top = True  # the top directory: private, and set by `top_pass`
            return
        self._privatize(parts)
        listed = b"/".join(parts)
        if not self.from0 and (b"\n" in listed or b"\r" in listed):
            raise ReleaseSyncError(
                f"{listed!r}: a name with a line break cannot be listed one per line (the "
                "group reads filter files, so --from0 is not used); rename it at the source, "
                "or set link_dest = false"
            )
        # "./": a name starting with '#' or ';' would be a comment in rsync's --files-from
        _write_all(self._names, b"./" + listed + (b"\0" if self.from0 else b"\n"))
        self.listed += 1

    def finish(self, transferred: int | None) -> None:
        """After a dry run that ended well: check its list against its own count of transfers
        (rsync's --stats), then unlink what it would delete."""
        assert self._doomed is not None
        if transferred is None or transferred != self.transfers:
            raise ReleaseSyncError(
                f"the dry run itemized {self.transfers} transfers but counted {transferred}: "
                "its list cannot be trusted, the release is not made"
            )
        os.lseek(self._doomed, 0, os.SEEK_SET)
        pending = b""
        while chunk := os.read(self._doomed, 1 << 16):
            names = (pending + chunk).split(b"\0")
            pending = names.pop()
            for name in names:
                self._delete(name)
        self.planned = True

    def close(self) -> None:
        self._forget_dir()
        for fd in (self._root, self._names, self._doomed):
            if fd is not None:
                os.close(fd)
        self._root = self._names = self._doomed = None

    # -- in the base

    def _parent(self, parts: list[bytes]) -> int | None:
        """The fd of the directory holding the entry, walked to without following a symlink;
        None when a component is missing or not a directory (then the entry is not ours yet)."""
        assert self._root is not None
        key = b"/".join(parts[:-1])
        if self._dirs is not None and self._dirs[0] == key:
            return self._dirs[1]
        self._forget_dir()
        fd = os.dup(self._root)
        for part in parts[:-1]:
            try:
                child = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
            os.close(fd)
            fd = child
        self._dirs = (key, fd)
        return fd

    def _forget_dir(self) -> None:
        if self._dirs is not None:
            os.close(self._dirs[1])
            self._dirs = None

    def _privatize(self, parts: list[bytes]) -> None:
        directory = self._parent(parts)
        if directory is None:
            return
        try:
            privatize(directory, parts[-1])
        except FileNotFoundError:
            pass  # a new entry: nothing of another release's to protect
        except OSError as e:
            raise ReleaseSyncError(
                f"cannot make a private copy of {b'/'.join(parts)!r}: {e.strerror}"
            ) from e

    def _delete(self, name: bytes) -> None:
        parts = _parts(name)
        if not parts:
            return
        directory = self._parent(parts)
        if directory is None:
            return
        try:
            if name.endswith(b"/"):
                os.rmdir(parts[-1], dir_fd=directory)
            else:
                os.unlink(parts[-1], dir_fd=directory)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ReleaseSyncError(f"cannot delete {name!r} from the base: {e.strerror}") from e


def _parts(name: bytes) -> list[bytes]:
    """The components of a name rsync itemized, relative to the partial; no `..`, no empty one."""
    parts = [p for p in name.rstrip(b"/").split(b"/") if p != b"."]
    if any(p in (b"", b"..") for p in parts) or name.startswith(b"/"):
        raise ReleaseSyncError(f"the dry run named an unsafe path: {name!r}")
    return parts


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def privatize(directory: int, name: bytes) -> None:
    """Make the entry `name` of the directory `directory` an inode of its own when it shares one
    (a hard link to another release): a regular file is copied, a symlink made anew, each with its
    owner, mode and times, and renamed over the name; any other kind is unlinked (rsync makes it
    anew). A directory, or an entry with one link, is left alone."""
    st = os.stat(name, dir_fd=directory, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        os.unlink(name, dir_fd=directory)
        return
    temp = (PRIVATE_TEMP + os.urandom(6).hex()).encode()
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=directory), temp, dir_fd=directory)
            os.chown(temp, st.st_uid, st.st_gid, dir_fd=directory, follow_symlinks=False)
            os.utime(temp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=directory,
                     follow_symlinks=False)  # fmt: skip
        else:
            _copy_file(directory, name, temp, st)
        os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=directory)
        except OSError:
            pass
        raise


def _copy_file(directory: int, name: bytes, temp: bytes, st: os.stat_result) -> None:
    source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    try:
        if os.fstat(source).st_ino != st.st_ino:
            raise OSError(errno.EAGAIN, "the file changed while it was copied")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        target = os.open(temp, flags, 0o600, dir_fd=directory)
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
        _write_all(target, chunk)
