"""What an order's `options` names: a group of the agent config or an inline
`REMOTE_SOURCE,/local/path`, resolved into the `RsyncTarget` it syncs: the local path inside the
writable-path jail, the inline source one the config allows."""

from __future__ import annotations

from collections.abc import Mapping

from deploy.access import AllowedPaths
from deploy.config import RsyncGroup
from deploy.errors import InvalidTarget, UnknownGroup
from deploy.rsync import RsyncTarget
from deploy.sources import AllowedSources, RemoteSource

# rsync hands a `host:path` source to a remote shell (ssh), and before 3.2.4 (or with
# RSYNC_OLD_ARGS set) unescaped: these would start commands on that host.
_SHELL_SPECIAL = frozenset(";&|`$<>()")


def names_a_remote_host(source: str) -> bool:
    """rsync's own rule: `rsync://...`, or a `:` before any `/` (`HOST::MODULE`, `HOST:PATH`),
    with a well-formed host (and user) part."""
    try:
        RemoteSource.parse(source)
    except ValueError:
        return False
    return True


def group_state_dir(group: RsyncGroup | None) -> str | None:
    """Where the jobs of `group` keep their state: its `queue_path`, else the agent's default."""
    return group.queue_path if group is not None and group.queue_path else None


class TargetResolver:
    """Turns `options` into a target; raises InvalidTarget/UnknownGroup (400) or
    PathNotAllowed (403: a local path outside `allow::paths`, an inline source the config does
    not allow)."""

    def __init__(
        self,
        groups: Mapping[str, RsyncGroup],
        allowed_paths: AllowedPaths,
        sources: AllowedSources | None = None,
    ) -> None:
        self.groups = groups
        self.allowed_paths = allowed_paths
        self.sources = sources if sources is not None else AllowedSources(())

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
            try:
                # Only a host may be named: a local source would let a request copy any file
                # the agent can read (its /etc) into an allowed directory.
                self.sources.check(dest)
            except ValueError as e:
                raise InvalidTarget(f"bad remote source {dest!r}: {e}") from None
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
