"""One host's part of a rollout, as orders to its agent: stage (`rsync`), follow exactly the run
that order started (its `runId`) to its end, `activate` the new release (release mode), and on
request `check` it again or `rollback` it. Every step is timed and reported as it ends; every
problem becomes the host's outcome, never an exception."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from deploy.orders import HostResult, Order
from deploy.rollout import (
    BUSY,
    CHECK_FAILED,
    FAILED,
    OK,
    TIMED_OUT,
    UNREACHABLE,
    poll_interval,
)

POLL_FIRST = 0.25  # status polls while a sync runs: quick at first, then slower (poll_interval)
POLL = 1.0
LOST_CONTACT = 30.0  # an agent that stops answering while its sync runs is given this long
GOOD_SYNC = ("ok", "warning")


@dataclass
class HostRun:
    """What one host did in a rollout: its outcome, the release it got and had, its steps."""

    host: str
    outcome: str | None = None
    message: str = ""
    switched: bool = False
    release_mode: bool = False
    release: str | None = None  # the release this rollout staged
    previous: str | None = None  # the release live before
    run_id: str | None = None
    started: float | None = None  # wall clock
    seconds: float | None = None  # from its first order to its last answer
    last_rsync: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "outcome": self.outcome,
            "message": self.message,
            "switched": self.switched,
            "release": self.release,
            "previous": self.previous,
            "runId": self.run_id,
            "started": self.started,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "steps": self.steps,
        }
        if self.last_rsync is not None:
            data["lastRsync"] = self.last_rsync
        return data


class _Ended(Exception):
    """A step ended the host's deploy with `outcome` (a failure, or busy)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


def answer_outcome(result: HostResult) -> tuple[str, str] | None:
    """A failure outcome and message for an answer that is not a good 200, else None."""
    content = result.content
    if result.server_status == 0:
        text = str(content)
        return (TIMED_OUT if text.startswith("Process Timeout") else UNREACHABLE), text
    if result.code != 200:
        return FAILED, f"{result.code} {result.reason}: {str(content)[:300]}".strip()
    if not isinstance(content, dict):
        return FAILED, f"not an agent's JSON answer: {str(content)[:300]}"
    return None


class HostSteps:
    """The orders of a rollout to agents through `sender` (`send(host, order)` → Deferred of a
    HostResult, e.g. `deploy.client.OrderClient`); `on_step(host, step)` hears each step end."""

    def __init__(
        self,
        sender: Any,
        clock: Any,
        group: str,
        *,
        label: str = "",
        sync_timeout: float = 3600.0,
        on_step: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.sender = sender
        self.clock = clock
        self.group = group
        self.label = label
        self.sync_timeout = sync_timeout
        self.on_step = on_step or (lambda _host, _step: None)
        self.runs: dict[str, HostRun] = {}

    # -- the steps a driver asks for

    def deploy(self, host: str) -> Deferred[HostRun]:
        """Stage, follow, activate: fires the host's run with its outcome set."""
        run = self.runs.setdefault(host, HostRun(host))
        return Deferred.fromCoroutine(self._deploy(run))

    def check(self, host: str) -> Deferred[bool]:
        """The group's check on the host's live release again (the canaries after their wait)."""
        return Deferred.fromCoroutine(self._check(self.runs.setdefault(host, HostRun(host))))

    def rollback(self, host: str) -> Deferred[tuple[bool, str]]:
        """Back to the release the host had before this rollout: (ok, message)."""
        return Deferred.fromCoroutine(self._rollback(self.runs.setdefault(host, HostRun(host))))

    # -- internals

    async def _deploy(self, run: HostRun) -> HostRun:
        began = self.clock.seconds()
        run.started = time.time()
        try:
            await self._find_mode(run)
            await self._stage(run)
            await self._follow(run)
            if run.release_mode:
                await self._activate(run)
            run.outcome = OK
        except _Ended as e:
            run.outcome, run.message = e.outcome, e.message
        run.seconds = self.clock.seconds() - began
        return run

    async def _ask(self, run: HostRun, order: str, options: str) -> HostResult:
        o = Order(order, options)
        if order == "rsync" and self.label:
            o.extra["release"] = self.label
        if order == "status" and run.run_id:
            o.extra["run"] = run.run_id  # following our run: the agent skips the dry run
        result: HostResult = await self.sender.send(run.host, o)
        return result

    def _step(self, run: HostRun, step: str, began: float, outcome: str, message: str = "") -> None:
        record = {
            "step": step,
            "outcome": outcome,
            "at": round(time.time(), 3),
            "seconds": round(self.clock.seconds() - began, 3),
        }
        if message:
            record["message"] = message
        run.steps.append(record)
        self.on_step(run.host, record)

    def _fail(self, run: HostRun, step: str, began: float, outcome: str, message: str) -> _Ended:
        self._step(run, step, began, outcome, message)
        return _Ended(outcome, message)

    async def _find_mode(self, run: HostRun) -> None:
        """`releases GROUP`: a 200 says release mode (and which release is live), a 400 or 404
        an in-place group; anything else ends the host."""
        began = self.clock.seconds()
        result = await self._ask(run, "releases", self.group)
        if result.server_status == 1 and result.code in (400, 404):
            return
        bad = answer_outcome(result)
        if bad is not None:
            raise self._fail(run, "connect", began, *bad)
        run.release_mode = True
        live = result.content.get("release")
        run.previous = live.get("id") if isinstance(live, dict) else None

    async def _stage(self, run: HostRun) -> None:
        began = self.clock.seconds()
        result = await self._ask(run, "rsync", self.group)
        bad = answer_outcome(result)
        if bad is not None:
            raise self._fail(run, "rsync", began, *bad)
        content = result.content
        if content.get("alreadyRsync") == "true":
            other = content.get("runId") or "unknown"
            since = content.get("started") or "unknown"
            message = f"busy: another sync (run {other}, started {since}) is in progress"
            raise self._fail(run, "rsync", began, BUSY, message)
        if content.get("return") not in ("true", True, 1):
            message = str(content.get("message") or "the sync failed to start")
            raise self._fail(run, "rsync", began, FAILED, message)
        run.run_id = content.get("runId")
        if not run.run_id:
            raise self._fail(run, "rsync", began, FAILED, "the agent names no runId (too old)")
        run.release = content.get("release")
        self._step(run, "rsync", began, "started")

    async def _follow(self, run: HostRun) -> None:
        """Poll `status` (naming the run: no dry run on the agent) until the agent's lastRsync
        is this run's."""
        began = self.clock.seconds()
        deadline = began + self.sync_timeout
        lost_since: float | None = None
        while True:
            wait = poll_interval(self.clock.seconds() - began, POLL_FIRST, POLL)
            await deferLater(self.clock, wait, lambda: None)
            result = await self._ask(run, "status", self.group)
            now = self.clock.seconds()
            bad = answer_outcome(result)
            if bad is not None and (result.server_status == 0 or result.code == 503):
                lost_since = lost_since if lost_since is not None else now
                if now - lost_since > LOST_CONTACT:
                    raise self._fail(run, "sync", began, bad[0], f"lost contact: {bad[1]}")
            elif bad is not None:
                raise self._fail(run, "sync", began, *bad)
            else:
                lost_since = None
                last = result.content.get("lastRsync")
                if isinstance(last, dict) and last.get("runId") == run.run_id:
                    run.last_rsync = last
                    outcome = str(last.get("outcome") or FAILED)
                    message = str(last.get("message") or "")
                    if outcome == CHECK_FAILED:
                        # activate = auto ran the check, which failed: back or kept, ask
                        run.switched = await self._is_live(run)
                        raise self._fail(run, "sync", began, CHECK_FAILED, message)
                    if outcome not in GOOD_SYNC:
                        raise self._fail(run, "sync", began, FAILED, f"sync {outcome}: {message}")
                    self._step(run, "sync", began, outcome, message)
                    return
            if now >= deadline:
                message = f"sync still running after {self.sync_timeout:g}s"
                raise self._fail(run, "sync", began, TIMED_OUT, message)

    async def _is_live(self, run: HostRun) -> bool:
        result = await self._ask(run, "releases", self.group)
        if answer_outcome(result) is not None:
            return False
        live = result.content.get("release")
        return run.release is not None and isinstance(live, dict) and live.get("id") == run.release

    async def _activate(self, run: HostRun) -> None:
        """activate = auto already switched (and checked); else `activate GROUP,ID`."""
        began = self.clock.seconds()
        if await self._is_live(run):
            run.switched = True
            self._step(run, "activate", began, OK, "activated by the sync (activate = auto)")
            return
        result = await self._ask(run, "activate", f"{self.group},{run.release}")
        bad = answer_outcome(result)
        if bad is not None:
            raise self._fail(run, "activate", began, *bad)
        content = result.content
        live = content.get("release")
        run.switched = isinstance(live, dict) and live.get("id") == run.release
        if content.get("previous") is not None:
            run.previous = content["previous"]
        outcome = str(content.get("outcome") or OK)
        message = str(content.get("message") or "")
        if outcome == CHECK_FAILED or content.get("return") not in ("true", True, 1):
            outcome = CHECK_FAILED if outcome == CHECK_FAILED else FAILED
            raise self._fail(run, "activate", began, outcome, message or "activate failed")
        self._step(run, "activate", began, OK, message)

    async def _check(self, run: HostRun) -> bool:
        began = self.clock.seconds()
        result = await self._ask(run, "check", self.group)
        bad = answer_outcome(result)
        if bad is None and result.content.get("outcome") == OK:
            self._step(run, "check", began, OK)
            return True
        message = bad[1] if bad is not None else str(result.content.get("message") or "")
        self._step(run, "check", began, CHECK_FAILED, message)
        return False

    async def _rollback(self, run: HostRun) -> tuple[bool, str]:
        began = self.clock.seconds()
        options = f"{self.group},{run.previous}" if run.previous else self.group
        result = await self._ask(run, "rollback", options)
        bad = answer_outcome(result)
        if bad is None and result.content.get("return") in ("true", True, 1):
            message = f"rolled back to {run.previous or 'the previous good release'}"
            self._step(run, "rollback", began, OK, message)
            return True, message
        message = bad[1] if bad is not None else str(result.content.get("message") or "")
        self._step(run, "rollback", began, FAILED, message)
        return False, f"rollback failed: {message}"
