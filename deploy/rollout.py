"""A rollout as a plain state machine: given what happened to each host, it says which hosts to
start next, when to check the canaries, which hosts to roll back and when the rollout is over.
No reactor, no I/O: the client and the proxy drive it with their own Deferreds and clocks.

The rules it owns: hosts go in batches, and a batch starts only once every host of the batch
before is done (not merely answered); the failure budget is cumulative over the whole rollout
and every kind of failure counts (a failed step, unreachable, timed out, check failed, busy);
once it is spent no new batch starts, the hosts not started are skipped, and — when rolling
back — every host this rollout switched is rolled back once the hosts still running are done.
A canary batch must pass whole, and pass its check again after the canary wait."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from deploy.orders import parse_budget

# A host's outcome as the driver reports it.
OK = "ok"
FAILED = "failed"
UNREACHABLE = "unreachable"
TIMED_OUT = "timed_out"
CHECK_FAILED = "check_failed"
BUSY = "busy"
FAILURES = frozenset({FAILED, UNREACHABLE, TIMED_OUT, CHECK_FAILED, BUSY})
# Outcomes the machine itself gives.
SKIPPED = "skipped"
ROLLED_BACK = "rolled_back"
ROLLBACK_FAILED = "rollback_failed"

# The rollout's own phase.
RUNNING = "running"
CANARY_WAIT = "canary_wait"
STOPPING = "stopping"  # the budget is spent: waiting for the hosts still running
ROLLING_BACK = "rolling_back"
DONE = "done"


@dataclass(frozen=True)
class Start:
    """Start these hosts (each: stage, wait for its sync, activate, check)."""

    hosts: tuple[str, ...]


@dataclass(frozen=True)
class CheckCanaries:
    """Wait the canary time, run the check on these hosts again, then call `canaries_checked`."""

    hosts: tuple[str, ...]


@dataclass(frozen=True)
class RollBack:
    """Roll these hosts back to the release they had before; report each with `rolled_back`."""

    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Finished:
    """The rollout is over; `stopped` says whether it stopped early (its budget, its canary)."""

    stopped: bool
    reason: str


Action = Start | CheckCanaries | RollBack | Finished


@dataclass
class HostState:
    host: str
    outcome: str | None = None  # None: not started, or still running
    started: bool = False
    switched: bool = False  # this rollout switched the host's live release
    message: str = ""


@dataclass
class Rollout:
    """One rollout over `hosts`. `batch`/`max_fail` are `N` or `N%` (of all hosts); `canary`
    makes the first batch that many hosts; `rollback` rolls switched hosts back on a stop."""

    hosts: Sequence[str]
    batch: str | int | None = None
    max_fail: str | int | None = None
    canary: int = 0
    rollback: bool = True
    phase: str = RUNNING
    stop_reason: str = ""
    budget: int | None = field(init=False, default=None)
    states: dict[str, HostState] = field(init=False)
    _batches: list[tuple[str, ...]] = field(init=False)
    _next: int = field(init=False, default=0)
    _current: tuple[str, ...] = field(init=False, default=())
    _rolling_back: set[str] = field(init=False, default_factory=set)
    _canary_due: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        hosts = list(dict.fromkeys(self.hosts))
        total = len(hosts)
        if self.canary < 0:
            raise ValueError("canary: expected a number of hosts >= 0")
        size = parse_budget(self.batch, total, "batch") or total or 1
        self.budget = parse_budget(self.max_fail, total, "max_fail", round_up=False)
        self.states = {h: HostState(h) for h in hosts}
        first = min(self.canary, total) if self.canary else 0
        self._batches = [tuple(hosts[:first])] if first else []
        self._canary_due = bool(first)
        self._batches += [tuple(hosts[i : i + size]) for i in range(first, total, size)]

    # -- what the driver asks

    @property
    def failures(self) -> int:
        return sum(1 for s in self.states.values() if s.outcome in FAILURES)

    @property
    def budget_spent(self) -> bool:
        return self.budget is not None and self.failures > self.budget

    @property
    def running(self) -> list[str]:
        return [h for h, s in self.states.items() if s.started and s.outcome is None]

    @property
    def is_canary_batch(self) -> bool:
        return bool(self.canary) and self._next == 1

    # -- events

    def start(self) -> list[Action]:
        """The first actions: the first batch (or, for no hosts, the end)."""
        return self._advance()

    def host_done(
        self, host: str, outcome: str, *, switched: bool = False, message: str = ""
    ) -> list[Action]:
        """`host` finished all its steps with `outcome` (OK or one of FAILURES); `switched` says
        whether its live release is now the one this rollout brought."""
        state = self.states[host]
        if not state.started or state.outcome is not None:
            raise ValueError(f"{host} is not running")
        if outcome != OK and outcome not in FAILURES:
            raise ValueError(f"unknown outcome {outcome!r}")
        state.outcome, state.switched, state.message = outcome, switched, message
        if self.phase == RUNNING and self.budget_spent:
            self._stop(f"more than {self.budget} host(s) failed")
        elif self.phase == RUNNING and self.is_canary_batch and outcome != OK:
            self._stop(f"canary {host} failed")
        return self._advance()

    def canaries_checked(self, passed: dict[str, bool]) -> list[Action]:
        """The result of the canary check after the wait, host by host."""
        if self.phase != CANARY_WAIT:
            raise ValueError("no canary check is due")
        self.phase = RUNNING
        bad = [h for h in self._current if not passed.get(h, False)]
        for host in bad:
            self.states[host].outcome = CHECK_FAILED
            self.states[host].message = "check failed after the canary wait"
        if bad:
            self._stop(f"canary check failed on {', '.join(bad)}")
        return self._advance()

    def rolled_back(self, host: str, ok: bool, message: str = "") -> list[Action]:
        """The rollback of `host` ended (`ok`: it runs its previous release again)."""
        if host not in self._rolling_back:
            raise ValueError(f"{host} is not being rolled back")
        self._rolling_back.discard(host)
        state = self.states[host]
        state.outcome = ROLLED_BACK if ok else ROLLBACK_FAILED
        state.switched = not ok
        if message:
            state.message = message
        return self._advance()

    # -- the machine

    def _stop(self, reason: str) -> None:
        self.phase = STOPPING
        self.stop_reason = reason
        for state in self.states.values():
            if not state.started:
                state.outcome = SKIPPED
                state.message = f"skipped: {reason}"

    def _advance(self) -> list[Action]:
        if self.phase == STOPPING:
            if self.running:
                return []
            to_roll = [h for h, s in self.states.items() if s.switched] if self.rollback else []
            if not to_roll:
                self.phase = DONE
                return [Finished(True, self.stop_reason)]
            self.phase = ROLLING_BACK
            self._rolling_back = set(to_roll)
            return [RollBack(tuple(to_roll))]
        if self.phase == ROLLING_BACK:
            if self._rolling_back:
                return []
            self.phase = DONE
            return [Finished(True, self.stop_reason)]
        if self.phase != RUNNING or self.running:
            return []
        if self._canary_due and self._next == 1:
            # The canary batch is done and whole: check it again after the wait, once.
            self._canary_due = False
            self.phase = CANARY_WAIT
            return [CheckCanaries(self._current)]
        if self._next >= len(self._batches):
            self.phase = DONE
            return [Finished(False, "")]
        self._current = self._batches[self._next]
        self._next += 1
        for host in self._current:
            self.states[host].started = True
        return [Start(self._current)]


POLL_SHARE = 0.1


def poll_interval(followed: float, first: float, most: float) -> float:
    """The wait before the next poll of something followed for `followed` seconds: `first` at
    first, then a tenth of the time followed so far, at most `most` — so an end is heard within
    about a tenth of the time it took, short or long, without polling a long one every `first`."""
    return min(most, max(first, POLL_SHARE * followed))
