"""The Deferred layer of a rollout: it feeds `deploy.rollout.Rollout` what the hosts did
(`deploy.rollout_host.HostSteps`) and does what the machine says — start a batch, wait the
canary time and check again, roll back — keeping the rollout's record (per-host results and a
numbered event per host step) that the client prints and the proxy stores."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from deploy.rollout import (
    FAILED,
    OK,
    SKIPPED,
    CheckCanaries,
    Finished,
    RollBack,
    Rollout,
    Start,
)
from deploy.rollout_host import HostRun, HostSteps

# The rollout's own state in its record.
RUNNING = "running"
DONE = "done"
INTERRUPTED = "interrupted"


def new_rollout_id() -> str:
    """Sortable by time, unique: `20240501T101500-1a2b3c4d`."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


class RolloutDriver:
    """Runs one rollout: `run()` fires the record once the machine says it is finished.
    `on_change(record)` hears every step (the proxy saves it, the client shows progress)."""

    log = Logger()

    def __init__(
        self,
        steps: HostSteps,
        machine: Rollout,
        clock: Any,
        *,
        max_parallel: int = 64,
        canary_wait: float = 0.0,
        record: dict[str, Any] | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.steps = steps
        self.machine = machine
        self.clock = clock
        self.canary_wait = canary_wait
        self.sem = DeferredSemaphore(max(1, max_parallel))
        self.on_change = on_change or (lambda _record: None)
        self.record = record if record is not None else {}
        self.record.setdefault("rolloutId", new_rollout_id())
        self.record.update(state=RUNNING, stopped=False, reason="", phase=machine.phase)
        self.record.setdefault("created", round(time.time(), 3))
        self.record["hosts"] = {h: {"outcome": None, "steps": []} for h in machine.states}
        self.record["events"] = []
        self._timer: IDelayedCall | None = None
        self._done: Deferred[dict[str, Any]] = Deferred()
        steps.on_step = self._on_step

    def run(self) -> Deferred[dict[str, Any]]:
        self._apply(self.machine.start())
        return self._done

    # -- what the machine says

    def _apply(self, actions: list[Any]) -> None:
        self.record["phase"] = self.machine.phase
        for action in actions:
            if isinstance(action, Start):
                for host in action.hosts:
                    self._event(host, "start", "started")
                    d = self.sem.run(self.steps.deploy, host)
                    d.addCallbacks(self._host_done, self._broken, errbackArgs=(host,))
            elif isinstance(action, CheckCanaries):
                hosts = action.hosts
                self._timer = self.clock.callLater(self.canary_wait, self._check_canaries, hosts)
            elif isinstance(action, RollBack):
                for host in action.hosts:
                    d2 = self.steps.rollback(host)
                    d2.addCallback(self._rolled_back, host).addErrback(self._bug)
            elif isinstance(action, Finished):
                self._finish(action)
        self._changed()

    def _host_done(self, run: HostRun) -> None:
        self._sync_host(run.host)
        actions = self.machine.host_done(
            run.host, run.outcome or FAILED, switched=run.switched, message=run.message
        )
        self._sync_host(run.host)
        self._apply(actions)

    def _broken(self, failure: Failure, host: str) -> None:
        """A bug in a host's steps: the host failed, the rollout goes on."""
        self.log.failure("deploy to {host} failed unexpectedly", failure, host=host)
        run = self.steps.runs.setdefault(host, HostRun(host))
        run.outcome, run.message = FAILED, f"internal error: {failure.getErrorMessage()}"
        self._host_done(run)

    def _check_canaries(self, hosts: tuple[str, ...]) -> None:
        self._timer = None
        from twisted.internet.defer import gatherResults

        checks = [self.steps.check(h) for h in hosts]

        def checked(results: list[bool]) -> None:
            passed = dict(zip(hosts, results, strict=True))
            actions = self.machine.canaries_checked(passed)
            for host in hosts:
                self._sync_host(host)
            self._apply(actions)

        gatherResults(checks).addCallback(checked).addErrback(self._bug)

    def _rolled_back(self, result: tuple[bool, str], host: str) -> None:
        ok, message = result
        actions = self.machine.rolled_back(host, ok, message)
        self._sync_host(host)
        self._apply(actions)

    def _finish(self, action: Finished) -> None:
        for host, state in self.machine.states.items():
            if state.outcome == SKIPPED:
                self._event(host, "skip", SKIPPED, state.message)
            self._sync_host(host)
        self.record.update(
            state=DONE, stopped=action.stopped, reason=action.reason, ended=round(time.time(), 3)
        )
        self.record["phase"] = self.machine.phase
        if not self._done.called:
            self._done.callback(self.record)

    def _bug(self, failure: Failure) -> None:
        self.log.failure("rollout {id} failed unexpectedly", failure, id=self.record["rolloutId"])
        self.record.update(state=DONE, stopped=True, reason=f"internal error: {failure.value}")
        self._changed()
        if not self._done.called:
            self._done.callback(self.record)

    def cancel(self) -> None:
        """Stop waiting (a proxy shutting down): the canary timer is cancelled."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- the record

    def _sync_host(self, host: str) -> None:
        state = self.machine.states[host]
        run = self.steps.runs.get(host)
        entry = run.to_json() if run is not None else {"steps": []}
        entry["outcome"] = state.outcome
        entry["message"] = state.message or entry.get("message", "")
        entry["switched"] = state.switched
        self.record["hosts"][host] = entry

    def _on_step(self, host: str, step: dict[str, Any]) -> None:
        self._event(host, step["step"], step["outcome"], step.get("message", ""), step)
        self._sync_host(host)
        self._changed()

    def _event(
        self,
        host: str,
        step: str,
        outcome: str,
        message: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:
        events = self.record["events"]
        event = {"seq": len(events), "host": host, "step": step, "outcome": outcome}
        event["at"] = (detail or {}).get("at", round(time.time(), 3))
        if detail is not None and "seconds" in detail:
            event["seconds"] = detail["seconds"]
        if message:
            event["message"] = message
        events.append(event)

    def _changed(self) -> None:
        self.record["failures"] = self.machine.failures
        try:
            self.on_change(self.record)
        except Exception:
            self.log.failure("recording rollout {id}", id=self.record["rolloutId"])


def host_outcome_ok(entry: dict[str, Any]) -> bool:
    return entry.get("outcome") == OK
