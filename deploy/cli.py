"""`deploy-client`: options (the original's and ours), sending one order to many hosts, printing
the original JSON shape, and mapping the outcome to an exit code in one place."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_FAILED = 2
EXIT_UNREACHABLE = 3
EXIT_STOPPED = 4

ORDERS = ("status", "rlist", "rsync", "rkill", "exec")

EPILOG = """\
targets (--options):
  GROUP                       a [rsync::group::GROUP] of the agent's config
  HOST::MODULE/path,/local    inline: remote source, then local destination
  NAME,arg1,arg2              for --order=exec: a command of the agent's jobs file

through a proxy: --hosts=PROXY --port=3441 --api-key=KEY --args=groups:g1,g2 (or hosts:a,b)

exit codes:
  0  every host answered and succeeded
  1  usage or local error
  2  at least one host answered with a failure
  3  at least one host was unreachable or timed out (and none failed)
  4  a rolling deploy stopped at its failure budget (--max-fail)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deploy-client",
        description="Send an order to deploy-agents (directly or through a deploy-proxy).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--order", choices=ORDERS, help="remote command")
    p.add_argument("--hosts", help="remote hosts, comma separated (host, host:port, [v6]:port)")
    p.add_argument("--port", type=int, default=None, help="remote port (default: 3440)")
    p.add_argument("--args", default="", help="(groups|hosts):a,b — which agents a proxy orders")
    p.add_argument("--options", default="", help="order options: group, inline target, exec line")
    p.add_argument(
        "--key-cipher",
        default=None,
        help="shared key for request signing (default: $DEPLOY_KEY_CIPHER or 65535)",
    )
    p.add_argument("--api-key", default=None, help="api key for a proxy (default: $DEPLOY_API_KEY)")
    p.add_argument(
        "--legacy-auth",
        action="store_true",
        help="send the original one-time auth_key instead of a signature (old agents/proxies)",
    )
    p.add_argument("--ssl-public-key", help="TLS: pin the server's public key (PEM)")
    p.add_argument("--ssl-ca", help="TLS: verify the server's certificate chain and host name")
    p.add_argument("--ssl-cert", help="TLS: client certificate (PEM) for mutual TLS")
    p.add_argument("--ssl-key", help="TLS: client private key (PEM) for mutual TLS")
    p.add_argument(
        "--thread-timeout",
        type=float,
        default=10.0,
        help="most seconds to wait for one host's answer (default: 10)",
    )
    p.add_argument(
        "--socket-timeout",
        type=float,
        default=5.0,
        help="most seconds to wait for a connection (default: 5)",
    )
    p.add_argument(
        "--max-parallel", type=int, default=64, help="most hosts ordered at once (default: 64)"
    )
    p.add_argument("--batch", default=None, help="rolling: hosts per batch, N or N%%")
    p.add_argument(
        "--max-fail",
        default=None,
        help="rolling: stop starting batches once more than N (or N%%) hosts failed",
    )
    p.add_argument("--ipc-path", help=argparse.SUPPRESS)
    p.add_argument("--worker-method", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="log the conversation to stderr")
    p.add_argument("--verbose", action="store_true", help="print each host as it answers")
    return p


def exit_code_for(results: list[Any], stopped: bool) -> int:
    """0 ok; 2 a host answered with a failure; 3 unreachable/timed out only; 4 budget stop."""
    if stopped:
        return EXIT_STOPPED
    failed = unreachable = False
    for r in results:
        if r.skipped:
            continue
        if r.server_status == 0:
            unreachable = True
            continue
        outcome = _answer_outcome(r)
        if outcome == "failed":
            failed = True
        elif outcome == "unreachable":
            unreachable = True
    if failed:
        return EXIT_FAILED
    if unreachable:
        return EXIT_UNREACHABLE
    return EXIT_OK


def _answer_outcome(result: Any) -> str:
    """`ok`, `failed` or `unreachable` for one answer, looking through a proxy's answer."""
    if not result.succeeded:
        return "failed"
    content = result.content
    if _is_proxy_answer(content):
        worst = "ok"
        for per_order in content.values():
            for entry in per_order.values():
                if not isinstance(entry, dict):
                    continue
                if entry.get("skipped"):
                    continue
                if entry.get("serverStatus") == 0:
                    worst = "failed" if worst == "failed" else "unreachable"
                    continue
                inner = entry.get("content")
                ok = entry.get("return") == 1 and not (
                    isinstance(inner, dict) and inner.get("return") in ("false", False, 0)
                )
                if not ok:
                    worst = "failed"
        return worst
    return "ok"


def _is_proxy_answer(content: Any) -> bool:
    if not isinstance(content, dict) or not content or "return" in content:
        return False
    return all(
        isinstance(v, dict)
        and v
        and all(isinstance(e, dict) and "serverStatus" in e for e in v.values())
        for v in content.values()
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.order:
        parser.print_usage(sys.stderr)
        print("deploy-client: error: --order is required", file=sys.stderr)
        return EXIT_USAGE
    if not args.hosts:
        parser.print_usage(sys.stderr)
        print("deploy-client: error: --hosts is required", file=sys.stderr)
        return EXIT_USAGE
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if args.key_cipher is None:
        args.key_cipher = os.environ.get("DEPLOY_KEY_CIPHER") or "65535"
    if args.api_key is None:
        args.api_key = os.environ.get("DEPLOY_API_KEY", "")
    try:
        return run(args, hosts)
    except (ValueError, OSError) as e:
        print(f"deploy-client: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def run(args: argparse.Namespace, hosts: list[str]) -> int:
    # Imported here, after the options parsed: `--help` and usage errors stay fast.
    from twisted.internet import reactor
    from twisted.internet.task import react

    from deploy.client import ClientOptions, Order, OrderClient, fan_out, parse_budget, result_map

    parse_budget(args.batch, max(1, len(hosts)), "--batch")
    parse_budget(args.max_fail, max(1, len(hosts)), "--max-fail")
    tls = make_tls(args)
    via_proxy = bool(args.args or args.api_key)
    options = ClientOptions(
        port=args.port or (3441 if via_proxy and not args.port else 3440),
        key_cipher=args.key_cipher,
        legacy_auth=args.legacy_auth,
        socket_timeout=args.socket_timeout,
        thread_timeout=args.thread_timeout,
        tls=tls,
        max_parallel=args.max_parallel,
    )
    if args.port:
        options.port = args.port
    elif not via_proxy:
        options.port = 3440
    order = Order(args.order, args.options, args.args, args.api_key if via_proxy else "")
    if via_proxy and (args.batch or args.max_fail):
        # A proxy rolls out itself: pass the budget along instead of batching proxies.
        order.extra = {k: v for k, v in (("batch", args.batch), ("max_fail", args.max_fail)) if v}
    if args.debug:
        from twisted.logger import globalLogBeginner, textFileLogObserver

        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    outcome: dict[str, Any] = {}

    def verbose(result: Any) -> None:
        if args.verbose:
            print(f"{result.host}: {result.code or 'no answer'} {result.reason}", file=sys.stderr)

    async def go(_reactor: Any) -> None:
        client = OrderClient(reactor, options)
        fan = await fan_out(
            client,
            hosts,
            order,
            max_parallel=args.max_parallel,
            batch=None if via_proxy else args.batch,
            max_fail=None if via_proxy else args.max_fail,
            on_result=verbose,
        )
        outcome["fan"] = fan

    try:
        react(lambda r: defer_from(go(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    fan = outcome["fan"]
    results = list(fan.results.values())
    print(json.dumps(result_map(results), indent=3, ensure_ascii=False))
    stopped = fan.stopped or any(
        isinstance(r.content, dict) and r.content.get("stopped") for r in results
    )
    return exit_code_for(results, stopped)


def defer_from(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)


def make_tls(args: argparse.Namespace) -> Any:
    if not (args.ssl_public_key or args.ssl_ca or args.ssl_cert):
        return None
    from deploy.tls import client_context_factory

    if args.ssl_cert and not args.ssl_key:
        raise ValueError("--ssl-cert needs --ssl-key")

    def for_host(host: str) -> Any:
        return client_context_factory(
            host,
            public_key_path=args.ssl_public_key,
            ca_path=args.ssl_ca,
            cert_path=args.ssl_cert,
            key_path=args.ssl_key,
        )

    for_host("localhost")  # fail fast on a missing or bad file, before any host is contacted
    return for_host


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
