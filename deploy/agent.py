"""The agent daemon's wiring: the service every connection shares (config, auth, access lists,
jobs, the order handlers of `deploy.agent_orders`), and the protocol and factory that take one
request, check its peer, path and signature, and hand it to its order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from deploy import auth
from deploy.access import AllowedHosts, AllowedPaths
from deploy.agent_orders import AgentOrders
from deploy.config import AgentConfig, agent_key_cipher
from deploy.errors import BadRequest, NotPermitted, UnknownOrder
from deploy.jobs import JobRegistry, check_state_dir
from deploy.message import ORDERS
from deploy.policy import Policies
from deploy.release_orders import RELEASE_ORDERS, ReleaseOrders
from deploy.targets import TargetResolver
from deploy.wire import Request, RequestFactory, Response, ServiceRequestReceiver

MAX_OPTIONS = 8192
DEFAULT_STATE_DIR = "/var/lib/deploy"
LEGACY_REFUSED = (
    "legacy auth_key refused: this agent needs a signed request (or legacy_auth = true in [server])"
)


class AgentService:
    """What every agent connection shares: config, access lists, auth state, jobs, the orders."""

    log = Logger()

    def __init__(
        self, config: AgentConfig, reactor: Any, *, clock: IReactorTime | None = None
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        server = config.server
        access = config.access
        # With named keys and no key_cipher, only named keys sign: the default key is not open.
        unnamed = None if access.keys and server.key_cipher is None else agent_key_cipher(server)
        self.authenticator = auth.RequestAuthenticator(
            unnamed,
            clock=self.clock,
            window=server.auth_window,
            legacy=server.legacy_auth,
            legacy_refusal=LEGACY_REFUSED,
            keys=access.keys,
            server_names=access.server_names,
        )
        self.policies = Policies(access.policies)
        self.allowed_hosts = AllowedHosts(config.allow_hosts)
        self.targets = TargetResolver(config.groups, AllowedPaths(config.allow_paths))
        self.state_dir = server.state_path or DEFAULT_STATE_DIR
        self.jobs = JobRegistry(reactor, self.state_dir, grace=server.rkill_grace, clock=self.clock)
        self.release_orders = ReleaseOrders(
            config,
            reactor,
            clock=self.clock,
            jobs=self.jobs,
            targets=self.targets,
            state_dir=self.state_dir,
        )
        self.orders = AgentOrders(
            config,
            reactor,
            clock=self.clock,
            jobs=self.jobs,
            targets=self.targets,
            releases=self.release_orders,
        )

    def startup(self) -> None:
        """Checks that must pass before the agent listens, and jobs a previous agent left."""
        # A sync must be able to record itself: refuse to run with a state dir that cannot.
        group_dirs = [g.queue_path for g in self.config.groups.values() if g.queue_path]
        for directory in dict.fromkeys([self.state_dir, *group_dirs]):
            check_state_dir(directory)
        for name in self.allowed_hosts.unresolved:
            self.log.warn("allow::hosts entry {name} does not resolve; ignored", name=name)
        if not self.config.allow_hosts:
            self.log.warn("[allow::hosts] is empty: every request will be refused")
        self.jobs.recover(group_dirs)
        self.release_orders.startup()


class AgentProtocol(ServiceRequestReceiver):
    """One request: peer check, method/path, auth, then the order handler."""

    # `factory` stays untyped: annotating it with our factory class would make this protocol
    # not the kind of protocol Twisted's generic Factory expects (mypy).

    def handleRequest(self, request: Request) -> Response | defer.Deferred[Response]:
        service: AgentService = self.factory.service
        segments = request.segments
        if len(segments) != 2 or segments[0] != "agent" or segments[1] not in ORDERS:
            raise UnknownOrder()
        order = segments[1]
        fields = request.form()
        self.audit.update(order=order, options=fields.get("options", ""))
        key_id = service.authenticator.authenticate(request, fields)
        options = fields.get("options", "")
        decision = service.policies.decide_options(key_id, order, options)
        self.audit.update(keyId=key_id, decision=decision.verdict)
        if not decision.allowed:
            raise NotPermitted(decision.reason)
        if len(options) > MAX_OPTIONS:
            raise BadRequest("options too long")
        if not options:
            raise BadRequest("empty value in options!")
        self.factory.log.info(
            "{order} {options!r} from {peer}", order=order, options=options, peer=request.peer
        )
        if order == "rsync":
            return service.orders.order_rsync(options, label=fields.get("release", ""))
        owner = service.release_orders if order in RELEASE_ORDERS else service.orders
        handler: Callable[[str], Any] = getattr(owner, "order_" + order)
        return handler(options)


class AgentFactory(RequestFactory):
    protocol = AgentProtocol
    log = Logger()

    def __init__(self, service: AgentService) -> None:
        super().__init__()
        self.service = service
