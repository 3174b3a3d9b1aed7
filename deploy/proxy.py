"""The proxy: its protocol and factory, API key → groups → hosts authorisation, and the fan-out of
an order to the granted agents through `deploy.client` (bounded, per-host timeouts, rolling), each
agent's answer carrying its own round trip (`seconds`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from deploy import auth, logs
from deploy.access import AllowedHosts
from deploy.answers import PROXY_ANSWER_LIMITS, PROXY_ANSWERS_TOTAL, AnswerAccount, AnswerBudget
from deploy.auth import DEFAULT_KEY_CIPHER
from deploy.client import (
    ClientOptions,
    FanOutResult,
    Order,
    OrderClient,
    TimedSender,
    fan_out,
    parse_budget,
    result_map,
)
from deploy.config import ClientSettings, ProxyConfig
from deploy.errors import BadHostSelection, BadRequest, NotGranted, NotPermitted, UnknownOrder
from deploy.keyring import ApiKeys
from deploy.logrecord import log_safe
from deploy.message import PROXY_ORDERS, ROLLOUT_ORDERS, is_run_id
from deploy.wire import TEXT_TYPE, Request, RequestFactory, Response, ServiceRequestReceiver


@dataclass
class ProxyRequest:
    order: str
    options: str
    args: str
    api_key: str = field(repr=False)  # a secret: never in a log or a traceback
    batch: str | None
    max_fail: str | None
    release: str = ""  # release mode: the label of a new release
    run: str = ""  # status: `HOST=RUNID,...`, the runs a client follows (see `followed_runs`)


class ProxyService:
    """What every proxy connection shares: the API grants, auth state, the agent client and
    the budget of the agents' answers held at once (`answers_total` bytes, each host's answer
    at most `answer_limits[order]`)."""

    log = Logger()

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any,
        answer_limits: Mapping[str, int] = PROXY_ANSWER_LIMITS,
        answers_total: int = PROXY_ANSWERS_TOTAL,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = reactor  # what the request deadline runs on
        server = config.server
        # Only with `[server] key_cipher` set: then requests must be signed like an agent's.
        self.authenticator = (
            auth.RequestAuthenticator(
                server.key_cipher,
                clock=reactor,
                window=server.auth_window,
                legacy=server.legacy_auth,
            )
            if server.key_cipher
            else None
        )
        self.allowed_hosts = AllowedHosts(config.allow_hosts)
        self.api_keys = ApiKeys(config.keys, config.policies)
        self.options = replace(client_options(config.client), answer_limits=answer_limits)
        self.answers = AnswerBudget(answers_total)
        from deploy.proxy_rollouts import DEFAULT_PROXY_STATE_DIR, ProxyRollouts

        state_dir = server.state_path or DEFAULT_PROXY_STATE_DIR
        self.rollouts = ProxyRollouts(self, state_dir)  # deploy and rollout

    # -- checks

    def granted_hosts(self, api_key: str, args: str) -> list[str]:
        """The hosts `args` names (`hosts:a,b` or `groups:g1,g2`), each granted to `api_key`;
        else BadHostSelection or NotGranted (both 403, as the original answered)."""
        kind, sep, names_text = args.partition(":")
        # The original lower-cased all of `args`: `GROUPS:web` worked, so it still does.
        kind = kind.lower()
        if not sep or kind not in ("hosts", "groups"):
            raise BadHostSelection(args)
        names = [n.strip() for n in names_text.split(",") if n.strip()]
        if not names:
            raise BadHostSelection(args)
        found = self.api_keys.find(api_key)
        groups = found.granted_groups() if found is not None else None
        if groups is None:
            raise NotGranted(names_text)
        servers = self.config.servers
        if kind == "groups":
            hosts: list[str] = []
            for name in names:
                group = matching_name(name, list(servers))
                if group not in groups:
                    raise NotGranted(name)
                hosts.extend(servers[group])
            return list(dict.fromkeys(hosts))
        known = list(dict.fromkeys(h for members in servers.values() for h in members))
        reachable = {h for g in groups for h in servers.get(g, ())}
        named = []
        for name in names:
            host = matching_name(name, known)
            if host not in reachable:
                raise NotGranted(name)
            named.append(host)
        return list(dict.fromkeys(named))

    # -- the order

    def handle(self, request: ProxyRequest, peer: str) -> defer.Deferred[Response]:
        hosts = self.granted_hosts(request.api_key, request.args)
        try:
            parse_budget(request.batch, len(hosts), "batch")
            parse_budget(request.max_fail, len(hosts), "max_fail")
        except ValueError as e:
            raise BadRequest(str(e)) from None
        runs = followed_runs(request.run, hosts) if request.order == "status" else {}
        # What the agents get: the same order, options and args; the API key stays here.
        order = Order(request.order, request.options, request.args, "")
        if request.release:
            order.extra["release"] = request.release

        def order_for(host: str) -> Order:
            if host not in runs:
                return order
            # Following that run: the agent answers from its records, without a dry run.
            return replace(order, extra={**order.extra, "run": runs[host]})

        self.log.info(
            "{order} {options!r} for {args} ({count} hosts) from {peer}",
            order=request.order,
            options=request.options,
            args=log_safe(request.args),
            count=len(hosts),
            peer=peer,
        )
        # The agents' answers are held until the order is answered: in this order's account.
        account = AnswerAccount(self.answers)
        settings = self.config.client
        timed = TimedSender(OrderClient(self.reactor, self.options, account), self.reactor.seconds)
        d = fan_out(
            timed,
            hosts,
            order_for,
            max_parallel=settings.max_parallel,
            batch=request.batch,
            max_fail=request.max_fail,
            deadline=settings.deadline or None,
            clock=self.reactor,
        )

        def answer(result: FanOutResult) -> Response:
            body = json.dumps(timed_answer(result, timed.seconds), indent=3, ensure_ascii=False)
            if result.stopped:
                self.log.warn("rollout of {order} stopped at its failure budget", order=order.order)
            return Response(200, body.encode("utf-8") + b"\n", TEXT_TYPE)

        def release(result: Any) -> Any:
            account.close()
            return result

        return d.addCallback(answer).addBoth(release)


def timed_answer(result: FanOutResult, seconds: Mapping[str, float]) -> dict[str, Any]:
    """The proxy's answer: agent → order → the original keys, and `seconds`, that agent's own
    round trip (connect to answer, failure or timeout); null for an agent never ordered (skipped
    by the failure budget, or still waiting for a slot at the deadline)."""
    answer = result_map(result.results.values(), numeric_code=True)
    for host, host_result in result.results.items():
        took = seconds.get(host)
        entry = answer[host_result.host][host_result.order]
        entry["seconds"] = None if took is None else round(took, 3)
    return answer


def followed_runs(text: str, hosts: list[str]) -> dict[str, str]:
    """A status order's `run` field, `HOST=RUNID,...` (the runs `deploy-client --wait` follows),
    as host → run id for the hosts of this order: each agent is asked about its own run. An
    agent named in none of the pairs is asked as before (a dry run); BadRequest when malformed."""
    runs: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        host, sep, run_id = pair.rpartition("=")
        if not sep or not host or not is_run_id(run_id):
            raise BadRequest(f"run: expected HOST=RUNID[,HOST=RUNID...], got {pair[:80]!r}")
        runs[host] = run_id
    return {h: runs[h] for h in hosts if h in runs}


def matching_name(name: str, names: list[str]) -> str:
    """The one of `names` (every group, or host, of the API file) that `name` means: the same
    name, else the only one that differs from it in case alone (the original lower-cased `args`,
    so old scripts may spell names in any case); NotGranted when there is none, or several."""
    if name in names:
        return name
    folded = name.casefold()
    found = [n for n in names if n.casefold() == folded]
    if len(found) != 1:
        raise NotGranted(name)
    return found[0]


def client_options(settings: ClientSettings) -> ClientOptions:
    """The proxy's `[client]` settings as options for `OrderClient`."""
    tls = None
    if settings.uses_tls:
        from deploy.tls import client_context_factories

        # Files are read once, here: a missing key or a TLS setting without a way to verify
        # the agents stops the proxy at start (TLSConfigError), not every order at every host.
        tls = client_context_factories(
            public_key_path=settings.ssl_public_key,
            ca_path=settings.ssl_ca,
            cert_path=settings.ssl_cert,
            key_path=settings.ssl_key,
        )

    return ClientOptions(
        port=settings.port,
        key_cipher=settings.key_cipher or DEFAULT_KEY_CIPHER,
        key_id=settings.key_id,
        bind_host=settings.bind_host,
        legacy_auth=settings.legacy_auth,
        socket_timeout=settings.socket_timeout,
        thread_timeout=settings.thread_timeout,
        tls=tls,
        max_parallel=settings.max_parallel,
    )


class ProxyProtocol(ServiceRequestReceiver):
    # `factory` stays untyped: annotating it with our factory class would make this protocol
    # not the kind of protocol Twisted's generic Factory expects (mypy).

    # Larger than an agent's: `args` may name hundreds of hosts.
    max_body = 64 * 1024

    def handleRequest(self, request: Request) -> defer.Deferred[Response]:
        service: ProxyService = self.factory.service
        segments = request.segments
        if len(segments) < 2 or segments[0] not in ("agent", "api"):
            raise UnknownOrder()
        if segments[1] not in PROXY_ORDERS:
            raise UnknownOrder()
        if len(segments) > 5 or (segments[0] == "agent" and len(segments) > 2):
            raise UnknownOrder()
        fields = request.form()
        if service.authenticator is not None:
            service.authenticator.authenticate(request, fields)
        # /api/<order>/<options>/<args>/<api_key>: path segments, when present, win.
        for name, value in zip(("options", "args", "api_key"), segments[2:], strict=False):
            fields[name] = value
        proxy_request = ProxyRequest(
            order=segments[1],
            options=fields.get("options", ""),
            args=fields.get("args", ""),
            api_key=fields.get("api_key", ""),
            batch=fields.get("batch") or None,
            max_fail=fields.get("max_fail") or None,
            release=fields.get("release", ""),
            run=fields.get("run", ""),
        )
        self.audit.update(logs.proxy_audit(proxy_request, service.granted_hosts))
        key_id, decision = service.api_keys.decide(
            proxy_request.api_key, proxy_request.order, proxy_request.options
        )
        self.audit.update(keyId=key_id, decision=decision.verdict)
        if not decision.allowed:
            raise NotPermitted(decision.reason)
        if proxy_request.order in ROLLOUT_ORDERS:
            return service.rollouts.handle(proxy_request, fields, request.peer)
        return service.handle(proxy_request, request.peer)


class ProxyFactory(RequestFactory):
    protocol = ProxyProtocol
    log = Logger()

    def __init__(self, service: ProxyService) -> None:
        super().__init__()
        self.service = service
