"""The daemons' Prometheus metrics: one registry per daemon with its metric objects, and the
observers that count orders, auth failures, connections and syncs where the code already has one
place for them. The metrics port's site is `deploy.metrics_web`'s."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

import twisted
from deploy import __version__
from deploy.message import ORDERS
from deploy.rsync import RsyncTarget

log = Logger()

# An order label outside ORDERS (a wrong path, a refused peer) would let any client add series.
OTHER_ORDER = "other"
ORDER_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SYNC_SECONDS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
# The group label of a sync of an inline target (`HOST::MODULE/path,/local`): not a group.
INLINE_GROUP = ""

# What a 401 says → the reason label (a handful of words, whatever the exact text).
AUTH_REASONS = (
    ("missing", "missing"),
    ("malformed", "malformed"),
    ("scheme", "malformed"),
    ("window", "time"),
    ("signature", "signature"),
    ("replay", "replay"),
    ("too many", "busy"),
    ("auth_key", "legacy"),
)
# What a proxy's per-host answer says → the result label.
HOST_RESULTS = ("ok", "failed", "error", "unreachable", "timeout", "skipped")


def auth_failure_reason(message: str) -> str:
    """The `reason` label of an authentication failure answered with `message`."""
    text = message.lower()
    for word, reason in AUTH_REASONS:
        if word in text:
            return reason
    return "other"


def order_label(proto: Any) -> str:
    """The order a request named (`/agent/status` → status), or "other"."""
    request = getattr(proto, "request", None)
    segments = request.segments if request is not None else []
    if len(segments) >= 2 and segments[1] in ORDERS:
        return str(segments[1])
    return OTHER_ORDER


def host_result(answer: Any) -> str:
    """One host's entry of a proxy answer (`{"serverStatus": 1, "returnCode": 200, ...}`) as a
    result label."""
    if not isinstance(answer, dict):
        return "error"
    if answer.get("skipped"):
        return "skipped"
    if answer.get("serverStatus") != 1:
        content = answer.get("content")
        return "timeout" if isinstance(content, str) and "Timeout" in content else "unreachable"
    if str(answer.get("returnCode")) != "200":
        return "error"
    content = answer.get("content")
    if isinstance(content, dict) and content.get("return") not in (None, "true", True, 1):
        return "failed"
    return "ok"


class DaemonMetrics:
    """What both daemons expose: orders by code and how long they took, authentication failures,
    open connections, the build, and the process (`process_*`, `python_*`)."""

    def __init__(self, *, orders_prefix: str = "deploy") -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self.orders = Counter(
            f"{orders_prefix}_orders", "Orders answered, by order and HTTP status code.",
            ["order", "code"], registry=r,
        )  # fmt: skip
        self.order_duration = Histogram(
            f"{orders_prefix}_order_duration_seconds",
            "Seconds from a connection's start to its answer, by order.",
            ["order"], buckets=ORDER_SECONDS, registry=r,
        )  # fmt: skip
        self.auth_failures = Counter(
            "deploy_auth_failures", "Requests refused by authentication (401), by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self._open: CountingFactory | None = None
        Gauge(
            "deploy_connections_open", "Connections open on the daemon's port.", registry=r
        ).set_function(lambda: len(self._open.protocols) if self._open is not None else 0)
        build = Gauge(
            "deploy_build_info", "The running deploy: its version (and Twisted's, Python's).",
            ["version", "twisted", "python"], registry=r,
        )  # fmt: skip
        build.labels(__version__, twisted.__version__, platform.python_version()).set(1)

    def counting(self, factory: Factory) -> Any:
        """`factory` wrapped so that its open connections are counted."""
        self._open = CountingFactory(factory)
        return self._open

    def watch(self, factory: Any) -> None:
        """Count every answer `factory` (a `deploy.wire.RequestFactory`) sends."""
        factory.observers.append(self.response_sent)

    def response_sent(self, proto: Any, response: Any) -> None:
        order = order_label(proto)
        self.orders.labels(order, str(response.status)).inc()
        opened = getattr(proto, "opened_at", None)
        if opened is not None:
            self.order_duration.labels(order).observe(max(0.0, time.monotonic() - opened))
        if response.status == 401:
            body = response.body.decode("utf-8", "replace")
            self.auth_failures.labels(auth_failure_reason(body)).inc()


class _Counted(ProtocolWrapper):
    """A connection the count holds. Under TLS its transport provides IHandshakeListener, which
    ProtocolWrapper then claims too and forwards back to that transport, for ever: it is
    forwarded to the protocol inside instead."""

    def handshakeCompleted(self) -> None:
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()


class CountingFactory(WrappingFactory):
    """Wraps a factory; `protocols` holds its open connections."""

    protocol = _Counted
    noisy = False


class ProxyMetrics(DaemonMetrics):
    """The proxy's: its orders (`deploy_proxy_*`) and each agent's result in them."""

    def __init__(self) -> None:
        super().__init__(orders_prefix="deploy_proxy")
        self.host_results = Counter(
            "deploy_proxy_host_results", "Agents' results in the proxy's answers.",
            ["order", "result"], registry=self.registry,
        )  # fmt: skip
        self.rollouts = Counter(
            "deploy_proxy_rollouts", "Rollouts this proxy ran, by how they ended.",
            ["outcome"], registry=self.registry,
        )  # fmt: skip

    def watch_rollouts(self, rollouts: Any) -> None:
        """Count how the rollouts of `rollouts` (deploy.proxy_rollouts.ProxyRollouts) end,
        and those a previous proxy left interrupted."""
        if rollouts.interrupted:
            self.rollouts.labels("interrupted").inc(rollouts.interrupted)
        rollouts.ended_observers.append(lambda outcome: self.rollouts.labels(outcome).inc())

    def response_sent(self, proto: Any, response: Any) -> None:
        super().response_sent(proto, response)
        if response.status != 200:
            return
        try:
            answer = json.loads(response.body)
        except ValueError:
            return
        if not isinstance(answer, dict):
            return
        for orders in answer.values():
            if not isinstance(orders, dict):
                continue
            for order, result in orders.items():
                label = order if order in ORDERS else OTHER_ORDER
                self.host_results.labels(label, host_result(result)).inc()


class AgentMetrics(DaemonMetrics):
    """The agent's: its orders and syncs (running, duration, bytes, the last one's end per
    group) and the live release of each release-mode group."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.syncs_running = Gauge(
            "deploy_syncs_running", "Background syncs running now.", registry=r
        )
        self.sync_duration = Histogram(
            "deploy_sync_duration_seconds", "Seconds a background sync ran, by group.",
            ["group"], buckets=SYNC_SECONDS, registry=r,
        )  # fmt: skip
        self.sync_bytes = Counter(
            "deploy_sync_bytes", "Bytes of the files background syncs transferred, by group.",
            ["group"], registry=r,
        )  # fmt: skip
        self.last_sync = Gauge(
            "deploy_last_sync_timestamp_seconds",
            "When the last sync of a group ended (Unix time), labelled with how it ended.",
            ["group", "outcome"], registry=r,
        )  # fmt: skip
        self._last_outcome: dict[str, str] = {}
        self.groups: Mapping[str, Any] = {}
        self._group_of: dict[str, str] = {}
        self.live_releases: Callable[[], Iterable[tuple[str, str, str]]] = list
        r.register(ReleaseCollector(lambda: self.live_releases()))

    def watch_agent(self, agent: Any, factory: Any) -> None:
        """Count `factory`'s answers and `agent`'s syncs; the last sync of each group is read
        from the state records, so a restarted agent still shows it."""
        self.watch(factory)
        jobs = agent.jobs
        self.syncs_running.set_function(jobs.running_count)
        jobs.ended_observers.append(self.sync_ended)
        self.set_groups(agent.config.groups)
        self.live_releases = lambda: live_releases(agent)
        for name, group in self.groups.items():
            checksum = _checksum(group)
            last = read_last_end(jobs, checksum, getattr(group, "queue_path", None))
            if last is not None:
                self._set_last(name, *last)

    def set_groups(self, groups: Mapping[str, Any]) -> None:
        """The groups syncs are labelled with (at start, and after a reload)."""
        self.groups = dict(groups)
        self._group_of = {_checksum(g): name for name, g in self.groups.items()}

    def sync_ended(self, job: Any) -> None:
        """A job registry observer: a sync's end is recorded."""
        state = job.state
        group = self._group_of.get(job.checksum, INLINE_GROUP)
        started, ended = _number(state.get("started")), _number(state.get("ended"))
        if started is not None and ended is not None:
            self.sync_duration.labels(group).observe(max(0.0, ended - started))
        size = _number(state.get("transferFilesSize"))
        if size:
            self.sync_bytes.labels(group).inc(size)
        outcome = state.get("outcome")
        if ended is not None and isinstance(outcome, str) and group != INLINE_GROUP:
            self._set_last(group, outcome, ended)

    def _set_last(self, group: str, outcome: str, ended: float) -> None:
        # One series per group, the last sync's: an alert on outcome="failed" then ends by
        # itself once a later sync went well.
        previous = self._last_outcome.get(group)
        if previous is not None and previous != outcome:
            self.last_sync.remove(group, previous)
        self._last_outcome[group] = outcome
        self.last_sync.labels(group, outcome).set(ended)


class ReleaseCollector(Collector):
    """`deploy_release_info{group,release,label} 1` for each release-mode group's live release,
    as its release history (deploy.releases) records it."""

    def __init__(self, live: Callable[[], Iterable[tuple[str, str, str]]]) -> None:
        self.live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "deploy_release_info",
            "The live release of each release-mode group (value 1).",
            labels=["group", "release", "label"],
        )
        for group, release, label in self.live():
            family.add_metric([group, release, label], 1)
        yield family


def live_releases(agent: Any) -> list[tuple[str, str, str]]:
    """(group, release id, label) of the live release of each release-mode group of `agent`
    (an AgentService); a group whose history cannot be read is left out, and logged."""
    found = []
    for name, group in agent.config.groups.items():
        if group.releases is None:
            continue
        try:
            target, _ = agent.targets.resolve(name)
            live = agent.release_orders.live_release(target, group)
        except Exception as e:  # a scrape must not fail for one group's history
            log.warn("release of group {group} unreadable: {error}", group=name, error=e)
            continue
        if live:
            found.append((name, str(live.get("id", "")), str(live.get("label") or "")))
    return found


def read_last_end(jobs: Any, checksum: str, state_dir: str | None) -> tuple[str, float] | None:
    """(outcome, end time) of the last recorded sync of `checksum`."""
    from deploy.jobstate import STATE_ENDED, read_state

    state = read_state(jobs.state_file(checksum, state_dir))
    if not state or state.get("state") != STATE_ENDED:
        return None
    ended = _number(state.get("ended"))
    outcome = state.get("outcome")
    if ended is None or not isinstance(outcome, str):
        return None
    return outcome, ended


def _checksum(group: Any) -> str:
    return RsyncTarget(dest=group.dest, src=group.src).checksum


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace(",", ""))
        except ValueError:
            return None
    return None
