"""`deploy-client --order=deploy` and `--order=rollout`: a rollout run by the client itself
(talking to agents) or started on a proxy and followed there by polling `rollout` (which also
re-attaches to a running one, or lists the recent ones); live progress on a terminal, an NDJSON
event per host step, and the final table/JSON with the exit code. Twisted is imported inside."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from deploy import output, progressline
from deploy.clientrun import client_options, make_tls, print_outcome
from deploy.output import Row

ROLLOUT_POLL_FIRST = 0.25
ROLLOUT_POLL = 1.0
ROLLOUT_LOST_CONTACT = 30.0
EXIT_INTERRUPTED = 130


class RolloutView:
    """Shows a rollout record as it changes: the progress line, NDJSON events."""

    def __init__(
        self, fmt: str, progress: progressline.ProgressLine, via: str | None = None
    ) -> None:
        self.format = fmt
        self.progress = progress
        self.via = via
        self.shown = 0  # events printed so far

    def changed(self, record: dict[str, Any], events: list[dict[str, Any]] | None = None) -> None:
        new = record.get("events", [])[self.shown :] if events is None else events
        self.shown += len(new)
        if self.format == "ndjson" and new:
            self.progress.clear()
            for event in new:
                line = {"event": event.get("step"), "rolloutId": record.get("rolloutId"), **event}
                if self.via is not None:
                    line["via"] = self.via
                print(output.ndjson_line(line), flush=True)
        self.progress.update(progress_text(record))

    def finish(self, record: dict[str, Any]) -> int:
        self.progress.clear()
        rows = rows_of(record, self.via)
        result = {row.host: {"deploy": row.entry} for row in rows}
        if self.format == "ndjson":
            for row in rows:
                print(output.ndjson_line(row.to_json()))
        if record.get("state") == "interrupted":
            print(
                f"deploy-client: rollout {record.get('rolloutId')} was interrupted "
                f"({record.get('reason')})",
                file=sys.stderr,
            )
        elif record.get("stopped"):
            print(f"deploy-client: rollout stopped: {record.get('reason')}", file=sys.stderr)
        stopped = bool(record.get("stopped")) and record.get("state") != "interrupted"
        return print_outcome(self.format, rows, result, stopped)


def progress_text(record: dict[str, Any]) -> str:
    """`rollout web: 12/30 done, 1 failed (running)`."""
    hosts = record.get("hosts", {})
    done = sum(1 for e in hosts.values() if e.get("outcome"))
    return (
        f"rollout {record.get('group', '')}: {done}/{len(hosts)} done, "
        f"{record.get('failures', 0)} failed ({record.get('phase', record.get('state'))})"
    )


def rows_of(record: dict[str, Any], via: str | None = None) -> list[Row]:
    """A row per host of a rollout record, in the original answer shape (content: the host's
    record); a host a cut-off rollout never finished is `interrupted`."""
    rows = []
    for host, entry in record.get("hosts", {}).items():
        outcome = entry.get("outcome") or "interrupted"
        content = {**entry, "rolloutId": record.get("rolloutId")}
        wire = {
            "return": "true" if outcome == "ok" else "false",
            "serverStatus": 1,
            "returnCode": "200",
            "returnString": "OK",
            "content": content,
        }
        rows.append(Row(host, "deploy", outcome, wire, via=via, seconds=entry.get("seconds")))
    return rows


def deploy_order(args: argparse.Namespace) -> Any:
    """The `deploy` order to a proxy, with the rollout's settings."""
    from deploy.orders import Order

    order = Order("deploy", args.options, args.args or "", args.api_key or "")
    fields = {
        "batch": args.batch,
        "max_fail": args.max_fail,
        "canary": str(args.canary) if args.canary else None,
        "canary_wait": f"{args.canary_wait:g}" if args.canary_wait else None,
        "no_rollback": "1" if args.no_rollback else None,
        "release": args.release,
    }
    order.extra = {k: v for k, v in fields.items() if v}
    return order


def run(args: argparse.Namespace, hosts: list[str], via_proxy: bool) -> int:
    """`--order=deploy` or `--order=rollout`: run or follow, print, answer the exit code."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    if via_proxy and len(hosts) != 1:
        raise ValueError(f"--order={args.order} through a proxy: name one proxy in --hosts")
    if args.order == "deploy" and (not args.options or "," in args.options):
        raise ValueError("--order=deploy needs --options=GROUP (one group)")
    if args.order == "rollout" and not via_proxy:
        raise ValueError("--order=rollout asks a proxy: give --api-key (and --hosts=PROXY)")
    options = client_options(args, hosts, via_proxy, tls=make_tls(args))
    via = hosts[0] if via_proxy else None
    view = RolloutView(args.format, progressline.ProgressLine(sys.stderr), via)
    out: dict[str, Any] = {}

    async def go(reactor: Any) -> None:
        from deploy.client import OrderClient

        client = OrderClient(reactor, options)
        if not via_proxy:
            out["record"] = await run_here(args, hosts, client, reactor, view)
        elif args.order == "rollout" and not args.options:
            out["code"] = await list_rollouts(args, hosts[0], client)
        else:
            out.update(await on_proxy(args, hosts[0], client, reactor, view))

    try:
        react(lambda r: Deferred.fromCoroutine(go(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    if "code" in out:
        return int(out["code"])
    if "record" not in out:
        view.progress.clear()
        print("deploy-client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return view.finish(out["record"])


async def run_here(
    args: argparse.Namespace, hosts: list[str], client: Any, reactor: Any, view: RolloutView
) -> dict[str, Any]:
    """The rollout run by this client, talking to the agents."""
    from deploy.rollout import Rollout
    from deploy.rollout_driver import RolloutDriver
    from deploy.rollout_host import HostSteps

    machine = Rollout(
        hosts,
        batch=args.batch,
        max_fail=args.max_fail,
        canary=args.canary or 0,
        rollback=not args.no_rollback,
    )
    steps = HostSteps(
        client, reactor, args.options, label=args.release or "", sync_timeout=args.wait_timeout
    )
    record = {"group": args.options, "release": args.release or ""}
    driver = RolloutDriver(
        steps,
        machine,
        reactor,
        max_parallel=args.max_parallel or len(hosts) or 1,
        canary_wait=args.canary_wait or 0.0,
        record=record,
        on_change=view.changed,
    )
    result: dict[str, Any] = await driver.run()
    return result


async def on_proxy(
    args: argparse.Namespace, proxy: str, client: Any, reactor: Any, view: RolloutView
) -> dict[str, Any]:
    """Start the rollout on the proxy (deploy) or take its id (rollout ID), then follow it."""
    from deploy.orders import Order

    if args.order == "deploy":
        answer = await client.send(proxy, deploy_order(args))
        content = answer.content
        if not answer.http_ok or not isinstance(content, dict) or not content.get("rolloutId"):
            view.progress.clear()
            rows = output.rows_for(proxy, "deploy", answer.to_json())
            return {
                "code": print_outcome(args.format, rows, {proxy: {"deploy": rows[0].entry}}, False)
            }
        rollout_id = str(content["rolloutId"])
        view.progress.message(
            f"deploy-client: rollout {rollout_id} runs on {proxy} "
            f"(follow again: --order=rollout --options={rollout_id})"
        )
    else:
        rollout_id = args.options.strip()
    from twisted.internet.task import deferLater

    from deploy.rollout import poll_interval

    record: dict[str, Any] = {}
    lost_since: float | None = None
    began = reactor.seconds()
    while True:
        order = Order("rollout", f"{rollout_id},{view.shown}", "", args.api_key or "")
        answer = await client.send(proxy, order)
        now = reactor.seconds()
        if answer.http_ok and isinstance(answer.content, dict):
            lost_since = None
            got = answer.content
            events = got.get("events", [])
            record = {**got, "events": record.get("events", []) + events}
            view.changed(record, events)
            if got.get("state") != "running":
                return {"record": record}
        elif answer.server_status == 1:  # the proxy answered: no such rollout, not granted
            view.progress.clear()
            rows = output.rows_for(proxy, "rollout", answer.to_json())
            code = print_outcome(args.format, rows, {proxy: {"rollout": rows[0].entry}}, False)
            return {"code": code}
        else:
            lost_since = lost_since if lost_since is not None else now
            if now - lost_since > ROLLOUT_LOST_CONTACT:
                view.progress.clear()
                print(
                    f"deploy-client: lost contact with {proxy}; the rollout goes on there "
                    f"(re-attach: --order=rollout --options={rollout_id})",
                    file=sys.stderr,
                )
                return {"code": output.EXIT_UNREACHABLE}
        interval = poll_interval(now - began, ROLLOUT_POLL_FIRST, ROLLOUT_POLL)
        await deferLater(reactor, interval, lambda: None)


async def list_rollouts(args: argparse.Namespace, proxy: str, client: Any) -> int:
    """`--order=rollout` alone: the proxy's recent rollouts, newest first."""
    from deploy.orders import Order

    answer = await client.send(proxy, Order("rollout", "", "", args.api_key or ""))
    if not answer.http_ok or not isinstance(answer.content, dict):
        rows = output.rows_for(proxy, "rollout", answer.to_json())
        return print_outcome(args.format, rows, {proxy: {"rollout": rows[0].entry}}, False)
    listing = answer.content.get("rollouts", [])
    if args.format == "table":
        print(render_listing(listing))
    elif args.format == "ndjson":
        for item in listing:
            print(output.ndjson_line(item))
    else:
        print(json.dumps({proxy: {"rollout": answer.to_json()}}, indent=3, ensure_ascii=False))
    return output.EXIT_OK


def render_listing(listing: list[dict[str, Any]]) -> str:
    lines = [["ROLLOUT", "GROUP", "STATE", "OUTCOMES", "REASON"]]
    for item in listing:
        outcomes = ", ".join(f"{v} {k}" for k, v in (item.get("outcomes") or {}).items())
        state = str(item.get("state")) + (" (stopped)" if item.get("stopped") else "")
        lines.append(
            [
                str(item.get("rolloutId")),
                str(item.get("group")),
                state,
                outcomes,
                str(item.get("reason") or ""),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
