"""`twistd deploy-agent`: the agent's command-line options (the original's, plus ours) and
`makeService`. Options beat the config file, which beats the defaults; a bad config stops the
daemon before it listens (`--check-config` only checks it); SIGHUP reloads it."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.python import usage

from deploy import daemon, reload
from deploy.checkconfig import check_agent
from deploy.config import AgentConfig, load_agent_config

DEFAULT_PATH = "/etc/deploy/deploy_agent.ini"


class Options(daemon.DaemonOptions):
    program = "deploy-agent"
    synopsis = "[options]"
    longdesc = (
        "Run a deploy agent: it answers status/rlist/rsync/rkill/exec orders from "
        "deploy-client or deploy-proxy and drives rsync against a central rsync daemon. "
        "Groups with releases = N are in release mode: rsync stages a release (release=LABEL), "
        "and the orders activate (GROUP[,ID]), rollback (GROUP[,ID]) and releases (GROUP) "
        "switch between releases and list them; status names the live release."
    )
    optFlags = [
        ["debug", None, "running debug mode (log level debug)"],
        ["legacy-auth", None, "also accept the original one-time auth_key"],
        daemon.CHECK_FLAG,
    ]
    optParameters = [
        ["path", None, DEFAULT_PATH, "server configuration file"],
        *daemon.COMMON_PARAMETERS,
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
        overrides = daemon.collect_overrides(self, extra=("state-path", "rkill-grace"))
        self.config: AgentConfig = self.load_config(
            load_agent_config, check_agent, overrides, uses_tls=lambda c: c.server.ssl
        )


def build_service(options: Options, reactor: Any) -> service.MultiService:
    from deploy.agent import AgentFactory, AgentService

    config = options.config
    warnings = options.refuse_problems(config)
    agent = AgentService(config, reactor)
    factory = AgentFactory(agent)
    # From here on the error log keeps what is logged, for its file once the daemon starts.
    logs = daemon.setup_logging(config.server, factory, daemon="agent")
    daemon.log_warnings(warnings)
    # Still root: directories the agent writes are made (or handed over) for --user first.
    queue_dirs = [g.queue_path for g in config.groups.values() if g.queue_path]
    drop = daemon.run_as(config.server, logs, own=[agent.state_dir], create=queue_dirs)
    metrics = None
    if config.server.metrics_port:
        from deploy.metrics import AgentMetrics

        metrics = AgentMetrics()
        metrics.watch_agent(agent, factory)
    try:
        agent.startup()
    except OSError as e:
        raise usage.UsageError(f"cannot prepare state directory {agent.state_dir}: {e}") from None
    daemon.log_ignored_options(config.server, daemon.IGNORED_OPTIONS)

    def apply(new: AgentConfig) -> None:
        reload.swap_agent(agent, new)
        if metrics is not None:
            metrics.set_groups(new.groups)

    reloader = reload.ConfigReloader(
        path=options["path"],
        load_again=options.load_again,
        current=lambda: agent.config,
        apply=apply,
        changes=reload.agent_changes,
        reopen_logs=logs.reopen,
    )
    return daemon.assemble(
        reactor,
        config.server,
        factory,
        logs,
        drop,
        metrics=metrics,
        # where the records really are (a private subdirectory of a shared one, deploy.statedir)
        writable=[agent.jobs.directory(agent.state_dir)],
        reloader=reloader,
    )


makeService = daemon.service_maker("deploy-agent", build_service)
