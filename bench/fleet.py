"""A simulated fleet: ONE process serving `--count` agents, each the real agent factory
(`deploy.agent.AgentFactory` over one `AgentService`) listening on its own loopback address and
the same port. Started by bench/run.py; it writes `--ready` once every address listens and
stops on SIGTERM or after `--lifetime` seconds, whichever comes first."""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path


def fleet_address(index: int) -> str:
    """The index-th simulated agent's address: 127.0.1.1 … 127.0.1.250, 127.0.2.1 …
    (127.0.0.x stays for the real agent processes)."""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ini", required=True, help="agent config (its addr/port are not used)")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ready", required=True, help="file written once every address listens")
    p.add_argument("--log", required=True)
    p.add_argument("--lifetime", type=float, default=1800.0)
    args = p.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.count + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from deploy.agent import AgentFactory, AgentService
    from deploy.config import load_agent_config

    log_file = open(args.log, "a")  # open for the process's whole life
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(log_file),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
            )
        ],
        redirectStandardIO=False,
    )
    config = load_agent_config(args.ini)
    service = AgentService(config, reactor)
    service.startup()
    factory = AgentFactory(service)
    for index in range(args.count):
        reactor.listenTCP(args.port, factory, backlog=128, interface=fleet_address(index))
    Path(args.ready).write_text(f"{args.count}\n")
    reactor.callLater(args.lifetime, reactor.stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
