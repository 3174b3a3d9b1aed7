"""Following what an order started, over time: `SyncWaiter` (`deploy-client --wait`) polls
`status` naming the run it follows (no dry run on the agent) after an rsync order until each sync
it started ends, directly or behind a proxy, telling what it learns of each as `SyncEvent`s."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deploy import output
from deploy.message import is_run_id
from deploy.output import GOOD, is_proxy_answer
from deploy.progressline import ENDED, RUNNING, STARTING, SyncEvent

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from deploy.orders import HostResult, Order

# --wait polls `status` every 0.5 s for the first few seconds, then every second.
WAIT_POLL_FIRST = 0.5
WAIT_POLL = 1.0
WAIT_FAST_POLLS = 10
# A host that stops answering while --wait follows it (an agent restart) is given this long.
WAIT_LOST_CONTACT = 30.0


def _started(content: Any) -> bool:
    """An rsync answer saying the sync this order asked for was started."""
    return (
        isinstance(content, dict)
        and content.get("return") in ("true", True, 1)
        and bool(content.get("checksum"))
        and "outcome" not in content
        and content.get("alreadyRsync") != "true"
    )


def _busy(content: Any) -> Any:
    """Another run was in progress: outcome `busy` (with its id), never adopted as ours."""
    if not isinstance(content, dict) or content.get("alreadyRsync") != "true":
        return content
    message = f"busy: another sync (run {content.get('runId') or 'unknown'}, started "
    message += f"{content.get('started') or 'unknown'}) is in progress"
    return _ended(content, "busy", message)


@dataclass
class _Followed:
    """One sync `--wait` follows: an agent's rsync answer until the sync ends."""

    label: str
    rsync: dict[str, Any]
    via: str | None = None
    lost_since: float | None = None
    final: dict[str, Any] | None = None
    ended: float | None = None  # when `final` was known (the reactor's time)

    def event(self, state: str, **details: Any) -> SyncEvent:
        return SyncEvent(self.label, self.via, state, **details)

    def owns(self, last: Mapping[str, Any]) -> bool:
        """`last` (a lastRsync) is the end of this sync: the same run when the agent named ours
        (never another run of the same target), else (older agents) the same target."""
        ours = self.rsync.get("runId")
        if ours:
            return bool(last.get("runId") == ours)
        return last.get("checksum") in (None, self.rsync.get("checksum"))


class SyncWaiter:
    """A sender for `rsync` that, once a host (or a proxy's agents) started the sync, polls
    `status` until it ends, and answers the rsync answer with the sync's `lastRsync` and
    `outcome` added (`return` "false" when the outcome is not ok/warning)."""

    def __init__(
        self,
        client: Any,
        reactor: Any,
        timeout: float,
        on_sync: Callable[[SyncEvent], None] | None = None,
    ) -> None:
        self.client = client
        self.options = client.options
        self.reactor = reactor
        self.timeout = timeout
        self.on_sync = on_sync or (lambda _event: None)

    def send(self, host: str, order: Order) -> Deferred[HostResult]:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._send(host, order))

    async def _send(self, host: str, order: Order) -> HostResult:
        began = self.reactor.seconds()
        first: HostResult = await self.client.send(host, order)
        answered = self.reactor.seconds()
        if not first.http_ok:
            return first
        content = first.content
        if is_proxy_answer(content):
            for per_order in content.values():
                if isinstance(per_order.get("rsync"), dict):
                    rsync = per_order["rsync"]
                    rsync["content"] = _busy(rsync.get("content"))
            followed = [
                _Followed(agent, per_order["rsync"]["content"], via=host)
                for agent, per_order in content.items()
                if isinstance(per_order.get("rsync"), dict)
                and output.outcome_of("rsync", per_order["rsync"]) == "ok"
                and _started(per_order["rsync"].get("content"))
            ]
            if not followed:
                return first
            for agent, per_order in content.items():
                if all(f.label != agent for f in followed):
                    # It answered the rsync order already, and no sync runs there to follow.
                    outcome = output.outcome_of("rsync", per_order.get("rsync") or {})
                    self.on_sync(SyncEvent(agent, host, ENDED, outcome=outcome))
            await self._follow(host, order, followed, via_proxy=True)
            merged = {agent: dict(per_order) for agent, per_order in content.items()}
            for f in followed:
                entry = dict(merged[f.label]["rsync"])
                entry["content"] = f.final
                if f.ended is not None:
                    entry["seconds"] = _own_seconds(entry.get("seconds"), f.ended, answered, began)
                merged[f.label]["rsync"] = entry
            first.content = merged
            return first
        if not _started(content):
            first.content = _busy(content)
            return first
        sync = _Followed(host, content)
        await self._follow(host, order, [sync], via_proxy=False)
        first.content = sync.final
        return first

    async def _follow(
        self, host: str, order: Order, syncs: list[_Followed], *, via_proxy: bool
    ) -> None:
        from twisted.internet.task import deferLater

        from deploy.client import Order

        deadline = self.reactor.seconds() + self.timeout
        running = list(syncs)
        for sync in running:
            self.on_sync(sync.event(STARTING))
        polls = 0
        try:
            while running:
                interval = WAIT_POLL_FIRST if polls < WAIT_FAST_POLLS else WAIT_POLL
                await deferLater(self.reactor, interval, lambda: None)
                polls += 1
                args = f"hosts:{','.join(s.label for s in running)}" if via_proxy else order.args
                status = Order("status", order.options, args, order.api_key)
                runs = _runs_field(running, via_proxy)
                if runs:
                    status.extra["run"] = runs
                answer: HostResult = await self.client.send(host, status)
                now = self.reactor.seconds()
                entries = self._status_entries(answer, running, via_proxy)
                for sync in list(running):
                    self._judge(sync, entries[sync.label], now)
                    if sync.final is None and now >= deadline:
                        sync.final = _ended(
                            sync.rsync,
                            "timeout",
                            f"still running after --wait-timeout {self.timeout:g}s",
                        )
                    if sync.final is not None:
                        sync.ended = now
                        running.remove(sync)
                        last = sync.final.get("lastRsync") or {}
                        outcome = sync.final.get("outcome")
                        size = last.get("transferFilesSize")
                        self.on_sync(sync.event(ENDED, outcome=outcome, size=size))
        finally:
            for sync in running:
                self.on_sync(sync.event(ENDED, outcome="interrupted"))

    def _status_entries(
        self, answer: HostResult, running: list[_Followed], via_proxy: bool
    ) -> dict[str, dict[str, Any]]:
        """label → that sync's status answer in the original shape."""
        entry = answer.to_json()
        if not via_proxy or not answer.http_ok:
            # Directly, or the proxy itself did not answer well: the same for every agent.
            return {s.label: entry for s in running}
        content = answer.content if is_proxy_answer(answer.content) else {}
        missing = {
            "return": 0,
            "serverStatus": 1,
            "returnCode": 500,
            "returnString": "",
            "content": f"the proxy's answer has no status for this agent: {str(content)[:200]}",
        }
        return {s.label: (content.get(s.label) or {}).get("status") or missing for s in running}

    def _judge(self, sync: _Followed, entry: Mapping[str, Any], now: float) -> None:
        """Update `sync` from one status answer: still running, ended, or out of contact."""
        content = entry.get("content")
        code = str(entry.get("returnCode"))
        if entry.get("serverStatus") == 0 or code == "503":
            # Not answering (an agent restarting) or busy: try again, for a while.
            if sync.lost_since is None:
                sync.lost_since = now
            elif now - sync.lost_since > WAIT_LOST_CONTACT:
                sync.final = _ended(
                    sync.rsync, "unreachable", f"lost contact while waiting: {content}"
                )
            return
        sync.lost_since = None
        if code != "200" or not isinstance(content, dict):
            sync.final = _ended(
                sync.rsync,
                "failed",
                f"status answered {code} {entry.get('returnString', '')}: {content}",
            )
            return
        if content.get("alreadyRsync") == "true":
            progress = content.get("progress")
            self.on_sync(
                sync.event(RUNNING, progress=progress if isinstance(progress, dict) else {})
            )
            return
        last = content.get("lastRsync")
        if isinstance(last, dict) and sync.owns(last):
            outcome = str(last.get("outcome") or "failed")
            sync.final = _ended(sync.rsync, outcome, str(last.get("message") or ""), last)
        else:
            message = content.get("message") or "the sync ended but the agent reports no lastRsync"
            sync.final = _ended(sync.rsync, "failed", str(message))


def _own_seconds(order_seconds: Any, ended: float, answered: float, began: float) -> float:
    """A followed agent's own time through a proxy, as direct: its rsync order's round trip (the
    proxy's `seconds` for it), then until its sync's end was seen. Not from our own start: that
    also holds the proxy's wait for a slot and every other agent's answer. An older proxy sends
    no `seconds`: then from our start."""
    if isinstance(order_seconds, int | float) and order_seconds >= 0:
        return round(order_seconds + (ended - answered), 3)
    return round(ended - began, 3)


def _runs_field(syncs: list[_Followed], via_proxy: bool) -> str:
    """A status poll's `run` field, naming the runs it follows so that each agent answers from
    its records instead of a dry run: the runId (directly), `AGENT=RUNID,...` (to a proxy, which
    gives each agent its own); "" when no sync named its run. Older agents and proxies ignore the
    field (and answer with a dry run, as before)."""
    named = [(s.label, s.rsync["runId"]) for s in syncs if is_run_id(s.rsync.get("runId"))]
    if not via_proxy:
        return str(named[0][1]) if named else ""
    return ",".join(f"{label}={run_id}" for label, run_id in named)


def _ended(
    rsync: Mapping[str, Any], outcome: str, message: str, last: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The rsync answer with how the sync ended."""
    content = dict(rsync)
    if last is not None:
        content["lastRsync"] = dict(last)
    content["outcome"] = outcome
    if outcome not in GOOD:
        content["return"] = "false"
        content["message"] = message or f"sync {outcome}"
    return content
