"""Reload on SIGHUP: read the config (and the jobs or API file) again, check it as
--check-config does, swap it into the running agent or proxy and log what changed, or keep the
old one and log why; reopen the log files either way. Running syncs, fan-outs and connections
keep what they started with."""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from deploy.checkconfig import Problem
from deploy.logs import api_key_id

# [server] settings a running daemon cannot take over: its socket, its identity, its files.
RESTART_SETTINGS = (
    "addr",
    "port",
    "backlog",
    "socket_accept_filter",
    "ssl",
    "ssl_private_key",
    "ssl_certificate",
    "ssl_client_ca",
    "user",
    "group",
    "state_path",
    "process_name",
    "log_write",
    "log_error_level",
    "log_error_path",
    "log_access_path",
    "audit_log_path",
    "metrics_addr",
    "metrics_port",
)


class ConfigReloader:
    """One reload: `load_again()` answers (config or None, problems) as --check-config finds
    them; `apply(config)` swaps a good one in; `changes(old, new)` says what differs."""

    log = Logger()

    def __init__(
        self,
        *,
        path: str,
        load_again: Callable[[], tuple[Any, list[Problem]]],
        current: Callable[[], Any],
        apply: Callable[[Any], None],
        changes: Callable[[Any, Any], list[str]],
        reopen_logs: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.load_again = load_again
        self.current = current
        self.apply = apply
        self.changes = changes
        self.reopen_logs = reopen_logs
        self.notify: Any = None  # a deploy.sdnotify.NotifyService, once the daemon has one

    def reload(self) -> bool:
        """Reload now; True when the new config is in force."""
        if self.notify is not None:
            self.notify.reloading()
        # First, so that what follows is written to the new files (logrotate moved the old).
        self.reopen_logs()
        try:
            config, problems = self.load_again()
        except Exception:
            self.log.failure("reload of {path} failed; keeping the running config", path=self.path)
            self._done("reload failed; running the previous config")
            return False
        fatal = [p for p in problems if p.fatal]
        if config is None or fatal:
            self.log.error("reload of {path} refused, keeping the running config:", path=self.path)
            for problem in fatal or problems:
                self.log.error("{problem}", problem=str(problem))
            self._done("reload refused; running the previous config")
            return False
        for problem in problems:
            self.log.warn("{problem}", problem=str(problem))
        changes = self.changes(self.current(), config)
        self.apply(config)
        self.log.info(
            "reloaded {path}: {changes}", path=self.path, changes="; ".join(changes) or "no change"
        )
        self._done("reloaded")
        return True

    def _done(self, status: str) -> None:
        if self.notify is not None:
            self.notify.reloaded(status)


class ReloadService(service.Service):
    """SIGHUP reloads while the daemon runs (the default action would end it without a word)."""

    def __init__(self, reactor: Any, reloader: ConfigReloader) -> None:
        self.reactor = reactor
        self.reloader = reloader
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum: int, frame: Any) -> None:
        # A signal handler may run between any two bytecodes: leave the work to the reactor.
        self.reactor.callFromThread(self.reloader.reload)

    def stopService(self) -> None:
        super().stopService()
        previous = self._previous if self._previous is not None else signal.SIG_DFL
        signal.signal(signal.SIGHUP, previous)


# --------------------------------------------------------------------------- what changed


def mapping_changes(what: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`groups added: a, b`, `groups removed: c`, `groups changed: d` (only those that apply)."""
    out = []
    added = [name for name in new if name not in old]
    removed = [name for name in old if name not in new]
    changed = [name for name in new if name in old and new[name] != old[name]]
    for verb, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            out.append(f"{what} {verb}: {', '.join(names)}")
    return out


def server_changes(old: Any, new: Any) -> list[str]:
    out: list[str] = []
    later: list[str] = []
    for f in fields(old):
        if getattr(old, f.name) == getattr(new, f.name):
            continue
        (later if f.name in RESTART_SETTINGS else out).append(f.name)
    if out:
        out = [f"[server] {', '.join(out)} changed"]
    if later:
        out.append(f"[server] {', '.join(later)} changed but take effect at the next restart")
    return out


def agent_changes(old: Any, new: Any) -> list[str]:
    """What a reload of an agent config changes, for the log."""
    out = mapping_changes("groups", old.groups, new.groups)
    out += mapping_changes("jobs", old.jobs, new.jobs)
    if old.allow_hosts != new.allow_hosts:
        out.append("[allow::hosts] changed")
    if old.allow_paths != new.allow_paths:
        out.append("[allow::paths] changed")
    return out + server_changes(old.server, new.server)


def proxy_changes(old: Any, new: Any) -> list[str]:
    """What a reload of a proxy config changes, for the log (API keys by their sha256 prefix)."""

    def by_id(keys: Mapping[str, Any]) -> dict[str, Any]:
        return {str(api_key_id(key)): groups for key, groups in keys.items()}

    out = mapping_changes("keys", by_id(old.keys), by_id(new.keys))
    out += mapping_changes("groups", old.servers, new.servers)
    if old.allow_hosts != new.allow_hosts:
        out.append("[allow::hosts] changed")
    if old.client != new.client:
        out.append("[client] changed")
    return out + server_changes(old.server, new.server)


# --------------------------------------------------------------------------- swapping it in


def _carry_authenticator(running: Any, fresh: Any) -> Any:
    """The fresh authenticator (keys, names, window, legacy settings as now configured) with the
    nonces the running one has seen, so that no request can be replayed across a reload."""
    if running is not None and fresh is not None:
        fresh.verifier.carry_nonces(running.verifier)
    return fresh


def _warn_unresolved(fresh: Any) -> None:
    for name in fresh.allowed_hosts.unresolved:
        ConfigReloader.log.warn("allow::hosts entry {name} does not resolve; ignored", name=name)


def swap_agent(agent: Any, config: Any) -> None:
    """Put `config` into the running `agent` (a deploy.agent.AgentService): its access lists,
    targets, jobs file and auth settings; the job registry and the orders in flight stay."""
    fresh = type(agent)(config, agent.reactor, clock=agent.clock)
    _warn_unresolved(fresh)
    agent.authenticator = _carry_authenticator(agent.authenticator, fresh.authenticator)
    agent.policies = fresh.policies
    agent.allowed_hosts = fresh.allowed_hosts
    agent.targets = fresh.targets
    agent.config = config
    for orders in (agent.orders, agent.release_orders):
        orders.config = config
        orders.targets = fresh.targets
    agent.jobs.grace = config.server.rkill_grace


def swap_proxy(proxy: Any, config: Any) -> None:
    """Put `config` into the running `proxy` (a deploy.proxy.ProxyService): keys, servers,
    access list, auth and the agent client; fan-outs in flight keep the client they have."""
    fresh = type(proxy)(config, proxy.reactor)
    _warn_unresolved(fresh)
    proxy.authenticator = _carry_authenticator(proxy.authenticator, fresh.authenticator)
    proxy.allowed_hosts = fresh.allowed_hosts
    proxy.api_keys = fresh.api_keys
    if config.client != proxy.config.client:
        proxy.options = fresh.options
    proxy.config = config
