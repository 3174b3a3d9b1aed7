"""Stopping child processes, in one place: reading /proc (is this pid still the process we started,
is it a sync we started, who is in a process group), signalling a process group or a process (gone
already is fine), and the stop policy — TERM, a grace period, KILL — as a plain state machine that
a Twisted clock (`Stopper`, `GroupStopper`) and a polling loop (the sync supervisor) drive alike."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorTime

# How long a child stopped for its timeout (an exec command, a dry run) has between TERM and KILL.
KILL_GRACE = 2.0
# How long what is left of a process group may take to go once KILLed, before the end of what
# ran in it is recorded anyway (a process in uninterruptible sleep), and how often to look.
GROUP_GONE_WITHIN = 10.0
GROUP_POLL = 0.05
# The environment variable that marks a sync supervisor, and the rsync it starts, as the agent's:
# its value is the sync's run id. A record names pids; only this tag (with the pid's start time
# and owner) proves that one of them is a sync the agent started and may signal.
SYNC_TAG = "DEPLOY_SYNC_RUN"
MAX_ENVIRON = 1 << 20


# --------------------------------------------------------------------------- /proc


class ProcStat(NamedTuple):
    """The fields of /proc/PID/stat that tell who a process is. (Not a dataclass: the sync
    supervisor imports this module with every sync, and dataclasses cost ~10 ms to import.)"""

    pid: int
    state: str  # one letter: "Z" for a zombie (dead, not yet reaped)
    ppid: int
    pgid: int
    start_ticks: int  # start time in clock ticks since boot: with the pid, an identity

    @property
    def alive(self) -> bool:
        return self.state != "Z"


def read_stat(pid: int) -> ProcStat | None:
    """`pid`'s /proc/PID/stat, or None when there is no such process (or it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return ProcStat(
            pid, fields[0].decode("ascii"), int(fields[1]), int(fields[2]), int(fields[19])
        )
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def all_processes() -> list[ProcStat]:
    """Every process in /proc (zombies too)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = (read_stat(int(entry)) for entry in entries if entry.isdigit())
    return [stat for stat in found if stat is not None]


def proc_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    stat = read_stat(pid)
    return stat.start_ticks if stat is not None else None


def is_same_process(pid: int | None, start_ticks: int | None) -> bool:
    """True when `pid` runs and is the process that started at `start_ticks` (not a reused pid,
    not a zombie)."""
    if not pid or pid < 0 or start_ticks is None:
        return False
    stat = read_stat(pid)
    return stat is not None and stat.alive and stat.start_ticks == start_ticks


def process_uids(pid: int) -> tuple[int, ...] | None:
    """The real, effective, saved and file-system uids of `pid` (from /proc/PID/status, not the
    owner of /proc/PID, which a process that made itself undumpable shows as root)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read(65536)
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(b"Uid:"):
            try:
                return tuple(int(field) for field in line.split()[1:])
            except ValueError:
                return None
    return None


def carries_tag(pid: int, name: str, value: str) -> bool:
    """True when the environment `pid` was started with holds `name=value` exactly."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read(MAX_ENVIRON)
    except OSError:
        return False
    return f"{name}={value}".encode("utf-8", "surrogateescape") in environ.split(b"\0")


def is_our_sync(
    pid: int | None, start_ticks: int | None, run_id: str | None, owners: Collection[int]
) -> bool:
    """True when `pid` is a process of the sync `run_id` that this agent started: the same
    process (pid and start time), run by one of `owners` (every uid of it), and carrying the
    SYNC_TAG of that run in its environment. A record alone never proves this."""
    if not run_id or not is_same_process(pid, start_ticks):
        return False
    assert pid is not None
    uids = process_uids(pid)
    return (
        bool(uids)
        and all(uid in owners for uid in uids or ())
        and carries_tag(pid, SYNC_TAG, run_id)
        and is_same_process(pid, start_ticks)  # still the same one once its environ was read
    )


def process_group_pids(pgid: int) -> list[int]:
    """Every live (not zombie) pid in process group `pgid`, the leader first."""
    pids = [s.pid for s in all_processes() if s.pgid == pgid and s.alive]
    return sorted(pids, key=lambda p: (p != pgid, p))


def pipe_holders(inodes: Collection[int], *, since_ticks: int = 0) -> list[ProcStat]:
    """Every live process, started at or after `since_ticks`, that holds one of the pipes
    `inodes` open (its /proc/PID/fd): a process holding a child's output pipe was started by that
    child (or handed it), so it is the child's even after the child is gone."""
    wanted = {f"pipe:[{inode}]" for inode in inodes}
    holders = []
    for stat in all_processes():
        if not stat.alive or stat.start_ticks < since_ticks or stat.pid == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{stat.pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{stat.pid}/fd/{fd}")
            except OSError:
                continue
            if link in wanted:
                holders.append(stat)
                break
    return holders


def has_exited(pid: int) -> bool:
    """True once our child `pid` has exited. It is not reaped: its zombie keeps its pid, and so
    its process group id, from being reused until the caller reaps it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def trusted_uids(*more: int | None) -> frozenset[int]:
    """The uids whose files and processes the agent trusts: root, itself, and `more` (the user it
    is about to run as)."""
    return frozenset({0, os.geteuid(), *(uid for uid in more if uid is not None)})


# --------------------------------------------------------------------------- signals


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when there is no such group (gone already, or not
    made yet) or it is not ours to signal."""
    if pgid <= 1:  # 0 and -1 mean our own group and every process: never meant here
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def signal_pid(pid: int, sig: int) -> bool:
    """Send `sig` to the one process `pid`; False when it is gone or not ours to signal."""
    if pid <= 1:
        return False
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class ProcessTable:
    """The /proc look-ups and signals a job registry needs, behind one object so tests can give it
    a fake /proc. `owners` are the uids a sync of this agent may run as (root, and the user the
    agent runs as)."""

    def __init__(self, owners: Collection[int] | None = None) -> None:
        self.owners = frozenset(owners) if owners is not None else trusted_uids()

    def same(self, pid: int | None, start_ticks: int | None) -> bool:
        return is_same_process(pid, start_ticks)

    def ours(self, pid: int | None, start_ticks: int | None, run_id: str | None) -> bool:
        """`pid` is a process of the sync `run_id` that this agent started (is_our_sync)."""
        return is_our_sync(pid, start_ticks, run_id, self.owners)

    def group(self, pgid: int) -> list[int]:
        return process_group_pids(pgid)

    def signal(self, pid: int, sig: int) -> None:
        signal_pid(pid, sig)

    def signal_group(self, pgid: int, sig: int) -> None:
        signal_group(pgid, sig)


# --------------------------------------------------------------------------- the stop policy


class StopPolicy:
    """When to send what to stop a process: TERM at the request, KILL once `grace` seconds have
    passed (and again every `repeat` seconds after that, if given). Times are the caller's, so a
    reactor's clock and a polling loop drive it alike."""

    def __init__(self, grace: float, *, repeat: float | None = None) -> None:
        if repeat is not None and repeat <= 0:
            raise ValueError("repeat must be positive")
        self.grace = grace
        self.repeat = repeat
        self.requested_at: float | None = None
        self._term_sent = False
        self._kill_at: float | None = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def request(self, now: float, *, grace: float | None = None) -> None:
        """Ask for the stop at `now`. Asking again sends no second TERM; a shorter `grace` brings
        a KILL still to come closer (once what was stopped has exited, its leftovers need none)."""
        kill_at = now + (self.grace if grace is None else grace)
        if self.requested_at is None:
            self.requested_at = now
            self._kill_at = kill_at
        elif self._kill_at is not None and kill_at < self._kill_at:
            self._kill_at = kill_at

    def due(self, now: float) -> signal.Signals | None:
        """The signal to send at `now`: TERM first, then KILL once the grace has passed, each
        once (KILL once per `repeat`); None when nothing is due."""
        if self.requested_at is None:
            return None
        if not self._term_sent:
            self._term_sent = True
            return signal.SIGTERM
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = now + self.repeat if self.repeat else None
            return signal.SIGKILL
        return None

    def next_at(self) -> float | None:
        """When due() next has a signal to give; None when nothing is left to send."""
        if self.requested_at is None:
            return None
        if not self._term_sent:
            return self.requested_at
        return self._kill_at


class Stopper:
    """Drives a StopPolicy on a Twisted clock. `send(sig)` signals the target and answers whether
    there still was one: the stop ends when there is not, or at cancel(), which every path that
    ends the process must call (no DelayedCall is left behind)."""

    def __init__(
        self, clock: IReactorTime, policy: StopPolicy, send: Callable[[int], bool]
    ) -> None:
        self.clock = clock
        self.policy = policy
        self.send = send
        self._call: IDelayedCall | None = None
        self._over = False

    @property
    def requested(self) -> bool:
        """True once the stop was asked for (a timeout that fired, an rkill)."""
        return self.policy.requested

    def stop(self, *, grace: float | None = None) -> None:
        """TERM now, KILL once the grace has passed (sooner with a shorter `grace`)."""
        if self._over:
            return
        self.policy.request(self.clock.seconds(), grace=grace)
        self._run()

    def stop_after(self, delay: float) -> None:
        """stop() in `delay` seconds: a timeout."""
        self._unschedule()
        self._call = self.clock.callLater(delay, self.stop)

    def cancel(self) -> None:
        """Send nothing more: what was to be stopped has ended."""
        self._over = True
        self._unschedule()

    def _run(self) -> None:
        self._unschedule()
        now = self.clock.seconds()
        while (sig := self.policy.due(now)) is not None:
            if not self.send(sig):
                self.cancel()  # nothing left to stop
                return
        at = self.policy.next_at()
        if at is not None:
            self._call = self.clock.callLater(max(0.0, at - now), self._run)

    def _unschedule(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class GroupStopper(Stopper):
    """Stops the process group `pgid` that a child leads (it was started through `setsid`, so the
    group id is its pid, known at spawn: the transport forgets the pid once the leader exits, the
    group lives on while any member does). Given the child's transport as `leader`, a group not
    made yet (setsid has not run) or never made falls back to the leader alone while it is still
    our unreaped child."""

    def __init__(
        self,
        clock: IReactorTime,
        pgid: int | None,
        grace: float,
        *,
        leader: IProcessTransport | None = None,
    ) -> None:
        super().__init__(clock, StopPolicy(grace), self.signal)
        self.pgid = pgid
        self.leader = leader

    def signal(self, sig: int) -> bool:
        """Send `sig` to the group (else the leader alone); False when neither is there."""
        if self.pgid and signal_group(self.pgid, sig):
            return True
        pid = getattr(self.leader, "pid", None)
        return isinstance(pid, int) and signal_pid(pid, sig)
