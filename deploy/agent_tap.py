"""`twistd deploy-agent`: the agent's command-line options (the original's, plus ours) and
`makeService`. Options beat the config file, which beats the defaults; a bad config stops the
daemon before it listens."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service
from twisted.python import usage

from deploy.config import AgentConfig, ConfigError, load_agent_config
from deploy.daemon import (
    COMMON_PARAMETERS,
    IGNORED_OPTIONS,
    ProcessTitleService,
    collect_overrides,
    listening_service,
    log_ignored_options,
    one_line_errors,
    run_as,
    setup_logging,
)

DEFAULT_PATH = "/etc/deploy/deploy_agent.ini"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a deploy agent: it answers status/rlist/rsync/rkill/exec orders from "
        "deploy-client or deploy-proxy and drives rsync against a central rsync daemon."
    )
    optFlags = [
        ["debug", None, "running debug mode (log level debug)"],
        ["legacy-auth", None, "also accept the original one-time auth_key"],
    ]
    optParameters = [
        ["path", None, DEFAULT_PATH, "server configuration file"],
        *COMMON_PARAMETERS,
        [
            "state-path",
            None,
            None,
            "directory of the background syncs' state (default: /var/lib/deploy)",
        ],
        [
            "rkill-grace",
            None,
            None,
            "seconds between TERM and KILL when stopping a sync (default: 5)",
        ],
    ]

    def postOptions(self) -> None:
        overrides = collect_overrides(self, extra=("state-path", "rkill-grace"))
        if self["legacy-auth"]:
            overrides["legacy_auth"] = True
        try:
            self.config: AgentConfig = load_agent_config(self["path"], overrides)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if not self.config.server.ssl:
            # Without TLS, keep Twisted from loading pyOpenSSL/cryptography when it imports
            # the reactor (twisted.internet.tcp, posixbase): ~12 MB of RSS in every daemon.
            sys.modules.setdefault("OpenSSL", None)  # type: ignore[arg-type]


def build_service(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from deploy.agent import AgentFactory, AgentService

    config = options.config
    agent = AgentService(config, reactor)
    factory = AgentFactory(agent)
    # From here on the error log keeps what is logged, for its file once the daemon starts.
    logs = setup_logging(config.server, factory, daemon="agent")
    # Still root: directories the agent writes are made (or handed over) for --user first.
    queue_dirs = [g.queue_path for g in config.groups.values() if g.queue_path]
    drop = run_as(config.server, logs, own=[agent.state_dir], create=queue_dirs)
    try:
        agent.startup()
    except OSError as e:
        raise usage.UsageError(f"cannot prepare state directory {agent.state_dir}: {e}") from None
    top = service.MultiService()
    log_ignored_options(config.server, IGNORED_OPTIONS)
    # Order matters: the port is bound (privilegedStartService) before privileges are dropped,
    # and the log files open (startService) after.
    listening_service(reactor, config.server, factory).setServiceParent(top)
    drop.setServiceParent(top)
    logs.setServiceParent(top)
    ProcessTitleService(config.server).setServiceParent(top)
    return top


makeService = one_line_errors("deploy-agent", build_service)
