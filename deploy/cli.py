"""`deploy-client`: the options (the original's and ours), resolved with the config file and the
environment and checked, and the order each host gets. `deploy.clientrun` sends and prints it,
`deploy.retry` reads a `--retry-failed` file, `deploy.follow` follows the syncs of `--wait`.

Twisted is imported only once an order is really sent: `--help` and usage errors stay fast."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NoReturn

from deploy import clientconfig, version_text
from deploy.clientrun import print_outcome, run, wants_tls
from deploy.message import PROXY_ORDERS, ROLLOUT_ORDERS
from deploy.notls import skip_pyopenssl
from deploy.output import (  # noqa: F401  (the exit codes, re-exported for callers)
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    FORMATS,
)
from deploy.retry import RetryPlan, read_result_rows, retry_plan

if TYPE_CHECKING:
    from deploy.orders import Order


def _epilog() -> str:
    codes = "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    return f"""\
targets (--options):
  GROUP                       a [rsync::group::GROUP] of the agent's config
  HOST::MODULE/path,/local    inline: remote source, then local destination
  NAME,arg1,arg2              for --order=exec: a command of the agent's jobs file
  GROUP[,ID]                  for --order=activate|rollback: a release-mode group (and a
                              release id; default: the newest staged / the previous good one)
  GROUP                       for --order=releases: the group's releases, newest first

release mode (groups with releases = N): --order=rsync stages a release (and switches with
activate = auto), --release=LABEL names it (a git SHA, a version); --order=activate switches to
a staged or good release, --order=rollback back to the previous good one; status names the
live release (RELEASE in --format table).

rolling out (--order=deploy --options=GROUP): per host, rsync (stage a release, or sync in
place) -> wait for exactly that sync (its runId) -> activate (release mode: after_activate and
check run on the agent) -> done. A batch starts only once every host of the batch before is
done; --max-fail counts every failed, unreachable, timed-out, check_failed and busy host over
the whole rollout; past it no new batch starts, the rest are skipped and (release mode, unless
--no-rollback) the hosts it switched are rolled back (rolled_back), exit code 4. --canary=N:
the first batch is N hosts, checked again after --canary-wait seconds. A host syncing already
is busy, never adopted. Directly to agents the client runs the rollout; to a proxy, the proxy
runs it in the background (it outlives the client): --order=rollout --options=ID follows it
again, --order=rollout alone lists the recent ones. --batch is also the source's pull budget.

through a proxy: --hosts=PROXY --port=3441 --api-key=KEY --args=groups:g1,g2 (or hosts:a,b)

defaults: command line > environment (DEPLOY_KEY_CIPHER, DEPLOY_API_KEY) > config file > built-in.
  config file: --config FILE, else ~/.config/deploy/client.ini ($XDG_CONFIG_HOME/deploy/... when
  set), section [client]: hosts, port, args, key_cipher, key_id, bind_host, api_key, legacy_auth,
  ssl_public_key, ssl_ca, ssl_cert, ssl_key, format, thread_timeout, socket_timeout, max_parallel,
  wait_timeout.

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
    p.add_argument("--version", action="version", version=version_text("deploy-client"))
    p.add_argument("--order", choices=PROXY_ORDERS, help="remote command")
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
        "--key-id",
        default=None,
        help="sign with the agent's named key ID (kid=; the signature is bound to the host)",
    )
    p.add_argument(
        "--bind-host",
        action="store_true",
        default=None,
        help="bind the signature to the host:port addressed (agents with server_names need it)",
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
    p.add_argument(
        "--ssl-public-key",
        action="append",
        default=None,
        help="TLS: pin the server's public key (PEM, or a file of several keys or sha256// "
        "pins); repeat it to pin a backup key: a server matching any pin passes",
    )
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
        "--canary",
        type=int,
        default=0,
        metavar="N",
        help="deploy: the first batch is N hosts; the rest go only if they pass the check "
        "again after --canary-wait",
    )
    p.add_argument(
        "--canary-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="deploy: how long the canaries run before their check is run again (default: 0)",
    )
    p.add_argument(
        "--no-rollback",
        action="store_true",
        help="deploy: when the rollout stops, leave the hosts it switched on the new release",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="json: the original shape (default); table: a row per host and a summary; "
        "ndjson: a JSON line per host as it answers (with --wait also progress events), then a "
        "summary line. TIME (ndjson: seconds) is each host's own: the client's round trip, "
        "through a proxy the agent's as the proxy timed it (an older proxy: the round trip to "
        "it), with --wait until its sync ended",
    )
    p.add_argument(
        "--wide",
        action="store_true",
        help="with --format table: each message whole on one line (else long ones wrap)",
    )
    p.add_argument(
        "--release",
        default=None,
        metavar="LABEL",
        help="with --order=rsync to a release-mode group: a label for the new release",
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
        skip_pyopenssl()
    if args.order in ROLLOUT_ORDERS:
        from deploy import rollout_client

        try:
            return rollout_client.run(args, hosts, via_proxy)
        except (ValueError, OSError) as e:
            print(f"deploy-client: error: {e}", file=sys.stderr)
            return EXIT_USAGE
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
        if args.release:
            order.extra["release"] = args.release
        if via_proxy and (args.batch or args.max_fail):
            # A proxy rolls out itself: pass the budget along instead of batching proxies.
            order.extra = {
                k: v for k, v in (("batch", args.batch), ("max_fail", args.max_fail)) if v
            }
        return order

    return order_for


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
