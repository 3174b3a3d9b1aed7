"""What an order's `options` names: a group of the agent config or an inline
`REMOTE_SOURCE,/local/path`, resolved into the `RsyncTarget` it syncs, inside the writable-path
jail."""

from __future__ import annotations

from collections.abc import Mapping

from deploy.access import AllowedPaths
from deploy.config import RsyncGroup
from deploy.errors import InvalidTarget, UnknownGroup
from deploy.rsync import RsyncTarget

# rsync hands a `host:path` source to a remote shell (ssh), and before 3.2.4 (or with
# RSYNC_OLD_ARGS set) unescaped: these would start commands on that host.
_SHELL_SPECIAL = frozenset(";&|`$<>()")


def names_a_remote_host(source: str) -> bool:
    """rsync's own rule: `rsync://...`, or a `:` before any `/` (`HOST::MODULE`, `HOST:PATH`)."""
    if source.startswith("rsync://"):
        return True
    host, colon, _ = source.partition(":")
    return bool(colon and host and "/" not in host)


def group_state_dir(group: RsyncGroup | None) -> str | None:
    """Where the jobs of `group` keep their state: its `queue_path`, else the agent's default."""
    return group.queue_path if group is not None and group.queue_path else None


class TargetResolver:
    """Turns `options` into a target; raises InvalidTarget/UnknownGroup (400) or
    PathNotAllowed (403, a local path outside `allow::paths`)."""

    def __init__(self, groups: Mapping[str, RsyncGroup], allowed_paths: AllowedPaths) -> None:
        self.groups = groups
        self.allowed_paths = allowed_paths

    def resolve(self, options: str) -> tuple[RsyncTarget, RsyncGroup | None]:
        """`options` is a group name, or inline `REMOTE_SOURCE,/local/path`."""
        if "," in options:
            dest, _, src = options.partition(",")
            dest, src = dest.strip(), src.strip()
            if not dest or not src:
                raise InvalidTarget("empty value in options!")
            if (
                dest.startswith("-")
                or any(ord(c) < 32 or ord(c) == 127 for c in dest)
                or not _SHELL_SPECIAL.isdisjoint(dest)
            ):
                raise InvalidTarget(f"bad remote source {dest!r}")
            if not names_a_remote_host(dest):
                # A local source would let a request copy any file the agent can read (its
                # /etc) into an allowed directory: only the config may name one.
                raise InvalidTarget(
                    f"bad remote source {dest!r}: name a host "
                    "(HOST::MODULE/path, rsync://HOST/MODULE/path or HOST:path)"
                )
            group = None
            target = RsyncTarget(dest=dest, src=src)
        else:
            group = self.groups.get(options)
            if group is None:
                raise UnknownGroup(options)
            target = RsyncTarget(
                dest=group.dest,
                src=group.src,
                rsync=group.rsync,
                rsh=group.rsh,
                options=tuple(group.options) if group.options is not None else None,
                excludes=tuple(group.excludes),
                includes=tuple(group.includes),
                max_delete=group.max_delete,
            )
        self.allowed_paths.check(target.src)
        return target, group
