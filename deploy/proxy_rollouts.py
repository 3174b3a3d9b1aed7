"""The proxy's background rollouts: `deploy` answers at once with a `rolloutId` and runs the
rollout on (outliving its client); `rollout` follows one (or lists the recent ones). Each
rollout's record is kept in the proxy's state directory (the last KEEP, atomic writes); a proxy
that starts finds the ones it was running and marks them `interrupted`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from deploy.client import OrderClient
from deploy.errors import BadRequest, NotGranted, RolloutConflict, UnknownRollout
from deploy.jobstate import read_state, write_state
from deploy.rollout import Rollout
from deploy.rollout_driver import INTERRUPTED, RUNNING, RolloutDriver, new_rollout_id
from deploy.rollout_host import HostSteps
from deploy.wire import TEXT_TYPE, Response

DEFAULT_PROXY_STATE_DIR = "/var/lib/deploy-proxy"
KEEP = 100
SAVE_EVERY = 0.5  # seconds: a busy rollout's record is written at most this often
ROLLOUT_ID = re.compile(r"^[0-9A-Za-z-]{1,64}$")
RECORD = re.compile(r"^rollout-([0-9A-Za-z-]{1,64})\.json$")


class RolloutStore:
    """Rollout records, one JSON file each in `directory`, the newest KEEP kept; in memory
    only when there is no directory."""

    log = Logger()

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.records: dict[str, dict[str, Any]] = {}
        if directory is not None:
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as e:
                self.log.warn(
                    "cannot keep rollouts in {dir} ({error}): in memory only",
                    dir=directory,
                    error=e,
                )
                self.directory = None

    def path(self, rollout_id: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, f"rollout-{rollout_id}.json")

    def load(self) -> list[dict[str, Any]]:
        """Read the kept records; the ones still `running` were cut off: marked interrupted."""
        if self.directory is None:
            return []
        interrupted = []
        for name in sorted(os.listdir(self.directory)):
            if RECORD.match(name) is None:
                continue
            try:
                record = read_state(os.path.join(self.directory, name))
            except (OSError, ValueError):
                record = None
            if not isinstance(record, dict) or "rolloutId" not in record:
                continue
            if record.get("state") == RUNNING:
                record["state"] = INTERRUPTED
                record["stopped"] = True
                record["reason"] = "the proxy stopped while the rollout ran"
                interrupted.append(record)
                self.save(record)
            self.records[record["rolloutId"]] = record
        self._trim()
        return interrupted

    def save(self, record: dict[str, Any]) -> None:
        self.records[record["rolloutId"]] = record
        if self.directory is not None:
            try:
                write_state(self.path(record["rolloutId"]), record)
            except OSError as e:
                self.log.warn("cannot save rollout {id}: {error}", id=record["rolloutId"], error=e)
        self._trim()

    def recent(self) -> list[dict[str, Any]]:
        return sorted(self.records.values(), key=lambda r: r.get("created", 0), reverse=True)

    def _trim(self) -> None:
        for old in self.recent()[KEEP:]:
            if old.get("state") == RUNNING:
                continue
            del self.records[old["rolloutId"]]
            if self.directory is not None:
                try:
                    os.unlink(self.path(old["rolloutId"]))
                except OSError:
                    pass


class ProxyRollouts:
    """The `deploy` and `rollout` orders of one proxy (`service`: its ProxyService)."""

    log = Logger()

    def __init__(self, service: Any, state_dir: str | None) -> None:
        self.service = service
        self.store = RolloutStore(state_dir)
        self.running: dict[str, RolloutDriver] = {}
        self._last_save: dict[str, float] = {}
        # Told how each rollout ended (`ok`, `failed`, `stopped`; `interrupted` for those a
        # previous proxy left, told as an observer joins): the metrics count them.
        self.interrupted = 0
        self.ended_observers: list[Callable[[str], None]] = []
        for record in self.store.load():
            self.interrupted += 1
            self.log.warn("rollout {id} was interrupted", id=record["rolloutId"])

    def handle(self, request: Any, fields: dict[str, str], peer: str) -> Deferred[Response]:
        if request.order == "deploy":
            return succeed(self.deploy(request, fields, peer))
        return succeed(self.follow(request))

    # -- deploy

    def deploy(self, request: Any, fields: dict[str, str], peer: str) -> Response:
        group = request.options.strip()
        if not group or "," in group:
            raise BadRequest("deploy: options must name one group")
        hosts = self.service.granted_hosts(request.api_key, request.args)
        for rollout_id, driver in self.running.items():
            running = driver.record
            if running["group"] == group and set(running["hosts"]) & set(hosts):
                raise RolloutConflict(rollout_id, group)
        try:
            canary = int(fields.get("canary") or 0)
            canary_wait = float(fields.get("canary_wait") or 0)
            machine = Rollout(
                hosts,
                batch=request.batch,
                max_fail=request.max_fail,
                canary=canary,
                rollback=fields.get("no_rollback", "") not in ("1", "true"),
            )
        except ValueError as e:
            raise BadRequest(f"deploy: {e}") from None
        settings = self.service.config.client
        steps = HostSteps(
            OrderClient(self.service.reactor, self.service.options),
            self.service.reactor,
            group,
            label=request.release,
        )
        record: dict[str, Any] = {
            "rolloutId": new_rollout_id(),
            "group": group,
            "args": request.args,
            "release": request.release,
            "batch": request.batch,
            "maxFail": request.max_fail,
            "canary": canary,
            "canaryWait": canary_wait,
            "rollback": machine.rollback,
            "peer": peer,
        }
        driver = RolloutDriver(
            steps,
            machine,
            self.service.reactor,
            max_parallel=settings.max_parallel or len(hosts) or 1,
            canary_wait=canary_wait,
            record=record,
            on_change=self._changed,
        )
        rollout_id = record["rolloutId"]
        self.running[rollout_id] = driver
        self.log.info(
            "rollout {id} of {group} to {count} hosts from {peer}",
            id=rollout_id,
            group=group,
            count=len(hosts),
            peer=peer,
        )
        driver.run().addCallback(self._finished).addErrback(
            lambda f: self.log.failure("rollout {id}", f, id=rollout_id)
        )
        body = {"return": "true", "rolloutId": rollout_id, "hosts": len(hosts), "group": group}
        return Response.json(body)

    def _changed(self, record: dict[str, Any]) -> None:
        now = self.service.reactor.seconds()
        rollout_id = record["rolloutId"]
        if now - self._last_save.get(rollout_id, -SAVE_EVERY) >= SAVE_EVERY:
            self._last_save[rollout_id] = now
            self.store.save(record)
        else:
            self.store.records[rollout_id] = record

    def _finished(self, record: dict[str, Any]) -> None:
        rollout_id = record["rolloutId"]
        self.running.pop(rollout_id, None)
        self._last_save.pop(rollout_id, None)
        self.store.save(record)
        outcome = rollout_outcome(record)
        for observer in self.ended_observers:
            observer(outcome)
        self.log.info(
            "rollout {id} ended: {failures} failed{stopped}",
            id=rollout_id,
            failures=record.get("failures", 0),
            stopped=f", stopped: {record['reason']}" if record.get("stopped") else "",
        )

    # -- rollout (follow, list)

    def follow(self, request: Any) -> Response:
        """`rollout` with options `ID[,SEQ]`: the record with its events from SEQ; without
        options: the recent rollouts the key may see, newest first, without hosts or events."""
        rollout_id, _, since_text = request.options.partition(",")
        rollout_id = rollout_id.strip()
        if not rollout_id:
            listing = [_summary(r) for r in self.store.recent() if self._may_see(request, r)]
            return _json({"return": "true", "rollouts": listing})
        if ROLLOUT_ID.match(rollout_id) is None:
            raise UnknownRollout(rollout_id)
        record = self.store.records.get(rollout_id)
        if record is None or not self._may_see(request, record):
            raise UnknownRollout(rollout_id)
        try:
            since = max(0, int(since_text or 0))
        except ValueError:
            raise BadRequest(f"rollout: bad event number {since_text!r}") from None
        shown = dict(record)
        shown["events"] = record.get("events", [])[since:]
        shown["return"] = "true"
        return _json(shown)

    def _may_see(self, request: Any, record: dict[str, Any]) -> bool:
        try:
            self.service.granted_hosts(request.api_key, record.get("args", ""))
        except NotGranted:
            return False
        except Exception:
            return False
        return True


def rollout_outcome(record: dict[str, Any]) -> str:
    """How an ended rollout went: `stopped` (its budget or canary), `failed` (some hosts failed
    within the budget) or `ok`."""
    if record.get("stopped"):
        return "stopped"
    return "failed" if record.get("failures") else "ok"


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("rolloutId", "group", "release", "state", "stopped", "reason", "created", "ended")
    summary = {k: record.get(k) for k in keys}
    outcomes: dict[str, int] = {}
    for entry in record.get("hosts", {}).values():
        outcome = entry.get("outcome") or "running"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    summary["outcomes"] = outcomes
    return summary


def _json(body: dict[str, Any]) -> Response:
    return Response(200, json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n", TEXT_TYPE)
