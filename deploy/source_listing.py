"""The empty-source guard's listing: the rsync command line that lists the top level of a sync's
source (with the options that reach it and the filters that decide which files count), and
whether what it printed means a sync with --delete would empty the target."""

from __future__ import annotations

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
