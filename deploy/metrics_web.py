"""The metrics port: a twisted.web site with `/metrics` (a daemon's registry, in the format the
scraper asks for) and `/healthz` (200 `ok`, or 503 and the first problem)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class MetricsResource(Resource):
    """`/metrics`: the registry in the format the scraper asks for (Prometheus text or
    OpenMetrics). Collected in the reactor's thread, unlike prometheus_client.twisted's
    resource (a WSGI app in the thread pool): the collectors read the agent's job table, which
    only the reactor's thread may touch; and a blocked reactor then shows as a failed scrape."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encoder, content_type = choose_encoder(accept or "")
        request.setHeader("Content-Type", content_type)
        body: bytes = encoder(self.registry)
        return body


class HealthResource(Resource):
    """`/healthz`: 200 `ok` while every check passes, else 503 with the first problem."""

    isLeaf = True

    def __init__(self, checks: Iterable[Callable[[], str | None]]) -> None:
        super().__init__()
        self.checks = list(checks)

    def problem(self) -> str | None:
        for check in self.checks:
            problem = check()
            if problem:
                return problem
        return None

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        problem = self.problem()
        if problem is None:
            return b"ok\n"
        request.setResponseCode(503)
        return problem.encode("utf-8", "replace") + b"\n"


class QuietSite(Site):
    """A Site that writes no access line per scrape into the daemon's log."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def metrics_site(registry: CollectorRegistry, health: HealthResource) -> Site:
    """The metrics port's site: `/metrics` and `/healthz`."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"healthz", health)
    return QuietSite(root)


def listening_check(is_listening: Callable[[], bool], what: str) -> Callable[[], str | None]:
    """A health check: the daemon's port is bound."""
    return lambda: None if is_listening() else f"not listening on {what}"


def writable_check(directory: str) -> Callable[[], str | None]:
    """A health check: a state record can be written in `directory`."""
    from deploy.statedir import StateDir, probe

    def check() -> str | None:
        try:
            if probe(StateDir(directory, directory)).full:
                return f"the state file system of {directory} is full"
        except OSError as e:
            return str(e.strerror or e)
        return None

    return check
