"""The `exec` order: looking a command up in the jobs file by its exact name, turning the template
and the caller's arguments into an argv (never a shell), and running it with a timeout and a cap
on the output kept; the answer comes when the command exits, whatever it left running."""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.python.failure import Failure

from deploy.process import (
    KILL_GRACE,
    GroupStopper,
    ProcStat,
    pipe_holders,
    proc_start_ticks,
    read_stat,
    signal_group,
    signal_pid,
)

MAX_OUTPUT = 1024 * 1024
MAX_ARGS = 32
MAX_ARG_LENGTH = 4096
# How long output is still read once the command has exited: what it started may still be
# writing; a child that keeps the pipe open longer (a daemon that kept its starter's stdout)
# is not waited for.
OUTPUT_DRAIN = 1.0

SAFE_FORM = "sh -c 'echo hello \"$1\"' sh %s"


class CommandError(Exception):
    """An exec order that cannot run; the message is what the caller reads (HTTP 400)."""


def template_problem(template: str) -> str | None:
    """Why `template` may not be a jobs-file command, or None. A `%s` must be a whole argv
    element: inside a longer one (`sh -c 'echo hello %s'`) the arguments would be re-read by
    whatever reads that string — a shell splits, globs and `~`-expands them."""
    try:
        tokens = shlex.split(template)
    except ValueError:
        return None  # build_command names the broken template when the job is asked for
    for token in tokens:
        if token != "%s" and any("%s" in piece for piece in token.split("%%")):
            return (
                f"%s inside the argument {token!r} would let a shell (or whatever reads it) "
                "re-split, glob and ~-expand the arguments; make %s an argument of its own "
                f"and pass it as a positional parameter: {SAFE_FORM}"
            )
    return None


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
    problem = template_problem(template)
    if problem is not None:
        # The config loader refuses such a template; a jobs mapping made elsewhere gets the same.
        raise CommandError(f"exec[{name}]: {problem}")
    argv: list[str] = []
    placed = False
    for token in tokens:
        if token == "%s":
            argv.extend(args)
            placed = True
        else:
            # `%%` is a literal `%`, as in the original's sprintf templates (`date +%%s`).
            argv.append(token.replace("%%", "%"))
    if args and not placed:
        raise CommandError(f"exec[{name}] takes no arguments")
    return name, argv


# What a shell would act on. No shell runs our commands, but a jobs file carried over from the
# original (whose templates ran in a shell) may wrap one in `sh -c '... "$1"' sh %s`.
SHELL_SPECIAL = frozenset(";&|`$<>()")


def unsafe_character(text: str) -> str | None:
    """The first character of `text` that may not reach a command or a log line as it is: C0
    and C1 controls, DEL, bidi overrides and isolates (U+202A–U+202E, U+2066–U+2069: they
    reorder what a terminal shows) and the line and paragraph separators U+2028/U+2029."""
    for c in text:
        o = ord(c)
        if (
            o < 0x20
            or 0x7F <= o <= 0x9F
            or 0x202A <= o <= 0x202E
            or 0x2066 <= o <= 0x2069
            or o in (0x2028, 0x2029)
        ):
            return c
    return None


def check_argument(name: str, arg: str) -> None:
    """An argument may not be an option, carry control characters (a newline was the old
    system's command injection) or shell syntax."""
    if len(arg) > MAX_ARG_LENGTH:
        raise CommandError(f"exec[{name}]: argument longer than {MAX_ARG_LENGTH} characters")
    if arg.startswith("-"):
        raise CommandError(f"exec[{name}]: argument {arg!r} may not start with '-'")
    bad = unsafe_character(arg)
    if bad is not None:
        raise CommandError(
            f"exec[{name}]: argument {arg!r} holds a control character (U+{ord(bad):04X})"
        )
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
    # pids that still held the command's output when it had exited and the drain was over
    left_running: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class CommandStopper(GroupStopper):
    """Stops a command at its timeout: TERM to its process group, KILL after a grace. While the
    command (the group's leader) is our unreaped child, its pid is the group's id. Once it is
    reaped that id could in time name another group, so only what provably is the command's is
    signalled: the processes that still hold its output pipes (`leftovers`) — their group when
    they are still in the command's, else each alone."""

    def __init__(
        self,
        clock: IReactorTime,
        transport: IProcessTransport,
        grace: float,
        leftovers: Callable[[], list[ProcStat]],
    ) -> None:
        super().__init__(clock, transport.pid, grace, leader=transport)
        self.leftovers = leftovers

    def signal(self, sig: int) -> bool:
        if getattr(self.leader, "pid", None) is not None:
            return super().signal(sig)
        sent = False
        group_done = False
        for held in self.leftovers():
            now = read_stat(held.pid)
            if now is None or not now.alive or now.start_ticks != held.start_ticks:
                continue  # gone, or its pid reused
            if now.pgid == self.pgid:
                if not group_done:
                    group_done = True
                    sent = signal_group(now.pgid, sig) or sent
            else:
                sent = signal_pid(now.pid, sig) or sent
        return sent


class CommandProcess(protocol.ProcessProtocol):
    """Collects a command's stdout and stderr (merged, capped) and fires `ended` once: when all
    output is read, or `drain` seconds after the command exited, when whatever it started that
    still holds the pipes is no longer read (and, given a timeout, still stopped at it)."""

    def __init__(
        self,
        argv: list[str],
        clock: IReactorTime,
        limit: int = MAX_OUTPUT,
        drain: float = OUTPUT_DRAIN,
    ) -> None:
        self.argv = argv
        self.clock = clock
        self.limit = limit
        self.drain = drain
        self.output = bytearray()
        self.truncated = False
        self.stopper: CommandStopper | None = None
        self.left_running: list[int] = []
        self.ended: defer.Deferred[CommandResult] = defer.Deferred()
        self._pipes: list[int] = []
        self._started = 0
        self._leftovers: list[ProcStat] | None = None
        self._drain_call: IDelayedCall | None = None

    def spawned(self, transport: IProcessTransport, timeout: float) -> None:
        """Remember what identifies the command's output pipes and its start; arm the timeout."""
        pipes: dict[int, Any] = getattr(transport, "pipes", {})
        for fd in (1, 2):
            if fd in pipes:
                self._pipes.append(os.fstat(pipes[fd].fileno()).st_ino)
        if transport.pid:
            self._started = proc_start_ticks(transport.pid) or 0
        if timeout > 0:
            self.stopper = CommandStopper(self.clock, transport, KILL_GRACE, self.leftovers)
            self.stopper.stop_after(timeout)

    def leftovers(self) -> list[ProcStat]:
        """The processes that hold the command's output pipes, found once the command is gone."""
        if self._leftovers is None:
            self._leftovers = pipe_holders(self._pipes, since_ticks=self._started)
        return self._leftovers

    def _collect(self, data: bytes) -> None:
        room = self.limit - len(self.output)
        if room > 0:
            self.output += data[:room]
        if len(data) > room:
            self.truncated = True

    outReceived = _collect
    errReceived = _collect

    def processExited(self, reason: Failure) -> None:
        self._drain_call = self.clock.callLater(self.drain, self._stop_reading)

    def _stop_reading(self) -> None:
        self._drain_call = None
        self.left_running = [held.pid for held in self.leftovers()]
        if self.transport is not None:
            self.transport.loseConnection()  # processEnded follows, with the command's status

    def processEnded(self, reason: Failure) -> None:
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if isinstance(value, error.ProcessDone):
            code = 0
        timed_out = False
        if self.stopper is not None:
            timed_out = self.stopper.requested
            if not self.left_running:
                self.stopper.cancel()
            # else the stop goes on (or comes at the timeout) for what was left running
        self.ended.callback(
            CommandResult(
                self.argv,
                code,
                sig,
                bytes(self.output),
                self.truncated,
                timed_out,
                self.left_running,
            )
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
    drain: float = OUTPUT_DRAIN,
) -> defer.Deferred[CommandResult]:
    """Run `argv` (no shell) on `reactor` (which is also the clock); answer when it has exited
    and its output is read (at most `drain` seconds later); on `timeout` (> 0) TERM its process
    group, KILL after a grace."""
    clock: IReactorTime = reactor  # type: ignore[assignment]
    proto = CommandProcess(argv, clock, limit, drain)
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
    proto.spawned(transport, timeout)
    return proto.ended
