"""`twistd deploy-proxy`: the proxy's command-line options (the original's, plus ours) and
`makeService`. Options beat the config file, which beats the defaults."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.python import usage

from deploy.config import ConfigError, ProxyConfig, load_proxy_config
from deploy.daemon import (
    COMMON_PARAMETERS,
    IGNORED_OPTIONS,
    collect_overrides,
    listening_service,
    log_ignored_options,
)

DEFAULT_PATH = "/etc/deploy/deploy_proxy.ini"

CLIENT_PARAMETERS = [
    ["client-port", None, None, "port to connect to agents (default: 3440)"],
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


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a deploy proxy: it takes orders with an API key, checks which agents the key may "
        "reach, and fans the order out to them, answering with every agent's result."
    )
    optFlags = [
        ["debug", None, "running debug mode (log level debug)"],
        ["legacy-auth", None, "also accept the original one-time auth_key"],
        ["client-legacy-auth", None, "send agents the original one-time auth_key"],
    ]
    optParameters = [
        ["path", None, DEFAULT_PATH, "server configuration file"],
        *COMMON_PARAMETERS,
        *CLIENT_PARAMETERS,
    ]

    def postOptions(self) -> None:
        overrides = collect_overrides(self)
        for name, *_ in CLIENT_PARAMETERS:
            if self.get(name) is not None and name not in (
                "client-worker-method",
                "client-ipc-path",
            ):
                overrides[name.replace("-", "_")] = self[name]
        if self["legacy-auth"]:
            overrides["legacy_auth"] = True
        if self["client-legacy-auth"]:
            overrides["client_legacy_auth"] = True
        try:
            self.config: ProxyConfig = load_proxy_config(self["path"], overrides)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from deploy.proxy import ProxyFactory, ProxyService

    config = options.config
    proxy = ProxyService(config, reactor)
    for name in proxy.allowed_hosts.unresolved:
        ProxyService.log.warn("allow::hosts entry {name} does not resolve; ignored", name=name)
    top = service.MultiService()
    log_ignored_options(config.server, IGNORED_OPTIONS)
    listening_service(reactor, config.server, ProxyFactory(proxy)).setServiceParent(top)
    return top
