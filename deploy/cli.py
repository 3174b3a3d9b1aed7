"""`deploy-client`: options (the original's and ours) resolved with the config file and the
environment, sending one order to many hosts (following syncs with `--wait`, retrying a saved
result's failures with `--retry-failed`), printing it as JSON, a table or NDJSON, and the exit code.

Twisted is imported only once an order is really sent: `--help` and usage errors stay fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from deploy import clientconfig, output
from deploy.message import ORDERS
from deploy.output import (  # noqa: F401  (the exit codes, re-exported for callers)
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    FORMATS,
    GOOD,
    Row,
    is_proxy_answer,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from deploy.orders import ClientOptions, FanOutResult, HostResult, Order

EXIT_INTERRUPTED = 130

# --wait polls `status` every 0.5 s for the first few seconds, then every second.
WAIT_POLL_FIRST = 0.5
WAIT_POLL = 1.0
WAIT_FAST_POLLS = 10
# A host that stops answering while --wait follows it (an agent restart) is given this long.
WAIT_LOST_CONTACT = 30.0


def _epilog() -> str:
    codes = "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    return f"""\
targets (--options):
  GROUP                       a [rsync::group::GROUP] of the agent's config
  HOST::MODULE/path,/local    inline: remote source, then local destination
  NAME,arg1,arg2              for --order=exec: a command of the agent's jobs file

through a proxy: --hosts=PROXY --port=3441 --api-key=KEY --args=groups:g1,g2 (or hosts:a,b)

defaults: command line > environment (DEPLOY_KEY_CIPHER, DEPLOY_API_KEY) > config file > built-in.
  config file: --config FILE, else ~/.config/deploy/client.ini ($XDG_CONFIG_HOME/deploy/... when
  set), section [client]: hosts, port, args, key_cipher, api_key, legacy_auth, ssl_public_key,
  ssl_ca, ssl_cert, ssl_key, format, thread_timeout, socket_timeout, max_parallel, wait_timeout.

exit codes:
{codes}
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 1: 2 means "a host failed" to the scripts we serve."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The options; those a config file may set default to None so precedence can be applied."""
    p = _Parser(
        prog="deploy-client",
        description="Send an order to deploy-agents (directly or through a deploy-proxy).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--order", choices=ORDERS, help="remote command")
    p.add_argument("--hosts", help="remote hosts, comma separated (host, host:port, [v6]:port)")
    p.add_argument(
        "--port", type=int, default=None, help="remote port (default: 3440, 3441 to a proxy)"
    )
    p.add_argument("--args", default=None, help="(groups|hosts):a,b — which agents a proxy orders")
    p.add_argument("--options", default="", help="order options: group, inline target, exec line")
    p.add_argument(
        "--key-cipher",
        default=None,
        help="shared key for request signing (default: $DEPLOY_KEY_CIPHER, config, 65535)",
    )
    p.add_argument(
        "--api-key", default=None, help="api key for a proxy (default: $DEPLOY_API_KEY, config)"
    )
    p.add_argument(
        "--legacy-auth",
        action="store_true",
        default=None,
        help="send the original one-time auth_key instead of a signature (old agents/proxies)",
    )
    p.add_argument("--ssl-public-key", help="TLS: pin the server's public key (PEM)")
    p.add_argument("--ssl-ca", help="TLS: verify the server's certificate chain and host name")
    p.add_argument("--ssl-cert", help="TLS: client certificate (PEM) for mutual TLS")
    p.add_argument("--ssl-key", help="TLS: client private key (PEM) for mutual TLS")
    p.add_argument(
        "--thread-timeout",
        type=float,
        default=None,
        help="most seconds to wait for one host's answer (default: 10; 60 to a proxy, which "
        "waits for its own agents first)",
    )
    p.add_argument(
        "--socket-timeout",
        type=float,
        default=None,
        help="most seconds to wait for a connection (default: 5)",
    )
    p.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        help="most hosts ordered at once; with --wait, most syncs followed at once (default: 64)",
    )
    p.add_argument("--batch", default=None, help="rolling: hosts per batch, N or N%%")
    p.add_argument(
        "--max-fail",
        default=None,
        help="rolling: stop starting batches once more than N (or N%%) hosts failed",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="json: the original shape (default); table: a row per host and a summary; "
        "ndjson: a JSON line per host as it answers, then a summary line",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="with --order=rsync: follow each sync (polling status) until it ends; the output "
        "carries each host's lastRsync and the exit code its outcome",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --wait: stop following a sync after this long (default: 3600)",
    )
    p.add_argument(
        "--retry-failed",
        metavar="FILE",
        help="re-run the order on only the hosts (through a proxy: the agents) that did not "
        "succeed in FILE, a saved --format json or ndjson result; replaces --hosts",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="client config file (default: ~/.config/deploy/client.ini if it exists)",
    )
    p.add_argument("--ipc-path", help=argparse.SUPPRESS)
    p.add_argument("--worker-method", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="log the conversation to stderr")
    p.add_argument("--verbose", action="store_true", help="print each host as it answers")
    return p


# -------------------------------------------------------------------------------- outcomes


def exit_code_for(results: list[Any], stopped: bool) -> int:
    """The exit code of a run's HostResults (see output.EXIT_CODES)."""
    rows = [row for r in results for row in output.rows_for(r.host, r.order, r.to_json())]
    return output.exit_code(rows, stopped)


# -------------------------------------------------------------------------------- retry


@dataclass
class RetryPlan:
    """What `--retry-failed` re-runs: hosts ordered directly (or proxies whose own answer
    failed), and per proxy the agents that failed behind it."""

    orders: list[str] = field(default_factory=list)
    direct: list[str] = field(default_factory=list)
    via: dict[str, list[str]] = field(default_factory=dict)

    @property
    def hosts(self) -> list[str]:
        return list(dict.fromkeys([*self.direct, *self.via]))


def read_result_rows(path: str) -> list[Row]:
    """The rows of a saved result: the JSON map (`--format json`) or NDJSON lines."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as e:
        raise ValueError(f"--retry-failed: cannot read {path}: {e.strerror or e}") from None
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict) and not isinstance(whole.get("host"), str):
        if "summary" in whole:
            return []
        try:
            return output.rows_from_result_map(whole)
        except ValueError as e:
            raise ValueError(f"--retry-failed: {path}: {e}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            raise ValueError(
                f"--retry-failed: {path}:{number}: neither a JSON result nor NDJSON"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"--retry-failed: {path}:{number}: expected a JSON object")
        if "summary" in data:
            continue
        host, order = data.get("host"), data.get("order")
        if not isinstance(host, str) or not isinstance(order, str):
            raise ValueError(f"--retry-failed: {path}:{number}: a line without host and order")
        entry = {k: v for k, v in data.items() if k not in ("host", "via", "order", "outcome")}
        outcome = data.get("outcome")
        if not isinstance(outcome, str):
            outcome = output.outcome_of(order, entry)
        via = data.get("via") if isinstance(data.get("via"), str) else None
        rows.append(Row(host, order, outcome, entry, via=via))
    return rows


def retry_plan(rows: list[Row]) -> RetryPlan:
    """The hosts of `rows` that did not succeed (failed, unreachable, timed out, skipped)."""
    plan = RetryPlan()
    for row in rows:
        if row.order not in plan.orders:
            plan.orders.append(row.order)
        if row.good:
            continue
        if row.via is None:
            if row.host not in plan.direct:
                plan.direct.append(row.host)
        else:
            agents = plan.via.setdefault(row.via, [])
            if row.host not in agents:
                agents.append(row.host)
    return plan


# -------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Parse, resolve defaults, check, run; every local problem is exit code 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if env is None else env

    def usage(message: str) -> int:
        parser.print_usage(sys.stderr)
        print(f"deploy-client: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        file_config = clientconfig.load(args.config, env)
    except clientconfig.ClientConfigError as e:
        print(f"deploy-client: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for warning in file_config.warnings:
        print(f"deploy-client: warning: {warning}", file=sys.stderr)
    explicit = {key: getattr(args, key, None) for key in clientconfig.DEFAULTS}
    api_key_on_command_line = bool(args.api_key)
    hosts_on_command_line = args.hosts is not None
    for key, value in clientconfig.resolve(explicit, env, file_config).items():
        setattr(args, key, value)

    plan: RetryPlan | None = None
    if args.retry_failed:
        if hosts_on_command_line:
            return usage("--retry-failed takes its hosts from the file: leave out --hosts")
        try:
            plan = retry_plan(read_result_rows(args.retry_failed))
        except ValueError as e:
            print(f"deploy-client: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if not args.order:
            if len(plan.orders) > 1:
                return usage(f"{args.retry_failed} holds several orders; choose one with --order")
            args.order = plan.orders[0] if plan.orders else None
    if not args.order:
        return usage("--order is required")
    if args.wait and args.order != "rsync":
        return usage("--wait follows syncs: it needs --order=rsync")
    if plan is not None:
        hosts = plan.hosts
        via_proxy = bool(plan.via) or bool(args.args) or api_key_on_command_line
    else:
        if not args.hosts:
            return usage("--hosts is required")
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        if not hosts:
            return usage("--hosts is required")
        via_proxy = bool(args.args) or api_key_on_command_line
    if plan is not None and not hosts:
        print(
            f"deploy-client: nothing to retry: every host in {args.retry_failed} succeeded",
            file=sys.stderr,
        )
        return print_outcome(args.format, [], {}, False)
    if not wants_tls(args):
        # Without TLS, keep Twisted from importing pyOpenSSL/cryptography: twisted.internet.tcp
        # and posixbase import them eagerly when they can (~70 ms of every start here). A None
        # in sys.modules makes that import fail, and Twisted then goes on without TLS.
        sys.modules.setdefault("OpenSSL", None)  # type: ignore[arg-type]
    try:
        return run(args, hosts, orders_for(args, via_proxy, plan), via_proxy)
    except (ValueError, OSError) as e:
        print(f"deploy-client: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def orders_for(
    args: argparse.Namespace, via_proxy: bool, plan: RetryPlan | None
) -> Callable[[str], Order]:
    """host → the Order to send it: the same for every host, except that a retry through a proxy
    names only that proxy's failed agents."""
    from deploy.orders import Order  # plain dataclasses, no Twisted

    def order_for(host: str) -> Order:
        agents = plan.via.get(host) if plan is not None else None
        proxy_args = f"hosts:{','.join(agents)}" if agents else (args.args or "")
        order = Order(
            args.order,
            args.options,
            proxy_args if via_proxy else (args.args or ""),
            args.api_key if via_proxy else "",
        )
        if via_proxy and (args.batch or args.max_fail):
            # A proxy rolls out itself: pass the budget along instead of batching proxies.
            order.extra = {
                k: v for k, v in (("batch", args.batch), ("max_fail", args.max_fail)) if v
            }
        return order

    return order_for


# -------------------------------------------------------------------------------- the run


class Reporter:
    """Follows a run as hosts answer: rows, the progress line, NDJSON lines, --verbose."""

    def __init__(self, fmt: str, total: int, verbose: bool, progress: output.ProgressLine):
        self.format = fmt
        self.total = total
        self.verbose = verbose
        self.progress = progress
        self.rows: dict[str, list[Row]] = {}
        self.failed = 0
        self.syncs: dict[str, str] = {}  # label → progress text of the syncs --wait follows

    def start(self) -> None:
        self.redraw()

    def on_result(self, result: HostResult, seconds: float | None = None) -> None:
        rows = output.rows_for(result.host, result.order, result.to_json(), seconds)
        self.rows[result.host] = rows
        if any(not r.good and r.outcome != output.SKIPPED for r in rows):
            self.failed += 1
        if self.verbose:
            self.progress.message(
                f"{result.host}: {result.code or 'no answer'} {result.reason}".rstrip()
            )
        if self.format == "ndjson":
            self.progress.clear()
            for row in rows:
                print(output.ndjson_line(row.to_json()), flush=True)
        self.redraw()

    def sync_progress(self, label: str, text: str | None) -> None:
        if text is None:
            self.syncs.pop(label, None)
        else:
            self.syncs[label] = text
        self.redraw()

    def redraw(self) -> None:
        text = output.answered_text(len(self.rows), self.total, self.failed)
        if self.syncs:
            text += " | " + ", ".join(f"{k} {v}" for k, v in self.syncs.items())
        self.progress.update(text)


def print_outcome(fmt: str, rows: list[Row], result_map: Mapping[str, Any], stopped: bool) -> int:
    """Print the end of a run in `fmt` and return its exit code."""
    code = output.exit_code(rows, stopped)
    if fmt == "table":
        print(output.render_table(rows, stopped))
    elif fmt == "ndjson":
        print(output.ndjson_line(output.summary_json(rows, stopped, code)))
    else:
        print(output.render_json(result_map))
    sys.stdout.flush()
    return code


class TimedSender:
    """Wraps a sender (`send(host, order)` → Deferred[HostResult]) and keeps each host's time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.options = inner.options
        self.seconds: dict[str, float] = {}

    def send(self, host: str, order: Order) -> Deferred[HostResult]:
        started = time.monotonic()

        def done(result: HostResult) -> HostResult:
            self.seconds[host] = time.monotonic() - started
            return result

        return self.inner.send(host, order).addCallback(done)


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

    from deploy.client import OrderClient, fan_out

    options = client_options(args, hosts, via_proxy, tls=make_tls(args))
    if args.debug:
        from twisted.logger import globalLogBeginner, textFileLogObserver

        # The answer stays on stdout: only Twisted's own events go to stderr.
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(sys.stderr)], redirectStandardIO=False
        )
    reporter = Reporter(args.format, len(hosts), args.verbose, output.ProgressLine(sys.stderr))
    outcome: dict[str, Any] = {}

    async def go(reactor: Any) -> None:
        sender: Any = OrderClient(reactor, options)
        if args.wait:
            sender = SyncWaiter(sender, reactor, args.wait_timeout, reporter.sync_progress)
        timed = TimedSender(sender)
        reporter.start()
        outcome["fan"] = await fan_out(
            timed,  # type: ignore[arg-type]  (duck-typed: send + options)
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
    return report(args.format, reporter, len(hosts), outcome.get("fan"), going_on)


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
    reporter = Reporter(args.format, len(hosts), args.verbose, output.ProgressLine(sys.stderr))
    reporter.start()
    fan = None
    try:
        fan = fan_out_plain(hosts, order_for, options, on_result=reporter.on_result)
    except KeyboardInterrupt:
        pass
    return report(args.format, reporter, len(hosts), fan)


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
        legacy_auth=bool(args.legacy_auth),
        socket_timeout=args.socket_timeout,
        thread_timeout=thread_timeout_for(args.thread_timeout, via_proxy),
        tls=tls,
        max_parallel=args.max_parallel,
    )


def report(
    fmt: str, reporter: Reporter, total: int, fan: FanOutResult | None, going_on: str = ""
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
    return print_outcome(fmt, rows, result_map(results), fan.stopped)


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


# -------------------------------------------------------------------------------- --wait


def _started(content: Any) -> bool:
    """An rsync answer saying a sync runs (just started, or already running)."""
    return (
        isinstance(content, dict)
        and content.get("return") in ("true", True, 1)
        and bool(content.get("checksum"))
        and "outcome" not in content
    )


@dataclass
class _Followed:
    """One sync `--wait` follows: an agent's rsync answer until the sync ends."""

    label: str
    rsync: dict[str, Any]
    lost_since: float | None = None
    final: dict[str, Any] | None = None


class SyncWaiter:
    """A sender for `rsync` that, once a host (or a proxy's agents) started the sync, polls
    `status` until it ends, and answers the rsync answer with the sync's `lastRsync` and
    `outcome` added (`return` "false" when the outcome is not ok/warning)."""

    def __init__(
        self,
        client: Any,
        reactor: Any,
        timeout: float,
        on_progress: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.client = client
        self.options = client.options
        self.reactor = reactor
        self.timeout = timeout
        self.on_progress = on_progress or (lambda _label, _text: None)

    def send(self, host: str, order: Order) -> Deferred[HostResult]:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._send(host, order))

    async def _send(self, host: str, order: Order) -> HostResult:
        first: HostResult = await self.client.send(host, order)
        if not first.http_ok:
            return first
        content = first.content
        if is_proxy_answer(content):
            followed = [
                _Followed(agent, per_order["rsync"]["content"])
                for agent, per_order in content.items()
                if isinstance(per_order.get("rsync"), dict)
                and output.outcome_of("rsync", per_order["rsync"]) == "ok"
                and _started(per_order["rsync"].get("content"))
            ]
            if not followed:
                return first
            await self._follow(host, order, followed, via_proxy=True)
            merged = {agent: dict(per_order) for agent, per_order in content.items()}
            for f in followed:
                entry = dict(merged[f.label]["rsync"])
                entry["content"] = f.final
                merged[f.label]["rsync"] = entry
            first.content = merged
            return first
        if not _started(content):
            return first
        sync = _Followed(host, content)
        await self._follow(host, order, [sync], via_proxy=False)
        first.content = sync.final
        return first

    async def _follow(
        self, host: str, order: Order, syncs: list[_Followed], *, via_proxy: bool
    ) -> None:
        from twisted.internet.task import deferLater

        from deploy.client import Order

        deadline = self.reactor.seconds() + self.timeout
        running = list(syncs)
        for sync in running:
            self.on_progress(sync.label, "starting")
        polls = 0
        try:
            while running:
                interval = WAIT_POLL_FIRST if polls < WAIT_FAST_POLLS else WAIT_POLL
                await deferLater(self.reactor, interval, lambda: None)
                polls += 1
                args = f"hosts:{','.join(s.label for s in running)}" if via_proxy else order.args
                status = Order("status", order.options, args, order.api_key)
                answer: HostResult = await self.client.send(host, status)
                now = self.reactor.seconds()
                entries = self._status_entries(answer, running, via_proxy)
                for sync in list(running):
                    self._judge(sync, entries[sync.label], now)
                    if sync.final is None and now >= deadline:
                        sync.final = _ended(
                            sync.rsync,
                            "timeout",
                            f"still running after --wait-timeout {self.timeout:g}s",
                        )
                    if sync.final is not None:
                        running.remove(sync)
                        self.on_progress(sync.label, None)
        finally:
            for sync in running:
                self.on_progress(sync.label, None)

    def _status_entries(
        self, answer: HostResult, running: list[_Followed], via_proxy: bool
    ) -> dict[str, dict[str, Any]]:
        """label → that sync's status answer in the original shape."""
        entry = answer.to_json()
        if not via_proxy or not answer.http_ok:
            # Directly, or the proxy itself did not answer well: the same for every agent.
            return {s.label: entry for s in running}
        content = answer.content if is_proxy_answer(answer.content) else {}
        missing = {
            "return": 0,
            "serverStatus": 1,
            "returnCode": 500,
            "returnString": "",
            "content": f"the proxy's answer has no status for this agent: {str(content)[:200]}",
        }
        return {s.label: (content.get(s.label) or {}).get("status") or missing for s in running}

    def _judge(self, sync: _Followed, entry: Mapping[str, Any], now: float) -> None:
        """Update `sync` from one status answer: still running, ended, or out of contact."""
        content = entry.get("content")
        code = str(entry.get("returnCode"))
        if entry.get("serverStatus") == 0 or code == "503":
            # Not answering (an agent restarting) or busy: try again, for a while.
            if sync.lost_since is None:
                sync.lost_since = now
            elif now - sync.lost_since > WAIT_LOST_CONTACT:
                sync.final = _ended(
                    sync.rsync, "unreachable", f"lost contact while waiting: {content}"
                )
            return
        sync.lost_since = None
        if code != "200" or not isinstance(content, dict):
            sync.final = _ended(
                sync.rsync,
                "failed",
                f"status answered {code} {entry.get('returnString', '')}: {content}",
            )
            return
        if content.get("alreadyRsync") == "true":
            self.on_progress(sync.label, output.sync_progress_text(content.get("progress")))
            return
        last = content.get("lastRsync")
        if isinstance(last, dict) and last.get("checksum") in (None, sync.rsync.get("checksum")):
            outcome = str(last.get("outcome") or "failed")
            sync.final = _ended(sync.rsync, outcome, str(last.get("message") or ""), last)
        else:
            message = content.get("message") or "the sync ended but the agent reports no lastRsync"
            sync.final = _ended(sync.rsync, "failed", str(message))


def _ended(
    rsync: Mapping[str, Any], outcome: str, message: str, last: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The rsync answer with how the sync ended."""
    content = dict(rsync)
    if last is not None:
        content["lastRsync"] = dict(last)
    content["outcome"] = outcome
    if outcome not in GOOD:
        content["return"] = "false"
        content["message"] = message or f"sync {outcome}"
    return content


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
