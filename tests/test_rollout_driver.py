"""The rollout's Deferred layer on a fake clock with scripted hosts: batches start only when the
previous one is done, the canary check waits its time, the rollback goes to exactly the switched
hosts, and the record holds a numbered event per step."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from deploy.rollout import Rollout
from deploy.rollout_driver import RolloutDriver
from deploy.rollout_host import HostRun


class ScriptedSteps:
    """Hosts whose deploy ends when the test says, with the outcome it says."""

    def __init__(self) -> None:
        self.runs: dict[str, HostRun] = {}
        self.pending: dict[str, Deferred[HostRun]] = {}
        self.checks: list[str] = []
        self.rolled: list[str] = []
        self.check_result = True
        self.on_step: Any = None

    def deploy(self, host: str) -> Deferred[HostRun]:
        self.pending[host] = Deferred()
        return self.pending[host]

    def end(self, host: str, outcome: str, switched: bool = True) -> None:
        run = self.runs.setdefault(host, HostRun(host))
        run.outcome, run.switched = outcome, switched and outcome == "ok"
        self.on_step(host, {"step": "activate", "outcome": outcome, "at": 0, "seconds": 1})
        self.pending.pop(host).callback(run)

    def check(self, host: str) -> Deferred[bool]:
        self.checks.append(host)
        return succeed(self.check_result)

    def rollback(self, host: str) -> Deferred[tuple[bool, str]]:
        self.rolled.append(host)
        return succeed((True, "back"))


def test_batches_canary_wait_and_rollback_of_switched_hosts() -> None:
    """Canary a, waited 5 s then checked; batch (b, c) starts only after; b fails and c is
    unreachable with max_fail=1: d is skipped and only the switched host (a) rolls back."""
    clock, steps = Clock(), ScriptedSteps()
    machine = Rollout(["a", "b", "c", "d"], batch=2, max_fail=1, canary=1)
    driver = RolloutDriver(steps, machine, clock, canary_wait=5.0)  # type: ignore[arg-type]
    done = driver.run()
    assert list(steps.pending) == ["a"]
    steps.end("a", "ok")
    assert not steps.pending and not steps.checks
    clock.advance(4.9)
    assert not steps.checks
    clock.advance(0.2)
    assert steps.checks == ["a"] and list(steps.pending) == ["b", "c"]
    steps.end("b", "failed")
    assert not done.called and list(steps.pending) == ["c"]
    steps.end("c", "unreachable")
    record = done.result
    assert steps.rolled == ["a"]
    outcomes = {h: e["outcome"] for h, e in record["hosts"].items()}
    assert outcomes == {"a": "rolled_back", "b": "failed", "c": "unreachable", "d": "skipped"}
    assert record["stopped"] and record["state"] == "done"
    seqs = [e["seq"] for e in record["events"]]
    assert seqs == list(range(len(seqs))) and {"start", "activate", "skip"} <= {
        e["step"] for e in record["events"]
    }
