"""Host allow lists (IPv4/IPv6 addresses, CIDR networks, host names) and the writable-path jail
(paths resolved with realpath before the check, so no ``..`` or symlink escapes)."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Longer than PATH_MAX is never a path we could write to.
MAX_PATH_LENGTH = 4096


class PathNotAllowed(Exception):
    """A local path is outside every allowed root; the message is what the user reads."""

    def __init__(self, path: str, why: str = "") -> None:
        super().__init__(f"{path} is not allowed!" + (f" ({why})" if why else ""))
        self.path = path


def _resolve_name(name: str) -> list[str]:
    """Every address ``name`` resolves to, or an empty list."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


def _strip_scope(text: str) -> str:
    return text.partition("%")[0]


def _unmap(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network (``::ffff:a.b.c.d/n``, n >= 96) as the IPv4 network it is."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _unmap_address(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AllowedHosts:
    """Which peer addresses may talk to a daemon.

    Entries are addresses, CIDR networks or host names; names are resolved once, here, so a
    lookup never blocks the reactor later. Names that do not resolve are listed in
    ``unresolved`` for the caller to log, and allow nothing.
    """

    def __init__(
        self,
        entries: Iterable[str],
        *,
        resolve: Callable[[str], list[str]] | None = None,
    ) -> None:
        if resolve is None:
            resolve = _resolve_name
        self.networks: list[IPNetwork] = []
        self.unresolved: list[str] = []
        for entry in entries:
            entry = entry.strip()
            if not entry:
                continue
            try:
                network = ipaddress.ip_network(_strip_scope(entry), strict=False)
            except ValueError:
                pass
            else:
                self.networks.append(_unmap(network))
                continue
            try:
                addresses = resolve(entry)
            except (OSError, UnicodeError):
                addresses = []
            found = False
            for address in addresses:
                try:
                    parsed = ipaddress.ip_address(_strip_scope(address))
                except ValueError:
                    continue
                self.networks.append(_unmap(ipaddress.ip_network(parsed)))
                found = True
            if not found:
                self.unresolved.append(entry)
        # version -> {prefix length -> network bits}: a check is one set lookup per distinct
        # prefix length (at most 33 or 129), however many entries there are.
        self._table: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        for network in self.networks:
            shift = network.max_prefixlen - network.prefixlen
            by_length = self._table[network.version]
            by_length.setdefault(shift, set()).add(int(network.network_address) >> shift)

    def allows(self, address: str) -> bool:
        """Whether a peer at ``address`` (as the transport reports it) is allowed."""
        if not isinstance(address, str):
            return False
        try:
            parsed = _unmap_address(ipaddress.ip_address(_strip_scope(address)))
        except ValueError:
            return False
        value = int(parsed)
        for shift, prefixes in self._table[parsed.version].items():
            if value >> shift in prefixes:
                return True
        return False


def _components(path: str) -> list[str] | None:
    """The names in an absolute path, without empty and ``.`` ones; None if it has ``..``."""
    names = [name for name in path.split("/") if name not in ("", ".")]
    if ".." in names:
        return None
    return names


def is_within(path: str, root: str) -> bool:
    """Whether absolute ``path`` is ``root`` or below it, comparing whole components.

    Purely lexical: resolve both first. A path or root with ``..`` is never within anything.
    """
    if not (path.startswith("/") and root.startswith("/")):
        return False
    path_names = _components(path)
    root_names = _components(root)
    if path_names is None or root_names is None:
        return False
    return path_names[: len(root_names)] == root_names


def _has_control_character(path: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in path)


class AllowedPaths:
    """The local directories a request may write into (``[allow::paths]``)."""

    def __init__(self, paths: Iterable[str]) -> None:
        roots = []
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f"allowed path must be absolute: {path!r}")
            roots.append(os.path.realpath(path))
        self.roots: tuple[str, ...] = tuple(roots)

    def check(self, path: str) -> str:
        """The resolved form of ``path`` if it lies inside an allowed root; else PathNotAllowed.

        Existing components are resolved with realpath, symlinks included; components that do not
        exist yet are appended as they are and may not contain ``..`` (one of them could later be
        created as a symlink, so ``..`` after it cannot be judged now).
        """
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or len(path) > MAX_PATH_LENGTH
            or _has_control_character(path)
        ):
            raise PathNotAllowed(str(path))
        try:
            resolved = self._resolve(path)
        except (OSError, ValueError):
            resolved = None
        if resolved is not None:
            for root in self.roots:
                if is_within(resolved, root):
                    return resolved
        raise PathNotAllowed(path)

    @staticmethod
    def _resolve(path: str) -> str | None:
        # Walk up to the deepest ancestor that exists. lexists, not exists: a dangling symlink
        # must be resolved by realpath to where it points, not treated as a new plain name.
        os.fsencode(path)  # ValueError for a name the file system encoding cannot hold
        existing = path
        missing: list[str] = []
        while not os.path.lexists(existing):
            parent, name = os.path.split(existing)
            if parent == existing:
                return None
            existing = parent
            missing.append(name)
        missing.reverse()
        names = [name for name in missing if name not in ("", ".")]
        if ".." in names:
            return None
        return os.path.join(os.path.realpath(existing), *names)
