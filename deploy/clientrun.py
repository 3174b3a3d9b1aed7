"""Running one order for `deploy-client`: the engine (plain TCP without Twisted, or Twisted for
TLS, `--wait`, `--debug` and rolling batches), following hosts as they answer (`Reporter`), and
printing the outcome with its exit code. Twisted is imported only inside `run`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from deploy import output
from deploy.output import EXIT_INTERRUPTED, Row
from deploy.progressline import (
    RUNNING,
    ProgressLine,
    SyncBoard,
    SyncEvent,
    answered_parts,
    progress_event,
)

if TYPE_CHECKING:
    from deploy.orders import ClientOptions, FanOutResult, HostResult, Order

__all__ = ["EXIT_INTERRUPTED", "Reporter", "print_outcome", "run", "wants_tls"]


class Reporter:
    """Follows a run as hosts answer: rows, the progress line, NDJSON lines, --verbose; with
    --wait also the syncs it follows (`SyncBoard`) and their NDJSON progress events."""

    def __init__(
        self,
        fmt: str,
        total: int,
        verbose: bool,
        progress: ProgressLine,
        *,
        wait: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.format = fmt
        self.total = total
        self.verbose = verbose
        self.progress = progress
        self.rows: dict[str, list[Row]] = {}
        self.failed = 0
        self.board = SyncBoard(total) if wait else None
        self.clock = clock

    def start(self) -> None:
        self.redraw()

    def on_result(self, result: HostResult, seconds: float | None = None) -> None:
        rows = output.rows_for(result.host, result.order, result.to_json(), seconds)
        self.rows[result.host] = rows
        if any(not r.good and r.outcome != output.SKIPPED for r in rows):
            self.failed += 1
        if self.board is not None:
            for row in rows:
                if row.outcome != output.SKIPPED:
                    self.board.result(row.via, row.host, row.good)
        if self.verbose:
            self.progress.message(
                f"{result.host}: {result.code or 'no answer'} {result.reason}".rstrip()
            )
        if self.format == "ndjson":
            self.progress.clear()
            for row in rows:
                print(output.ndjson_line(row.to_json()), flush=True)
        self.redraw()

    def on_sync(self, event: SyncEvent) -> None:
        """What --wait learnt of one sync: the summary line, and in NDJSON a progress event per
        host at most every EVENT_EVERY seconds."""
        if self.board is None:
            return
        self.board.update(event)
        if (
            self.format == "ndjson"
            and event.state == RUNNING
            and event.progress  # rsync has printed figures
            and self.board.event_due(event.key, self.clock())
        ):
            self.progress.clear()
            print(output.ndjson_line(progress_event(event)), flush=True)
        self.redraw()

    def redraw(self) -> None:
        if self.board is not None:
            self.progress.update(self.board.parts())
        else:
            self.progress.update(answered_parts(len(self.rows), self.total, self.failed))


def print_outcome(
    fmt: str, rows: list[Row], result_map: Mapping[str, Any], stopped: bool, wide: bool = False
) -> int:
    """Print the end of a run in `fmt` and return its exit code."""
    code = output.exit_code(rows, stopped)
    if fmt == "table":
        from deploy.table import render_table

        print(render_table(rows, stopped, wide=wide))
    elif fmt == "ndjson":
        print(output.ndjson_line(output.summary_json(rows, stopped, code)))
    else:
        print(output.render_json(result_map))
    sys.stdout.flush()
    return code


AGENT_THREAD_TIMEOUT = 10.0
PROXY_THREAD_TIMEOUT = 60.0


def thread_timeout_for(given: float | None, via_proxy: bool) -> float:
    """--thread-timeout, else 10 s for an agent and 60 s for a proxy: a proxy answers only once
    its slowest agent has answered or timed out, so it needs more room than one agent."""
    if given is not None:
        return given
    return PROXY_THREAD_TIMEOUT if via_proxy else AGENT_THREAD_TIMEOUT


def run(
    args: argparse.Namespace,
    hosts: list[str],
    order_for: Callable[[str], Order],
    via_proxy: bool,
) -> int:
    """Send the order to every host (following syncs with --wait), print, return the exit code."""
    rolling = not via_proxy and bool(args.batch or args.max_fail)
    if not (wants_tls(args) or args.wait or args.debug or rolling):
        return run_plain(args, hosts, order_for, via_proxy)
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    from deploy.client import OrderClient, TimedSender, fan_out
    from deploy.follow import SyncWaiter

    options = client_options(args, hosts, via_proxy, tls=make_tls(args))
    if args.debug:
        from twisted.logger import globalLogBeginner, textFileLogObserver

        # The answer stays on stdout: only Twisted's own events go to stderr.
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(sys.stderr)], redirectStandardIO=False
        )
    reporter = Reporter(
        args.format, len(hosts), args.verbose, ProgressLine(sys.stderr), wait=args.wait
    )
    outcome: dict[str, Any] = {}

    async def go(reactor: Any) -> None:
        sender: Any = OrderClient(reactor, options)
        if args.wait:
            sender = SyncWaiter(sender, reactor, args.wait_timeout, reporter.on_sync)
        timed = TimedSender(sender, time.monotonic)
        reporter.start()
        outcome["fan"] = await fan_out(
            timed,
            hosts,
            order_for,
            max_parallel=args.max_parallel,
            batch=None if via_proxy else args.batch,
            max_fail=None if via_proxy else args.max_fail,
            on_result=lambda r: reporter.on_result(r, timed.seconds.get(r.host)),
        )

    try:
        react(lambda r: Deferred.fromCoroutine(go(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    going_on = "; the syncs go on (see --order=status)" if args.wait else ""
    return report(args, reporter, len(hosts), outcome.get("fan"), going_on)


def run_plain(
    args: argparse.Namespace,
    hosts: list[str],
    order_for: Callable[[str], Order],
    via_proxy: bool,
) -> int:
    """`run` for plain TCP without --wait or rolling batches: the same orders and output, sent
    by `deploy.plainclient` without importing Twisted (most of a start-up otherwise)."""
    from deploy.plainclient import fan_out_plain

    options = client_options(args, hosts, via_proxy)
    reporter = Reporter(args.format, len(hosts), args.verbose, ProgressLine(sys.stderr))
    reporter.start()
    fan = None
    try:
        fan = fan_out_plain(hosts, order_for, options, on_result=reporter.on_result)
    except KeyboardInterrupt:
        pass
    return report(args, reporter, len(hosts), fan)


def client_options(
    args: argparse.Namespace, hosts: list[str], via_proxy: bool, tls: Any = None
) -> ClientOptions:
    """The client's options from the command line; a bad --batch or --max-fail raises
    ValueError before anything is sent."""
    from deploy.orders import ClientOptions, parse_budget

    parse_budget(args.batch, max(1, len(hosts)), "--batch")
    parse_budget(args.max_fail, max(1, len(hosts)), "--max-fail")
    return ClientOptions(
        port=args.port or (3441 if via_proxy else 3440),
        key_cipher=args.key_cipher,
        key_id=args.key_id,
        bind_host=bool(args.bind_host),
        legacy_auth=bool(args.legacy_auth),
        socket_timeout=args.socket_timeout,
        thread_timeout=thread_timeout_for(args.thread_timeout, via_proxy),
        tls=tls,
        max_parallel=args.max_parallel,
    )


def report(
    args: argparse.Namespace,
    reporter: Reporter,
    total: int,
    fan: FanOutResult | None,
    going_on: str = "",
) -> int:
    """Print the outcome of a fan-out (None: interrupted) and return the exit code."""
    from deploy.orders import result_map

    reporter.progress.clear()
    if fan is None:
        print(
            f"deploy-client: interrupted after {len(reporter.rows)}/{total} hosts answered"
            + going_on,
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    results = list(fan.results.values())
    rows = [row for host in fan.results for row in reporter.rows.get(host, [])]
    return print_outcome(args.format, rows, result_map(results), fan.stopped, args.wide)


def wants_tls(args: argparse.Namespace) -> bool:
    """Any --ssl-* option turns TLS on."""
    return bool(args.ssl_public_key or args.ssl_ca or args.ssl_cert or args.ssl_key)


def make_tls(args: argparse.Namespace) -> Callable[[str], Any] | None:
    """host → TLS connection creator, the files loaded (and checked) once; None without TLS."""
    if not wants_tls(args):
        return None
    from deploy.tls import TLSConfigError, client_context_factories

    try:
        return client_context_factories(
            public_key_path=args.ssl_public_key,
            ca_path=args.ssl_ca,
            cert_path=args.ssl_cert,
            key_path=args.ssl_key,
        )
    except TLSConfigError as e:
        raise ValueError(str(e)) from None
