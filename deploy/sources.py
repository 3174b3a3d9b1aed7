"""Inline rsync sources a request may name (`[user@]HOST::MODULE/path`,
`rsync://[user@]HOST[:PORT]/MODULE/path`, `[user@]HOST:path`): parsing them as rsync does, the
checks every host part gets, and the `[allow::sources]` rules that limit them."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from deploy.access import PathNotAllowed, is_within

DAEMON = "daemon"  # HOST::MODULE or rsync://: rsync talks to an rsync daemon
REMOTE_SHELL = "remote-shell"  # HOST:path: rsync starts the remote shell (ssh) to reach HOST

# A host name (or IPv4 address) as ssh and rsync read it: never an option (`-oProxyCommand=...`),
# nothing a shell or ssh's `%` tokens would read more into.
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")
NAME_A_HOST = "name a host (HOST::MODULE/path, rsync://HOST/MODULE/path or HOST:path)"
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
# rsync's rule for a remote source: a `:` before any `/` (`[user@]HOST::` or `[user@]HOST:`)
_HOST_SPEC = re.compile(r"(?:(?P<user>[^@:/]*)@)?(?P<host>\[[^\]/]*\]|[^:/\[\]@]*)(?P<sep>::?)")


class SourceNotAllowed(PathNotAllowed):
    """An inline source this agent's config does not allow (403)."""


def check_host(text: str) -> str:
    """`text` as a host: a name, an IPv4 address or a [bracketed] IPv6 address (answered
    without brackets); else ValueError."""
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise ValueError(f"bad IPv6 address {text!r}") from None
    if not _NAME.match(text):
        raise ValueError(f"bad host {text!r}")
    return text


@dataclass(frozen=True)
class RemoteSource:
    """A parsed inline source; `module` is set for daemon sources, `path` is what follows."""

    kind: str
    host: str
    user: str | None = None
    module: str | None = None
    path: str = ""

    @classmethod
    def parse(cls, source: str) -> RemoteSource:
        """The source as rsync reads it; ValueError when it names no host or a bad one."""
        if source.startswith("rsync://"):
            authority, _, tail = source[len("rsync://") :].partition("/")
            user, at, hostport = authority.rpartition("@")
            host, port = hostport, ""
            if hostport.startswith("["):
                end = hostport.find("]") + 1
                host, port = hostport[:end], hostport[end:]
            elif ":" in hostport:
                host, _, port = hostport.partition(":")
                port = ":" + port
            if port and not (port[1:].isascii() and port[1:].isdigit()):
                raise ValueError(f"bad port in {source!r}")
            module, _, path = tail.partition("/")
            return cls(DAEMON, check_host(host), _user(user if at else None), module, path)
        match = _HOST_SPEC.match(source)
        if match is None or not match["host"]:
            raise ValueError(NAME_A_HOST)
        host = check_host(match["host"])
        login = _user(match["user"])
        rest = source[match.end() :]
        if match["sep"] == "::":
            module, _, path = rest.partition("/")
            return cls(DAEMON, host, login, module, path)
        return cls(REMOTE_SHELL, host, login, None, rest)


def _user(user: str | None) -> str | None:
    """The user part before `@` gets the checks a host gets: never an option, plain text."""
    if user is None:
        return None
    if not _USER.match(user):
        raise ValueError(f"bad user {user!r}")
    return user


@dataclass(frozen=True)
class SourceRule:
    """One `[allow::sources]` entry: a host name, an address or network (matching sources that
    name an address inside it: names are not resolved, rsync would resolve them again), or
    `HOST::MODULE[/path]` (daemon sources of that module, at or below that path)."""

    host: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    module: str | None = None
    path: str = ""

    @classmethod
    def parse(cls, entry: str) -> SourceRule:
        if "::" in entry.strip("[]") and "@" not in entry and not _is_network(entry):
            source = RemoteSource.parse(entry)
            if source.kind != DAEMON or not source.module:
                raise ValueError(f"{entry!r}: write HOST::MODULE or HOST::MODULE/path")
            if ".." in source.path.split("/"):
                raise ValueError(f"{entry!r}: a path with '..'")
            return cls(host=source.host.lower(), module=source.module, path=source.path)
        if _is_network(entry):
            return cls(network=ipaddress.ip_network(entry, strict=False))
        try:
            return cls(host=check_host(entry).lower())
        except ValueError:
            raise ValueError(
                f"{entry!r} is not a host name, an address, a network or HOST::MODULE"
            ) from None

    def allows(self, source: RemoteSource) -> bool:
        if self.network is not None:
            try:
                address = ipaddress.ip_address(source.host)
            except ValueError:
                return False
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            return address.version == self.network.version and address in self.network
        if source.host.lower() != self.host:
            return False
        if self.module is None:
            return True
        return (
            source.kind == DAEMON
            and source.module == self.module
            and is_within("/" + source.path, "/" + self.path)
        )


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


class AllowedSources:
    """The inline sources a request may name: any (with `[allow::sources]` empty) or those a
    rule allows; a remote-shell source only with `allow_remote_shell`."""

    def __init__(self, entries: Iterable[str], *, allow_remote_shell: bool = False) -> None:
        self.rules = [SourceRule.parse(entry) for entry in entries]
        self.allow_remote_shell = allow_remote_shell

    def check(self, text: str) -> RemoteSource:
        """The parsed source; ValueError (a bad source) or SourceNotAllowed (403)."""
        source = RemoteSource.parse(text)
        if source.kind == REMOTE_SHELL and not self.allow_remote_shell:
            raise SourceNotAllowed(
                text,
                "a HOST:path source runs the remote shell (ssh) as the agent's user; "
                "allow_inline_remote_shell = true in [server] allows it",
            )
        if self.rules and not any(rule.allows(source) for rule in self.rules):
            raise SourceNotAllowed(text, "it is not in [allow::sources]")
        return source
