"""`twistd deploy-proxy`: the proxy's command-line options (the original's, plus ours) and
`makeService`. Options beat the config file, which beats the defaults; a bad config stops the
daemon before it listens (`--check-config` only checks it); SIGHUP reloads it."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.python import usage

from deploy import daemon, reload
from deploy.checkconfig import check_proxy
from deploy.config import ProxyConfig, load_proxy_config

DEFAULT_PATH = "/etc/deploy/deploy_proxy.ini"

PROXY_UNUSED_OPTIONS = ("max_prefork", "max_process_timeout")
CLIENT_IGNORED_OPTIONS = ("worker_method", "ipc_path")

_UNUSED = "accepted for compatibility; ignored (the proxy runs no child processes)"
# The agent's wording of the shared options, where the proxy differs.
_PROXY_HELP = {
    "port": "listen port (default: 3441)",
    "max-prefork": _UNUSED,
    "max-process-timeout": _UNUSED,
    "key-cipher": "key clients must sign requests with (unset: the API key alone decides)",
}
SERVER_PARAMETERS = [
    [name, short, default, _PROXY_HELP.get(name, text)]
    for name, short, default, text in daemon.COMMON_PARAMETERS
]

CLIENT_PARAMETERS: list[list[Any]] = [
    ["client-port", None, None, "port to connect to agents (default: 3440)"],
    ["client-max-parallel", None, None, "most agents ordered at once (default: 64; 0: no limit)"],
    [
        "client-thread-timeout",
        None,
        None,
        "most seconds to wait for one agent's answer (default: 10)",
    ],
    ["client-socket-timeout", None, None, "most seconds to wait for a connection (default: 5)"],
    ["client-key-cipher", None, None, "key for signing requests to agents"],
    ["client-ssl-public-key", None, None, "TLS to agents: pin this public key (PEM)"],
    ["client-worker-method", None, None, "accepted for compatibility; ignored"],
    ["client-ipc-path", None, None, "accepted for compatibility; ignored"],
]


class Options(daemon.DaemonOptions):
    program = "deploy-proxy"
    synopsis = "[options]"
    longdesc = (
        "Run a deploy proxy: it takes orders with an API key, checks which agents the key may "
        "reach, and fans the order out to them, answering with every agent's result."
    )
    optFlags = [
        ["debug", None, "running debug mode (log level debug)"],
        ["legacy-auth", None, "also accept the original one-time auth_key"],
        ["client-legacy-auth", None, "send agents the original one-time auth_key"],
        daemon.CHECK_FLAG,
    ]
    optParameters = [
        ["path", None, DEFAULT_PATH, "server configuration file"],
        *SERVER_PARAMETERS,
        *CLIENT_PARAMETERS,
    ]

    def postOptions(self) -> None:
        overrides = daemon.collect_overrides(self)
        for name, *_ in CLIENT_PARAMETERS:
            # --client-worker-method/--client-ipc-path too: makeService warns they are ignored
            if self.get(name) is not None:
                overrides[name.replace("-", "_")] = self[name]
        if self["client-legacy-auth"]:
            overrides["client_legacy_auth"] = True
        self.config: ProxyConfig = self.load_config(
            load_proxy_config,
            check_proxy,
            overrides,
            uses_tls=lambda c: c.server.ssl or c.client.uses_tls,
        )


def build_service(options: Options, reactor: Any) -> service.MultiService:
    from deploy.config import TLSConfigError
    from deploy.proxy import ProxyFactory, ProxyService

    config = options.config
    warnings = options.refuse_problems(config)
    try:
        proxy = ProxyService(config, reactor)
    except TLSConfigError as e:
        raise usage.UsageError(f"[client] {e}") from None
    for name in proxy.allowed_hosts.unresolved:
        ProxyService.log.warn("allow::hosts entry {name} does not resolve; ignored", name=name)
    if not config.allow_hosts:
        ProxyService.log.warn("[allow::hosts] is empty: every request will be refused")
    if not config.keys:
        ProxyService.log.warn("no API keys (see [api] path): every order will be refused")
    factory = ProxyFactory(proxy)
    # From here on the error log keeps what is logged, for its file once the daemon starts.
    logs = daemon.setup_logging(config.server, factory, daemon="proxy")
    daemon.log_warnings(warnings)
    drop = daemon.run_as(config.server, logs)
    metrics = None
    if config.server.metrics_port:
        from deploy.metrics import ProxyMetrics

        metrics = ProxyMetrics()
        metrics.watch(factory)
        metrics.watch_rollouts(proxy.rollouts)
    # The proxy runs no child processes: the agent's process limits mean nothing here.
    daemon.log_ignored_options(config.server, (*daemon.IGNORED_OPTIONS, *PROXY_UNUSED_OPTIONS))
    for name in CLIENT_IGNORED_OPTIONS:
        value = getattr(config.client, name)
        if value:
            ProxyService.log.warn(
                "[client] {name} = {value} is accepted for compatibility and ignored",
                name=name,
                value=value,
            )
    reloader = reload.ConfigReloader(
        path=options["path"],
        load_again=options.load_again,
        current=lambda: proxy.config,
        apply=lambda new: reload.swap_proxy(proxy, new),
        changes=reload.proxy_changes,
        reopen_logs=logs.reopen,
    )
    return daemon.assemble(
        reactor, config.server, factory, logs, drop, metrics=metrics, reloader=reloader
    )


makeService = daemon.service_maker("deploy-proxy", build_service)
