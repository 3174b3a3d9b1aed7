"""rsync argv building (no shell) and the ProcessProtocol streaming rsync's output into the
parser of `deploy.rsync_output` (re-exported here), keeping the tail of its stderr."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport
from twisted.python.failure import Failure

from deploy.rsync_output import (  # noqa: F401  (re-exported: the parser's public names)
    OTHER_LINES_KEPT,
    Progress,
    RsyncOutputParser,
    RsyncStats,
    TailBuffer,
    display_name,
    rsync_environment,
    unescape_name,
)

DEFAULT_FLAGS: tuple[str, ...] = ("--archive", "--delete", "--force")
# TCP_NODELAY on a daemon connection (rsync ignores it otherwise): rsync's small exchanges (the
# start of a session, a short file list) are not held back by Nagle's algorithm waiting for a
# delayed ACK, ~40 ms a time on loopback; a two-pass release sync's second run is such a session.
# Bulk transfers measured the same with it and without.
FORCED_FLAGS: tuple[str, ...] = ("--stats", "--itemize-changes", "--sockopts=TCP_NODELAY")


@dataclass(frozen=True)
class RsyncTarget:
    """One sync: pull the remote `dest` into the local directory `src` (the original's naming)."""

    dest: str
    src: str
    rsync: str = "rsync"
    rsh: str | None = None
    options: tuple[str, ...] | None = None
    excludes: tuple[str, ...] = ()
    includes: tuple[str, ...] = ()
    max_delete: int | None = None

    @property
    def checksum(self) -> str:
        """The job id, as the original computes it: md5hex(dest + src)."""
        return hashlib.md5((self.dest + self.src).encode("utf-8")).hexdigest()


def _check_path(kind: str, value: str) -> None:
    if not value:
        raise ValueError(f"rsync {kind} must not be empty")
    if value.startswith("-"):
        raise ValueError(f"rsync {kind} must not start with '-': {value!r}")


def build_argv(target: RsyncTarget, *, dry_run: bool, progress: bool = False) -> list[str]:
    """The rsync command line for `target`, as an argv list for spawnProcess (never a shell)."""
    _check_path("source (dest)", target.dest)
    _check_path("destination (src)", target.src)
    argv = [target.rsync, *FORCED_FLAGS]
    argv.extend(DEFAULT_FLAGS if target.options is None else target.options)
    if dry_run:
        argv.append("--dry-run")
    if progress:
        argv.append("--info=progress2")
    if target.rsh:
        argv.append(f"--rsh={target.rsh}")
    if target.max_delete is not None:
        argv.append(f"--max-delete={target.max_delete}")
    argv.extend(f"--include={pattern}" for pattern in target.includes)
    argv.extend(f"--exclude={pattern}" for pattern in target.excludes)
    # rsync 3.x (checked with 3.5.0) accepts "--" before host::, rsync:// and local paths;
    # it is a second fence, after the leading "-" check, against option injection.
    argv.extend(("--", target.dest, target.src))
    return argv


@dataclass
class RsyncResult:
    """How an rsync child ended, with its parsed stdout and the tail of its stderr."""

    exit_code: int | None
    signal: int | None
    parser: RsyncOutputParser
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class RsyncProcessProtocol(protocol.ProcessProtocol):
    """Thin: forwards stdout to the parser, stderr to a TailBuffer; fires `self.ended`
    (a Deferred[RsyncResult]) once in processEnded."""

    def __init__(self, parser: RsyncOutputParser, stderr_limit: int = 8192) -> None:
        self.parser = parser
        self.stderr = TailBuffer(stderr_limit)
        self.ended: Deferred[RsyncResult] = Deferred()
        self._ended = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.parser.feed(data)
        elif childFD == 2:
            self.stderr.feed(data)

    def processEnded(self, reason: Failure) -> None:
        if self._ended:
            return
        self._ended = True
        self.parser.close()
        value: Any = reason.value
        result = RsyncResult(
            exit_code=getattr(value, "exitCode", None),
            signal=getattr(value, "signal", None),
            parser=self.parser,
            stderr=self.stderr.text(),
        )
        self.ended.callback(result)


def run_rsync(
    reactor: Any,
    argv: list[str],
    parser: RsyncOutputParser,
    *,
    env: dict[str, str] | None = None,
) -> tuple[RsyncProcessProtocol, IProcessTransport]:
    """Spawn rsync (no shell, no PTY) streaming stdout into `parser`; stdin is closed."""
    if not argv:
        raise ValueError("rsync argv is empty")
    executable = shutil.which(argv[0])
    if executable is None:
        raise FileNotFoundError(f"rsync executable {argv[0]!r} not found or not executable")
    proto = RsyncProcessProtocol(parser)
    transport = reactor.spawnProcess(
        proto,
        executable,
        list(argv),
        env=rsync_environment() if env is None else env,
        usePTY=False,
        childFDs={0: "w", 1: "r", 2: "r"},
    )
    transport.closeStdin()
    return proto, transport


__all__ = [
    "DEFAULT_FLAGS",
    "FORCED_FLAGS",
    "Progress",
    "RsyncOutputParser",
    "RsyncProcessProtocol",
    "RsyncResult",
    "RsyncStats",
    "RsyncTarget",
    "TailBuffer",
    "build_argv",
    "run_rsync",
    "unescape_name",
]
