"""What an order's `options` names: a group of the agent config or an inline
`REMOTE_SOURCE,/local/path`, resolved into the `RsyncTarget` it syncs: the local path inside the
writable-path jail, the inline source one the config allows."""

from __future__ import annotations

import os
from collections.abc import Mapping

from deploy.access import AllowedPaths
from deploy.config import RsyncGroup
from deploy.errors import InvalidTarget, UnknownGroup
from deploy.release_layout import default_releases_path
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
        if group is None:
            self._refuse_release_tree(target.src)
        return target, group

    def _refuse_release_tree(self, src: str) -> None:
        """An inline target may not be a release-mode group's live path or lie inside its
        releases: an in-place sync there would write into a live (or kept) release."""
        local = os.path.realpath(src)
        for name, group in self.groups.items():
            if group.releases is None:
                continue
            live = os.path.normpath(group.src)
            managed = (
                os.path.join(os.path.realpath(os.path.dirname(live)), os.path.basename(live)),
                os.path.realpath(group.releases_path or default_releases_path(group.src)),
            )
            if any(local == m or local.startswith(m.rstrip("/") + "/") for m in managed):
                raise InvalidTarget(
                    f"{src} is managed by release-mode group {name!r}: order the group instead"
                )
