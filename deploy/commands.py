"""The `exec` order: looking a command up in the jobs file by its exact name, turning the template
and the caller's arguments into an argv (never a shell), and running it with a timeout and a cap
on the output kept."""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.python.failure import Failure

from deploy.process import KILL_GRACE, GroupStopper

MAX_OUTPUT = 1024 * 1024
MAX_ARGS = 32
MAX_ARG_LENGTH = 4096


class CommandError(Exception):
    """An exec order that cannot run; the message is what the caller reads (HTTP 400)."""


def build_command(jobs: Mapping[str, str], options: str) -> tuple[str, list[str]]:
    """`NAME,arg1,arg2` → (NAME, argv). NAME must equal a jobs-file key exactly."""
    name, *args = options.split(",")
    template = jobs.get(name)
    if template is None:
        raise CommandError(f"exec[{name}] not found!")
    if len(args) > MAX_ARGS:
        raise CommandError(f"exec[{name}]: more than {MAX_ARGS} arguments")
    for arg in args:
        check_argument(name, arg)
    args = [a for a in args if a != ""]
    try:
        tokens = shlex.split(template)
    except ValueError as e:
        raise CommandError(f"exec[{name}]: bad command template in the jobs file: {e}") from None
    if not tokens:
        raise CommandError(f"exec[{name}]: empty command in the jobs file")
    argv: list[str] = []
    placed = False
    for token in tokens:
        if token == "%s":
            argv.extend(args)
            placed = True
        elif "%" in token:
            # `%%` is a literal `%`, as in the original's sprintf templates (`date +%%s`).
            pieces = token.split("%%")
            placed = placed or any("%s" in piece for piece in pieces)
            argv.append("%".join(piece.replace("%s", " ".join(args)) for piece in pieces))
        else:
            argv.append(token)
    if args and not placed:
        raise CommandError(f"exec[{name}] takes no arguments")
    return name, argv


# What a shell would act on. No shell runs our commands, but a jobs file carried over from the
# original (whose templates ran in a shell) may wrap one in `sh -c '... %s'`.
SHELL_SPECIAL = frozenset(";&|`$<>()")


def check_argument(name: str, arg: str) -> None:
    """An argument may not be an option, carry control characters (a newline was the old
    system's command injection) or shell syntax."""
    if len(arg) > MAX_ARG_LENGTH:
        raise CommandError(f"exec[{name}]: argument longer than {MAX_ARG_LENGTH} characters")
    if arg.startswith("-"):
        raise CommandError(f"exec[{name}]: argument {arg!r} may not start with '-'")
    if any(ord(c) < 32 or ord(c) == 127 for c in arg):
        raise CommandError(f"exec[{name}]: argument {arg!r} holds a control character")
    if not SHELL_SPECIAL.isdisjoint(arg):
        special = "".join(sorted(SHELL_SPECIAL))
        raise CommandError(f"exec[{name}]: argument {arg!r} holds shell syntax (one of {special})")


@dataclass
class CommandResult:
    argv: list[str]
    exit_code: int | None
    signal: int | None
    output: bytes
    truncated: bool
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class CommandProcess(protocol.ProcessProtocol):
    """Collects a command's stdout and stderr (merged, capped) and fires `ended` once; its end
    ends the stop of a command that timed out."""

    def __init__(self, argv: list[str], limit: int = MAX_OUTPUT) -> None:
        self.argv = argv
        self.limit = limit
        self.output = bytearray()
        self.truncated = False
        self.stopper: GroupStopper | None = None
        self.ended: defer.Deferred[CommandResult] = defer.Deferred()

    def _collect(self, data: bytes) -> None:
        room = self.limit - len(self.output)
        if room > 0:
            self.output += data[:room]
        if len(data) > room:
            self.truncated = True

    outReceived = _collect
    errReceived = _collect

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if isinstance(value, error.ProcessDone):
            code = 0
        timed_out = False
        if self.stopper is not None:
            self.stopper.cancel()
            timed_out = self.stopper.requested
        self.ended.callback(
            CommandResult(self.argv, code, sig, bytes(self.output), self.truncated, timed_out)
        )


def group_leader_prefix() -> list[str]:
    """`setsid` puts a child in its own process group (spawnProcess cannot), so a timeout can
    stop everything the command started."""
    path = shutil.which("setsid")
    return [path] if path else []


def run_command(
    reactor: IReactorProcess,
    argv: list[str],
    *,
    timeout: float = 0.0,
    env: Mapping[str, str] | None = None,
    prefix: list[str] | None = None,
    limit: int = MAX_OUTPUT,
) -> defer.Deferred[CommandResult]:
    """Run `argv` (no shell) on `reactor` (which is also the clock); on `timeout` (> 0) TERM its
    process group, KILL after a grace."""
    proto = CommandProcess(argv, limit)
    full = [*(prefix if prefix is not None else group_leader_prefix()), *argv]
    executable = full[0]
    if not os.path.isabs(executable):
        found = shutil.which(executable)
        if found is None:
            return defer.fail(CommandError(f"command not found: {executable}"))
        executable = found
    try:
        transport = reactor.spawnProcess(
            proto,
            executable,
            full,
            env=dict(env if env is not None else os.environ),
            usePTY=False,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
    except OSError as e:
        return defer.fail(CommandError(f"cannot run {argv[0]}: {e}"))
    transport.closeStdin()
    if timeout and timeout > 0:
        clock: IReactorTime = reactor  # type: ignore[assignment]
        proto.stopper = GroupStopper(clock, transport.pid, KILL_GRACE, leader=transport)
        proto.stopper.stop_after(timeout)
    return proto.ended
