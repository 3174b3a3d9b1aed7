"""Release mode in the agent: the `activate`, `rollback` and `releases` orders, the staging of a
release-mode `rsync` (the partial it writes into, the record its supervisor completes), the live
release `status` names, the start-up checks of release groups and the recovery of their
histories. The transitions themselves are `deploy.releases`'."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from deploy.access import AllowedPaths, PathNotAllowed
from deploy.commands import CommandError, CommandResult, build_command, run_command
from deploy.config import AgentConfig, ConfigError, RsyncGroup
from deploy.errors import InvalidTarget
from deploy.jobs import JobRegistry, target_key
from deploy.jobstate import OUTCOME_OK
from deploy.release_argv import eligible
from deploy.release_layout import default_releases_path
from deploy.release_steps import recover, switch_back
from deploy.releases import (
    OUTCOME_CHECK_FAILED,
    ReleaseHistory,
    ReleaseSpec,
    history_file,
)
from deploy.rsync import DEFAULT_FLAGS, RsyncTarget
from deploy.targets import TargetResolver, group_state_dir
from deploy.wire import Response

RELEASE_ORDERS = ("activate", "rollback", "releases", "check")
MAX_LABEL = 128
# rsync options that write into existing files, which hard-linked releases share
REFUSED_OPTIONS = ("--inplace", "--append", "--append-verify")


class NotReleaseMode(InvalidTarget):
    """The group named is not in release mode (400)."""


def check_release_group(
    group: RsyncGroup, allowed: AllowedPaths, jobs: dict[str, str], path: str | None
) -> None:
    """A release group's keys, each wrong one a one-line ConfigError naming the group."""
    where = f"[rsync::group::{group.name}]"

    def refuse(text: str) -> ConfigError:
        return ConfigError(f"{where} {text}", path, group.line)

    if group.releases is None:
        return
    if group.releases < 2:
        raise refuse(f"releases = {group.releases}: keep at least 2 (the live one and one back)")
    if group.activate not in ("auto", "manual"):
        raise refuse(f"activate = {group.activate!r}: auto or manual")
    options = group.options if group.options is not None else DEFAULT_FLAGS
    for option in options:
        if option.split("=")[0] in REFUSED_OPTIONS:
            raise refuse(f"option {option}: release mode never writes into existing files")
    releases_path = group.releases_path or default_releases_path(group.src)
    if not releases_path.startswith("/"):
        raise refuse(f"releases_path = {releases_path}: not an absolute path")
    try:
        allowed.check(releases_path)
    except PathNotAllowed:
        raise refuse(f"releases_path {releases_path} is not inside [allow::paths]") from None
    for key in ("after_activate", "check"):
        value = getattr(group, key)
        if value:
            try:
                build_command(jobs, value)
            except CommandError as e:
                raise refuse(f"{key} = {value}: {e}") from None


class ReleaseOrders:
    """The release-mode side of the agent's orders."""

    log = Logger()

    def __init__(
        self,
        config: AgentConfig,
        reactor: Any,
        *,
        clock: IReactorTime,
        jobs: JobRegistry,
        targets: TargetResolver,
        state_dir: str,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self.jobs = jobs
        self.targets = targets
        self.state_dir = state_dir

    # -- start-up

    def startup(self) -> None:
        """Check every release group, then reconcile its history with its directories."""
        allowed = self.targets.allowed_paths
        for group in self.config.groups.values():
            check_release_group(group, allowed, self.config.jobs, self.config.path)
        for group in self.config.groups.values():
            if group.releases is None:
                continue
            target, _ = self.targets.resolve(group.name)
            history = ReleaseHistory(self.spec_for(target, group))
            with history.locked() as data:
                live = history.live(data)
            self.log.info("group {group}: live release {live}", group=group.name, live=live)
            self._in_thread(history, self._recover, f"recovering group {group.name}")

    # -- what the rsync and status orders ask

    def spec_for(self, target: RsyncTarget, group: RsyncGroup, label: str = "") -> ReleaseSpec:
        # beside the sync records, in the same (maybe private, see deploy.statedir) directory
        state_dir = self.jobs.directory(group_state_dir(group) or self.state_dir)
        jobs = self.config.jobs
        return ReleaseSpec(
            src=target.src.rstrip("/"),
            releases_path=group.releases_path or default_releases_path(target.src),
            history=history_file(state_dir, target_key(target, release_mode=True)),
            keep=group.releases or 2,
            activate=group.activate,
            link_dest=group.link_dest,
            after_activate=build_command(jobs, group.after_activate)[1]
            if group.after_activate
            else None,
            check=build_command(jobs, group.check)[1] if group.check else None,
            check_timeout=group.check_timeout,
            rollback_on_failed_check=group.rollback_on_failed_check,
            label=label,
            two_pass=group.link_dest
            and eligible(target.options if target.options is not None else DEFAULT_FLAGS),
            two_pass_min_files=group.two_pass_min_files,
        )

    def stage(self, target: RsyncTarget, group: RsyncGroup, label: str) -> dict[str, Any]:
        """Prepare the partial a release-mode sync writes into: what `JobRegistry.start` needs."""
        if len(label) > MAX_LABEL or any(ord(c) < 32 or ord(c) == 127 for c in label):
            raise InvalidTarget(f"bad release label (at most {MAX_LABEL} printable characters)")
        spec = self.spec_for(target, group, label)
        history = ReleaseHistory(spec)
        run_id = _run_id()
        with history.locked() as data:
            release_id = history.begin(data, time.time(), run_id, target.dest)
            extras = history.rsync_extras(data, release_id)
            two_pass = history.two_pass(data, release_id)
        options = list(target.options if target.options is not None else DEFAULT_FLAGS)
        if not any(o == "--del" or o.startswith("--delete") for o in options):
            options.append("--delete")  # a recycled or resumed base must end up the source
        sync = dataclasses.replace(
            target, src=history.layout.partial(release_id) + "/", options=(*options, *extras)
        )
        release = {"sync": sync, "runId": run_id, "spec": spec.to_dict(), "id": release_id}
        return dict(release, twoPass=two_pass)

    def live_release(self, target: RsyncTarget, group: RsyncGroup) -> dict[str, Any] | None:
        history = ReleaseHistory(self.spec_for(target, group))
        with history.locked() as data:
            return history.live(data)

    # -- orders

    def order_releases(self, options: str) -> Response:
        history, _ = self._history(options, with_id=False)
        with history.locked() as data:
            listing = history.listing(data)
            live = history.live(data)
        return Response.json({"return": "true", "release": live, "releases": listing})

    def order_activate(self, options: str) -> defer.Deferred[Response]:
        history, release_id = self._history(options)
        with history.locked() as data:
            before = history.activate(data, release_id, time.time())
            live = history.live(data)
        return self._after_switch(history, live, before)

    def order_rollback(self, options: str) -> defer.Deferred[Response]:
        history, release_id = self._history(options)
        with history.locked() as data:
            left = history.layout.live_id()
            history.rollback(data, release_id, time.time())
            live = history.live(data)
        return self._after_switch(history, live, left, rolled_back=True)

    @defer.inlineCallbacks
    def order_check(self, options: str) -> Generator[defer.Deferred[Any], Any, Response]:
        """The group's `check` on the live release again, switching nothing (a rollout's
        canaries after their wait): outcome ok or check_failed."""
        history, _ = self._history(options, with_id=False)
        with history.locked() as data:
            live = history.live(data)
        body: dict[str, Any] = {"return": "true", "release": live, "outcome": OUTCOME_OK}
        spec = history.spec
        if spec.check:
            result = yield self._hook(spec.check, spec.check_timeout)
            if not result.ok:
                body.update(return_false(), outcome=OUTCOME_CHECK_FAILED)
                body["message"] = f"check failed: {_said(result)}"
        return Response.json(body)

    # -- internals

    def _history(self, options: str, with_id: bool = True) -> tuple[ReleaseHistory, str | None]:
        name, _, release_id = options.partition(",")
        if release_id and not with_id:
            raise InvalidTarget("releases takes a group name only")
        target, group = self.targets.resolve(name.strip())
        if group is None or group.releases is None:
            raise NotReleaseMode(f"group {name.strip()} is not in release mode (releases = N)")
        return ReleaseHistory(self.spec_for(target, group)), release_id.strip() or None

    @defer.inlineCallbacks
    def _after_switch(
        self,
        history: ReleaseHistory,
        live: dict[str, Any] | None,
        before: str | None,
        rolled_back: bool = False,
    ) -> Generator[defer.Deferred[Any], Any, Response]:
        """after_activate, then check (a failed check switches back unless the group says not),
        then the answer; the doomed releases are purged in a thread."""
        spec = history.spec
        body: dict[str, Any] = {"return": "true", "release": live, "previous": before}
        body["outcome"] = OUTCOME_OK
        if spec.after_activate:
            result = yield self._hook(spec.after_activate, spec.check_timeout)
            if not result.ok:
                body["message"] = f"after_activate failed: {_said(result)}"
        if spec.check and not rolled_back:
            result = yield self._hook(spec.check, spec.check_timeout)
            if not result.ok:
                assert live is not None
                back = switch_back(history, live["id"], before)
                body.update(return_false(), outcome=OUTCOME_CHECK_FAILED)
                body["message"] = f"check failed: {_said(result)}{back}"
                with history.locked() as data:
                    body["release"] = history.live(data)
        self._purge(history)
        return Response.json(body)

    def _hook(self, argv: list[str], timeout: float) -> defer.Deferred[CommandResult]:
        d = run_command(self.reactor, argv, timeout=timeout)

        def could_not_run(failure: Any) -> CommandResult:
            failure.trap(CommandError)
            message = failure.getErrorMessage().encode()
            return CommandResult(argv, 127, None, message, truncated=False, timed_out=False)

        return d.addErrback(could_not_run)

    def _purge(self, history: ReleaseHistory) -> None:
        self._in_thread(history, lambda h: h.layout.purge(), "purging releases")

    def _recover(self, history: ReleaseHistory) -> None:
        """What a dead supervisor left (deploy.release_steps.recover), then the purge."""
        done = recover(history)
        if done is not None:
            release, outcome, message = done
            self.log.info(
                "{src}: finished the steps a dead process left for release {release}: {outcome}"
                " {message}",
                src=history.spec.src,
                release=release,
                outcome=outcome,
                message=message,
            )
        history.layout.purge()

    def _in_thread(
        self, history: ReleaseHistory, work: Callable[[ReleaseHistory], None], what: str
    ) -> None:
        """Blocking file-system work (and hooks) outside the event loop when there is one."""
        if hasattr(self.reactor, "getThreadPool"):
            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work, history)
            d.addErrback(lambda f: self.log.failure(what, f))
        else:
            work(history)


def return_false() -> dict[str, str]:
    return {"return": "false"}


def _said(result: CommandResult) -> str:
    text = result.output.decode("utf-8", "replace").strip()[-500:]
    if result.timed_out:
        return "timed out"
    return f"exit code {result.exit_code}" + (f": {text}" if text else "")


def _run_id() -> str:
    return uuid.uuid4().hex
