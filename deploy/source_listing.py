"""The empty-source guard: the listing the supervisor runs before a sync into a live target (the
rsync command line that lists the top level of the sync's source, with the options that reach it
and the filters that decide which files count, and whether what it printed means a sync with
--delete would empty the target), and the same question answered from a finished release-mode
sync's own --stats, before its release can go live."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

from deploy.rsync_output import rsync_environment

LIST_TIMEOUT = 60.0

# Options of the sync that the source listing needs too: how to reach the source, and the filters
# that decide which of its files count.
_LISTING_OPTIONS = (
    "--port=",
    "--rsh=",
    "--password-file=",
    "--address=",
    "--contimeout=",
    "--timeout=",
    "--rsync-path=",
    "--include=",
    "--exclude=",
    "--filter=",
    "--include-from=",
    "--exclude-from=",
    "--ipv4",
    "--ipv6",
    "--protect-args",
)


def listing_argv(sync_argv: list[str]) -> list[str]:
    """`rsync --list-only` of the top level of the source of `sync_argv` (an rsync command line
    ending in SOURCE DEST), as a directory."""
    source = sync_argv[-2]
    if not source.endswith("/"):
        source += "/"
    options = [a for a in sync_argv[1:-2] if a.startswith(_LISTING_OPTIONS)]
    return [sync_argv[0], "--list-only", "--no-recursive", "--dirs", *options, "--", source]


def lists_nothing(output: bytes) -> bool:
    """The listing shows `.` alone: the source has no files."""
    names = [
        line.split(None, 4)[-1]
        for line in output.decode("utf-8", "replace").splitlines()
        if line.strip()
    ]
    return all(n == "." for n in names)


def source_lists_nothing(
    sync_argv: list[str], started: Callable[[subprocess.Popen[bytes]], None]
) -> bool | None:
    """Run the listing of the source of `sync_argv` (in its own process group; `started` is
    given the process, so that a stop can kill it): True when it shows `.` alone, False when it
    shows more; None when it cannot tell (it cannot run, fails, is stopped or times out)."""
    try:
        lister = subprocess.Popen(
            listing_argv(sync_argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            process_group=0,
            env=rsync_environment(),
        )
    except OSError:
        return None
    started(lister)
    try:
        out, _ = lister.communicate(timeout=LIST_TIMEOUT)
    except subprocess.TimeoutExpired:
        lister.kill()
        lister.communicate()
        return None
    if lister.returncode != 0:
        return None
    return lists_nothing(out)


def synced_nothing(
    files: int | None, kinds: dict[str, int] | None, sync_argv: Sequence[str] = ()
) -> bool | None:
    """What a finished sync's --stats say, as `lists_nothing` asks it of the source: True when
    rsync's file list held its top directory alone (`Number of files: 1 (dir: 1)`, whatever the
    filters left out). None when they cannot tell: no count (the group's options silenced the
    stats, e.g. --quiet), a lone entry without the breakdown by kind (rsync before 3.1), or a
    file list that holds more than the source's tree (--relative adds the implied directories
    of the source's path; --files-from lists other names)."""
    if files is None or _lists_more_than_the_tree(sync_argv):
        return None
    if files != 1:
        return files < 1
    return None if kinds is None else kinds.get("dir", 0) == 1


def _lists_more_than_the_tree(sync_argv: Sequence[str]) -> bool:
    for arg in sync_argv[1:-2]:
        if arg in ("--relative", "--files-from") or arg.startswith("--files-from="):
            return True
        if arg.startswith("-") and not arg.startswith("--") and "R" in arg:
            return True  # -R in a bundle of short options (conservative: the listing decides)
    return False


def unverified(source: str) -> str:
    """Why a release the guard could not check is not activated (the `failed` outcome)."""
    return (
        f"cannot tell whether source {source} lists any files (rsync's stats did not say, and "
        "listing the source failed): the release is not activated"
    )


def refusal(source: str, release: bool) -> str:
    """Why the guard refused `source`: the message of the `refused` outcome."""
    doing = "to make it a release" if release else "to sync it with --delete"
    return (
        f"source {source} lists no files: refusing {doing}, which would empty the target "
        "(set allow_empty_source = true in the group to allow it)"
    )
