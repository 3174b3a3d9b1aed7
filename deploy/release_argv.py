"""The command lines of the two-pass release sync (deploy.release_sync), made from the sync's own:
which group options the passes can mirror at all (`eligible`; the others send a group back to
--link-dest into a fresh directory), the dry run's, the real run's and the top directory's."""

from __future__ import annotations

from collections.abc import Sequence

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
        "--old-args", "--stderr", "--msgs2stderr", "--remote-option",
    )
)  # fmt: skip
_REFUSED_SHORT = frozenset("HRbKqn0M")
# Short options whose value is the rest of their bundle (or the next word).
_VALUE_SHORT = frozenset("eBfTM@")
# Filter files rsync reads NUL-separated under --from0: the list is then one name per line.
_FILTER_FILES = frozenset(("--exclude-from", "--include-from", "--filter"))
_FILTER_FILES_SHORT = frozenset("fF")
# Every option that adds filter rules (the top pass runs with none of them)
_FILTERS = frozenset(("--exclude", "--include", "--cvs-exclude", *_FILTER_FILES))
_DELETE = frozenset(
    (
        "--del", "--delete", "--delete-before", "--delete-during", "--delete-delay",
        "--delete-after", "--delete-excluded", "--max-delete",
    )
)  # fmt: skip


def _shorts(option: str) -> str:
    """The letters of a bundle of short options, up to one that takes a value."""
    letters = ""
    for letter in option[1:]:
        letters += letter
        if letter in _VALUE_SHORT:
            break
    return letters


def _any_of(options: Sequence[str], long: frozenset[str], short: frozenset[str]) -> bool:
    """Whether `options` hold one of the `long` options (with or without a value) or one of
    the `short` letters in a bundle."""
    for option in options:
        if option.startswith("--"):
            if option.partition("=")[0] in long:
                return True
        elif option.startswith("-") and short.intersection(_shorts(option)):
            return True
    return False


def eligible(options: Sequence[str]) -> bool:
    """Whether a group with these rsync options can make its releases in two passes."""
    return not _any_of(options, _REFUSED, _REFUSED_SHORT)


def reads_filter_files(options: Sequence[str]) -> bool:
    """Whether rsync reads filter files (which --from0 would make it read NUL-separated)."""
    return _any_of(options, _FILTER_FILES, _FILTER_FILES_SHORT)


def dry_argv(rsync: str, options: Sequence[str], source: str, dest: str) -> list[str]:
    kept = [o for o in options if o != "--info=progress2"]
    # "%i %n": no " -> target" after a symlink's name, which a name could itself hold
    kept += ["--dry-run", "--out-format=%i %n"]
    return [rsync, *kept, "--", source, dest]


def real_argv(
    rsync: str, options: Sequence[str], source: str, dest: str, from0: bool
) -> list[str]:
    """The real run, reading the names to sync on its stdin (not /dev/fd/N: rsync 3.4+ opens
    the --files-from path without following symlinks)."""
    kept = _without_deletions(options)
    # --files-from implies --dirs: a listed directory is made, not its contents (those are
    # listed themselves); the top directory is never listed: "." would send its contents.
    # Not -m: a listed directory whose (unchanged) files are not listed is no empty one.
    kept += ["--files-from=-", "--no-implied-dirs", "--no-recursive", "--no-prune-empty-dirs"]
    if from0:
        kept.append("--from0")
    return [rsync, *kept, "--", source, dest]


def top_argv(rsync: str, options: Sequence[str], source: str, dest: str) -> list[str]:
    """The top directory alone: none of the group's filter rules (a `!` among them, in a filter
    file or a source's .rsync-filter, would clear ours) and every entry excluded."""
    kept = [*_without_filters(_without_deletions(options)), "--exclude=/*"]
    return [rsync, *kept, "--dirs", "--no-recursive", "--", source, dest]


def _without_deletions(options: Sequence[str]) -> list[str]:
    kept, skip = [], False
    for option in options:
        if skip:
            skip = False
        elif option.partition("=")[0] in _DELETE:
            skip = option == "--max-delete"  # its value is the next word
        else:
            kept.append(option)
    return kept


def _without_filters(options: Sequence[str]) -> list[str]:
    """`options` without a filter rule or a source of them (long options, their values, and the
    letters F, C and f with its value in a bundle of short options)."""
    out: list[str] = []
    skip = False
    for option in options:
        if skip:
            skip = False
        elif option.startswith("--"):
            name, eq, _ = option.partition("=")
            if name not in _FILTERS:
                out.append(option)
            else:
                skip = not eq and name != "--cvs-exclude"  # its value is the next word
        elif option.startswith("-") and len(option) > 1:
            kept = ""
            for i, letter in enumerate(option[1:], 1):
                if letter == "f":  # the rest of the bundle, or the next word, is its rule
                    skip = i == len(option) - 1
                    break
                if letter in _VALUE_SHORT:
                    kept += option[i:]
                    break
                if letter not in "FC":
                    kept += letter
            if kept:
                out.append("-" + kept)
        else:
            out.append(option)
    return out
