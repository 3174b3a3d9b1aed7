"""A simulated fleet: `--count` agents spread over `--processes` processes, each serving a
contiguous slice of the addresses with the real agent factory (`deploy.agent.AgentFactory` over
its own `AgentService` and state dir) on the same port. Started by bench/run.py; it writes
`--ready` (the serving processes' pids, one a line) once every address listens, and stops them
all on SIGTERM, when one of them dies, or after `--lifetime` seconds."""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import time
from pathlib import Path
from types import FrameType


def fleet_address(index: int) -> str:
    """The index-th simulated agent's address: 127.0.1.1 … 127.0.1.250, 127.0.2.1 …
    (127.0.0.x stays for the real agent processes)."""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


def slices(count: int, processes: int) -> list[range]:
    """`count` address indexes cut into `processes` contiguous slices, sizes differing by ≤ 1."""
    processes = max(1, min(processes, count))
    size, extra = divmod(count, processes)
    out, first = [], 0
    for p in range(processes):
        n = size + (1 if p < extra else 0)
        out.append(range(first, first + n))
        first += n
    return out


def serve(args: argparse.Namespace) -> int:
    """One serving process: the agents `--first` … `--first + --count - 1`."""
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
    # Each serving process keeps its records in its own state dir, as each agent does.
    config = load_agent_config(args.ini, {"state_path": args.state} if args.state else None)
    service = AgentService(config, reactor)
    service.startup()
    factory = AgentFactory(service)
    for index in range(args.first, args.first + args.count):
        reactor.listenTCP(args.port, factory, backlog=128, interface=fleet_address(index))
    Path(args.ready).write_text(f"{args.count}\n")
    reactor.callLater(args.lifetime, reactor.stop)
    reactor.run()
    return 0


class Stop(Exception):
    """SIGTERM or SIGINT reached the launcher."""


def launch(args: argparse.Namespace) -> int:
    """Start one serving process per slice, write `--ready` once all listen, then wait: every
    serving process is stopped (by its own pid) whenever the launcher ends."""
    from deploy.testing import ChildProcess, NotReady, wait_until

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise Stop(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready = Path(args.ready)
    log = Path(args.log)
    workers: list[tuple[ChildProcess, Path]] = []
    try:
        for n, part in enumerate(slices(args.count, args.processes)):
            flag = ready.with_name(f"{ready.name}.{n}")
            flag.unlink(missing_ok=True)
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                f"--ini={args.ini}",
                f"--first={part.start}",
                f"--count={len(part)}",
                f"--port={args.port}",
                f"--ready={flag}",
                f"--log={log.with_name(f'{log.stem}-{n}{log.suffix}')}",
                f"--lifetime={args.lifetime}",
                *([f"--state={args.state}-{n}"] if args.state else []),
            ]
            out = log.with_name(f"{log.stem}-{n}.out")
            workers.append((ChildProcess(argv, out, name=f"fleet process {n}"), flag))

        def all_listen() -> bool:
            for child, _ in workers:
                if child.proc.poll() is not None:
                    raise NotReady(f"{child.name} exited: {child.log_text()[-2000:]}")
            return all(flag.exists() for _, flag in workers)

        wait_until(all_listen, 120, interval=0.05, what="every fleet process to listen")
        ready.write_text("".join(f"{child.pid}\n" for child, _ in workers))
        deadline = time.monotonic() + args.lifetime
        while time.monotonic() < deadline:
            if any(child.proc.poll() is not None for child, _ in workers):
                return 1
            time.sleep(0.2)
        return 0
    except Stop:
        return 0
    finally:
        for child, _ in reversed(workers):
            child.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ini", required=True, help="agent config (its addr/port are not used)")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ready", required=True, help="file written once every address listens")
    p.add_argument("--log", required=True)
    p.add_argument("--lifetime", type=float, default=1800.0)
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help="launch this many serving processes; 0 (internal): serve --first … in this one",
    )
    p.add_argument("--first", type=int, default=0, help="first address index this process serves")
    p.add_argument(
        "--state",
        default="",
        help="state dir (instead of the config's); with --processes, process N uses STATE-N",
    )
    args = p.parse_args(argv)
    if args.processes > 1 and not args.state:
        p.error("--processes > 1 needs --state: every process keeps its own records")
    return launch(args) if args.processes > 0 else serve(args)


if __name__ == "__main__":
    sys.exit(main())
