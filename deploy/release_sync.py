"""The two-pass release sync: a new release made from a prepared base (a hard-link copy of an
earlier release, see deploy.release_steps.prepare_base) at about the cost of an in-place sync,
while no inode another release holds is ever changed:

1. a dry run of the sync itemizes every entry it would change or delete (`TwoPass.on_item`);
2. each changed entry that is still a hard link shared with another release is replaced by a
   private copy before anything else touches it (`privatize`, made in a scratch directory beside
   the partial): rsync changes the attributes of an up-to-date file in place (chmod, chown,
   utime), which would change the live release and the rollback target too; after the dry run
   the entries it would delete are unlinked from the base (names in the base's own directories:
   the inodes stay with the releases holding them);
3. the real run syncs exactly the names the dry run itemized (`--files-from`, no recursion), so
   rsync touches no entry the dry run did not name but the directories above them (private to
   the base: listed, so that rsync sets again the times the passes moved);
4. the top directory's own attributes: a third, small run when the dry run itemized it, else
   its times put back (`top_pass`).

The supervisor runs the passes (deploy.supervise); this module owns the plan between them (its
private copies: deploy.release_private; their command lines, and which groups can use them at
all: deploy.release_argv)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from typing import Any

from deploy.jobstate import GOOD_OUTCOMES, OUTCOME_FAILED, OUTCOME_KILLED, OUTCOME_OK, outcome_of
from deploy.release_argv import dry_argv, reads_filter_files, real_argv, top_argv
from deploy.release_layout import SCRATCH, ReleaseError
from deploy.release_private import in_writable, privatize, write_all
from deploy.rsync_output import RsyncOutputParser

_TRANSFER = (b"<", b">")
_DIRECTORY = b"d"


class ReleaseSyncError(ReleaseError):
    """The plan between the passes cannot be carried out; the message says what and why."""


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
        # filter files rsync would read NUL-separated under --from0: names one per line then
        self.from0 = not reads_filter_files(self.options)
        self.spool_dir = spool_dir
        self.listed = 0  # names given to the real run
        self.transfers = 0
        self.deletions = 0
        self.planned = False
        self.error: str | None = None
        # the dry run changes the transfer's top directory itself: `top_pass` sets it
        self.top = False
        self._names: int | None = None  # the real run's --files-from
        self._doomed: int | None = None  # what the dry run would delete, in its order
        self._root: int | None = None
        self._scratch: int | None = None  # where private copies are made (`_make_scratch`)
        self._scratch_path: str | None = None
        self._dirs: tuple[bytes, int] | None = None  # the last parent walked to, and its fd
        self._listed_dirs: set[bytes] = set()
        self._top_times: tuple[int, int] | None = None  # the top directory's, before the passes

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
        if (error := sup.spawn(self.dry_argv())) is not None:
            return int(sup.finish(OUTCOME_FAILED, None, None, error, parser))
        code, text = sup.drain(dry, [], stop=lambda: self.error is not None)
        exit_code, sig = (code, None) if code >= 0 else (None, -code)
        if sup.kill_requested:
            return int(sup.finish(OUTCOME_KILLED, exit_code, sig, "stopped by rkill", parser, text))
        if self.error is None and sup.waited_for_source(exit_code, text):
            return int(sup.start_rsync(parser))
        outcome, message = outcome_of(exit_code, sig, text)
        if self.error is None and outcome in GOOD_OUTCOMES:
            # the guard, on the whole source's file list, before the base loses an entry
            outcome, message = sup.guarded(outcome, message, dry)
            if outcome not in GOOD_OUTCOMES:
                return int(sup.finish(outcome, exit_code, sig, message, parser, text))
            try:
                self.finish(dry.stats.files_transferred)
            except (OSError, ReleaseSyncError) as e:
                self.error = str(e)
        if self.error is not None or outcome not in GOOD_OUTCOMES:
            ended = OUTCOME_FAILED if self.error else outcome
            why = self.error or f"dry run: {message}"
            return int(sup.finish(ended, exit_code, sig, why, parser, text))
        sup.release_stats = dry
        return None

    def top_pass(self, sup: Any, outcome: str, message: str) -> tuple[str, str]:
        """After a real run that ended well: the top directory's own attributes, when the dry
        run said they change (a third, small run: `top_argv`), else its times as they were
        before the passes. Answers the sync's outcome and message."""
        if not self.top:
            try:
                self.restore_top()
            except OSError as e:
                return OUTCOME_FAILED, f"setting the top directory's times back: {e.strerror}"
            return outcome, message
        while True:  # a connection of its own: a busy source is waited for, as for the others
            if (error := sup.spawn(self.top_argv())) is not None:
                return OUTCOME_FAILED, error
            code, text = sup.drain(RsyncOutputParser(keep_lists=False), [])
            exit_code, sig = (code, None) if code >= 0 else (None, -code)
            if sup.kill_requested:
                return OUTCOME_KILLED, "stopped by rkill"
            if not sup.waited_for_source(exit_code, text):
                break
            if sup.kill_requested:  # stopped while it waited
                return OUTCOME_KILLED, "stopped by rkill"
        ended, why = outcome_of(exit_code, sig, text)
        if ended in GOOD_OUTCOMES:
            return (outcome if ended == OUTCOME_OK else ended), message or why
        return ended, f"setting the top directory: {why}"

    def restore_top(self) -> None:
        """The top directory's times as before the passes (its attributes are the source's:
        the dry run did not itemize it; only entries made or replaced in it moved them)."""
        assert self._root is not None and self._top_times is not None
        os.utime(self._root, ns=self._top_times)

    # -- the command lines

    def dry_argv(self) -> list[str]:
        return dry_argv(self.rsync, self.options, self.source, self.dest)

    def real_argv(self) -> list[str]:
        """The real run: the dry run's names (read from its stdin: `names_fd`), nothing else."""
        assert self._names is not None
        return real_argv(self.rsync, self.options, self.source, self.dest, self.from0)

    def top_argv(self) -> list[str]:
        return top_argv(self.rsync, self.options, self.source, self.dest)

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
        self._listed_dirs.clear()
        self._names = self._spool()
        self._doomed = self._spool()
        try:
            self._root = _open_dir(self.dest)
        except OSError as e:
            raise ReleaseSyncError(f"cannot open {self.dest}: {e.strerror}") from e
        top = os.fstat(self._root)
        self._top_times = (top.st_atime_ns, top.st_mtime_ns)
        self._scratch = self._make_scratch()

    def _make_scratch(self) -> int:
        """The directory private copies are made in (`SCRATCH` + the partial's name, beside it:
        the same file system, outside the tree); what a killed plan left there is removed."""
        partial = self.dest.rstrip("/")
        path = os.path.join(os.path.dirname(partial), SCRATCH + os.path.basename(partial))
        if os.path.lexists(path):
            if os.path.islink(path) or not os.path.isdir(path):
                raise ReleaseSyncError(f"{path} is not a directory of ours: not touching it")
            shutil.rmtree(path)
        os.mkdir(path, 0o700)
        self._scratch_path = path
        return _open_dir(path)

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
        if self.error is not None or _unchanged(code):
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
            write_all(self._doomed, name + b"\0")
            return
        if code[:1] in _TRANSFER and code[1:2] == b"f":
            self.transfers += 1
        if not parts:
            self.top = True  # the top directory: private, and set by `top_pass`
            return
        # The directories above the entry change too (a private copy renamed into one, rsync's
        # temporary file renamed over a changed file): listed, rsync sets their times again
        # at the end, as an in-place run does; the top directory's are `top_pass`'s.
        for depth in range(1, len(parts)):
            self._list(parts[:depth])
        self._privatize(parts)
        self._list(parts, code[1:2] == _DIRECTORY)

    def _list(self, parts: list[bytes], directory: bool = True) -> None:
        assert self._names is not None
        listed = b"/".join(parts)
        if directory:
            if listed in self._listed_dirs:
                return
            self._listed_dirs.add(listed)
        if not self.from0 and (b"\n" in listed or b"\r" in listed):
            raise ReleaseSyncError(
                f"{listed!r}: a name with a line break cannot be listed one per line (the "
                "group reads filter files, so --from0 is not used); rename it at the source, "
                "or set link_dest = false"
            )
        # "./": a name starting with '#' or ';' would be a comment in rsync's --files-from
        write_all(self._names, b"./" + listed + (b"\0" if self.from0 else b"\n"))
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
        for fd in (self._root, self._names, self._doomed, self._scratch):
            if fd is not None:
                os.close(fd)
        self._root = self._names = self._doomed = self._scratch = None
        if self._scratch_path is not None:
            try:
                os.rmdir(self._scratch_path)  # empty: every copy was renamed into the tree
            except OSError:
                pass  # the next sync's `begin` dooms it
            self._scratch_path = None

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
                child = _open_dir(part, fd)
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
            assert self._scratch is not None
            privatize(directory, parts[-1], self._scratch)
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
        # the directory keeps its times: when they change, the dry run listed it (rsync sets
        # them); else an in-place run would have set them back
        times = os.fstat(directory)
        remove = os.rmdir if name.endswith(b"/") else os.unlink
        try:
            in_writable(directory, lambda: remove(parts[-1], dir_fd=directory))
            os.utime(directory, ns=(times.st_atime_ns, times.st_mtime_ns))
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and remove is os.rmdir:
                # it holds entries the filters protect: rsync itemizes the directory's deletion
                # in a dry run, then keeps it ("cannot delete non-empty directory")
                return
            raise ReleaseSyncError(f"cannot delete {name!r} from the base: {e.strerror}") from e


def _open_dir(path: str | bytes, dir_fd: int | None = None) -> int:
    """A directory, never through a symlink (ELOOP/ENOTDIR otherwise)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, dir_fd=dir_fd)


def _unchanged(code: bytes) -> bool:
    """An entry rsync itemizes only to say it stays as it is (-ii, -vv): nothing to do."""
    return code[:1] == b"." and not code[2:].strip(b" ")


def _parts(name: bytes) -> list[bytes]:
    """The components of a name rsync itemized, relative to the partial; no `..`, no empty one."""
    parts = [p for p in name.rstrip(b"/").split(b"/") if p != b"."]
    if any(p in (b"", b"..") for p in parts) or name.startswith(b"/"):
        raise ReleaseSyncError(f"the dry run named an unsafe path: {name!r}")
    return parts
