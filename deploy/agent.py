"""The agent daemon's wiring: the service every connection shares (config, auth, access lists,
jobs, the order handlers of `deploy.agent_orders`), and the protocol and factory that take one
request, check its peer, path and signature, and hand it to its order."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from deploy import auth, privileges
from deploy.access import AllowedHosts, AllowedPaths
from deploy.agent_orders import AgentOrders
from deploy.config import AgentConfig, agent_key_cipher
from deploy.errors import BadRequest, ClientWentAway, NotPermitted, UnknownOrder
from deploy.jobs import JobRegistry
from deploy.message import ORDERS
from deploy.policy import Policies
from deploy.process import trusted_uids
from deploy.release_orders import RELEASE_ORDERS, ReleaseOrders
from deploy.sources import AllowedSources
from deploy.statedir import probe, secure_state_dir
from deploy.targets import TargetResolver
from deploy.wire import Request, RequestFactory, Response, ServiceRequestReceiver

MAX_OPTIONS = 8192
# Orders whose child process only serves the answer: it is stopped when the client hangs up.
DRY_RUN_ORDERS = ("status", "rlist")
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
        sources = AllowedSources(
            config.allow_sources, allow_remote_shell=server.allow_inline_remote_shell
        )
        self.targets = TargetResolver(config.groups, AllowedPaths(config.allow_paths), sources)
        self.state_dir = server.state_path or DEFAULT_STATE_DIR
        self.identity = _identity(server.user, server.group)
        self.jobs = JobRegistry(
            reactor,
            self.state_dir,
            grace=server.rkill_grace,
            clock=self.clock,
            owners=trusted_uids(self.identity.uid if self.identity else None),
        )
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
        """Checks that must pass before the agent listens, and jobs a previous agent left.
        Raises OSError (UnsafeStateDir) with one line naming what to fix."""
        # A sync must be able to record itself, in a directory no other local user can write:
        # refuse to run with a state dir that is not so (a full one is only warned about).
        identity = self.identity
        uid = identity.uid if identity else os.geteuid()
        gid = identity.gid if identity else os.getegid()
        group_dirs = [g.queue_path for g in self.config.groups.values() if g.queue_path]
        private = []
        for directory in dict.fromkeys([self.state_dir, *group_dirs]):
            state_dir = probe(
                secure_state_dir(directory, owners=self.jobs.owners, uid=uid, gid=gid)
            )
            if state_dir.private:
                private.append(state_dir.path)
                self.log.info(
                    "{configured} is shared (sticky, writable by others): the agent keeps its "
                    "records in {path}, made for it alone",
                    configured=directory,
                    path=state_dir.path,
                )
            self.jobs.use_dir(state_dir)
        for name in self.allowed_hosts.unresolved:
            self.log.warn("allow::hosts entry {name} does not resolve; ignored", name=name)
        if not self.config.allow_hosts:
            self.log.warn("[allow::hosts] is empty: every request will be refused")
        self.jobs.recover(group_dirs)
        self.release_orders.startup()
        if identity is not None and privileges.is_switch(identity):
            # Records rewritten by recover() as root go to the user the agent is becoming.
            for path in private:
                privileges.hand_over(path, identity)


def _identity(user: str | None, group: str | None) -> privileges.Identity | None:
    """Who the agent will run as (`user`/`group`), None when it stays as it is; a bad name is
    reported by the daemon's start-up, not here."""
    try:
        return privileges.resolve_identity(user, group)
    except privileges.PrivilegeError:
        return None


class AgentProtocol(ServiceRequestReceiver):
    """One request: peer check, method/path, auth, then the order handler."""

    # `factory` stays untyped: annotating it with our factory class would make this protocol
    # not the kind of protocol Twisted's generic Factory expects (mypy).

    # A dry run answering this request, stopped if the client hangs up before its answer.
    dry_run: defer.Deferred[Response] | None = None

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
        if order == "status" and fields.get("run"):  # following a sync: no dry run
            return service.orders.order_status(options, following=fields["run"])
        owner = service.release_orders if order in RELEASE_ORDERS else service.orders
        handler: Callable[[str], Any] = getattr(owner, "order_" + order)
        result = handler(options)
        if order in DRY_RUN_ORDERS and isinstance(result, defer.Deferred):
            self.dry_run = result.addErrback(_client_gone)
        return result

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        dry_run, self.dry_run = self.dry_run, None
        if dry_run is not None and not dry_run.called:
            dry_run.cancel()  # nobody will read its answer: its canceller stops the child


def _client_gone(failure: Failure) -> Response:
    failure.trap(defer.CancelledError)
    raise ClientWentAway()


class AgentFactory(RequestFactory):
    protocol = AgentProtocol
    log = Logger()

    def __init__(self, service: AgentService) -> None:
        super().__init__()
        self.service = service
