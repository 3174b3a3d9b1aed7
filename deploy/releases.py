"""The release history of a release-mode target, kept in the agent's state directory (never in the
served tree), and every transition of its releases: staging, completion, switch, rollback,
cleanup. Each runs under an flock of the history and writes its intent before it acts;
`reconcile` completes or drops whatever a killed process (agent or supervisor) left."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from deploy.jobstate import GOOD_OUTCOMES, OUTCOME_OK, read_state, write_state
from deploy.process import is_same_process
from deploy.release_layout import (
    BASE,
    PARTIAL,
    SPARE,
    ReleaseError,
    ReleaseLayout,
    default_releases_path,
    new_release_id,
)
from deploy.release_rules import (
    STATE_BAD,
    STATE_GOOD,
    STATE_LIVE,
    STATE_PARTIAL,
    STATE_STAGED,
    cleanup_plan,
    previous_good,
)

OUTCOME_CHECK_FAILED = "check_failed"
# a release record's `base`: its partial started as a prepared base (deploy.release_sync)
BASE_PREPARED = "prepared"


class ReleaseConflict(ReleaseError):
    """The order cannot be done in the releases' present state (409): no earlier good release,
    no staged one, a bad or unknown release named."""


class ReleaseSpec(NamedTuple):
    """A group's release mode as the agent and the supervisor both need it (JSON in the job's
    record). `after_activate`/`check` are argv lists already built from the jobs file. (Not a
    dataclass: the sync supervisor imports this module, and dataclasses cost ~10 ms to import.)"""

    src: str
    releases_path: str
    history: str
    keep: int
    activate: str = "auto"
    link_dest: bool = True
    after_activate: list[str] | None = None
    check: list[str] | None = None
    check_timeout: float = 30.0
    rollback_on_failed_check: bool = True
    label: str = ""
    # new releases made in two passes from a prepared base: link_dest, and rsync options that
    # allow it (deploy.release_argv.eligible)
    two_pass: bool = False
    two_pass_min_files: int = 2000
    extra: dict[str, Any] = {}  # shared by every spec that has none: never changed in place

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReleaseSpec:
        return cls(**{k: v for k, v in data.items() if k in cls._fields})

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


def history_file(state_dir: str, checksum: str) -> str:
    return os.path.join(state_dir, f"releases-{checksum}.json")


def spec_paths(src: str, releases_path: str | None) -> str:
    return releases_path or default_releases_path(src)


# -- the history file


class ReleaseHistory:
    """One target's releases: the history file (with its lock) and the layout it describes."""

    def __init__(self, spec: ReleaseSpec) -> None:
        self.spec = spec
        self.layout = ReleaseLayout(spec.src, spec.releases_path)

    @contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """The reconciled history, held under an exclusive lock; the caller `save`s changes. The
        lock goes with the process that holds it, killed or not."""
        directory = os.path.dirname(self.spec.history) or "."
        os.makedirs(directory, exist_ok=True)
        fd = os.open(self.spec.history + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = read_state(self.spec.history) or {}
            data.setdefault("releases", [])
            data.setdefault("pending", None)
            data["src"], data["releasesPath"] = self.spec.src, self.spec.releases_path
            if self.reconcile(data):
                self.save(data)
            yield data
        finally:
            os.close(fd)

    def save(self, data: dict[str, Any]) -> None:
        write_state(self.spec.history, data)

    def reconcile(self, data: dict[str, Any]) -> bool:
        """Make the history agree with the directories and the symlink (which are the truth);
        True when it changed."""
        before = repr(data)
        layout = self.layout
        layout.clear_switch_leftovers()
        for name, pid, ticks in layout.base_copies():
            if not is_same_process(pid, ticks):  # its maker died mid-copy
                layout.doom(name)
        live = layout.live_id()
        records: list[dict[str, Any]] = data["releases"]
        pending = data.get("pending")
        if pending:
            # A switch was under way: it happened exactly when the symlink says so.
            if live == pending.get("to"):
                self._switched(data, pending)
            data["pending"] = None
        partials = set(layout.partials())
        dirs = set(layout.release_dirs())
        kept = []
        for r in records:
            if r["state"] == STATE_PARTIAL and r["id"] in dirs and r["id"] not in partials:
                r["state"] = STATE_STAGED  # renamed after rsync ended ok, then the process died
                r["outcome"] = r.get("outcome") or OUTCOME_OK
            on_disk = r["id"] in (partials if r["state"] == STATE_PARTIAL else dirs)
            if on_disk or r["id"] == live:
                kept.append(r)
        if live is not None and not any(r["id"] == live for r in kept):
            kept.append(_record(live, "", "unknown (history lost)", None, None))
        for r in kept:
            if r["id"] == live and r["state"] != STATE_GOOD:
                r["state"] = STATE_GOOD
        kept.sort(key=lambda r: r["id"])
        data["releases"] = kept
        return repr(data) != before

    # -- transitions (each with the lock held: `data` comes from `locked`)

    def begin(self, data: dict[str, Any], now: float, run_id: str, source: str) -> str:
        """Stage a new release: convert a live directory into the first release, then prepare
        `.partial-<id>` from a leftover partial, a release cleanup would delete next, a prepared
        base (two passes), or nothing. Answers the id; its record's `base` says whether the sync
        runs in two passes."""
        layout = self.layout
        layout.ensure_root()
        if layout.src_is_directory():
            self._convert(data, now)
        elif os.path.lexists(layout.src) and layout.live_id() is None:
            raise ReleaseError(
                f"{layout.src} is neither a directory nor a symlink into {layout.root}: "
                "release mode will not replace it"
            )
        release_id = _next_id(data, now)
        records: list[dict[str, Any]] = data["releases"]
        leftovers = layout.partials()
        # A base rsync brings up to date must share no inode with another release: rsync changes
        # the attributes of an up-to-date file in place (chmod, chown, utime), which would change
        # the live release too. With link_dest, a fresh partial and --link-dest (rsync links a
        # file only when content and attributes match); without it, a leftover partial or a
        # spare, but only one the history knows to be private (made without --link-dest, also
        # when the group's link_dest setting changed since).
        private = not self.spec.link_dest
        resumable = [
            r["id"] for r in records if r["id"] in leftovers and r.get("private") is True
        ]
        spares = [i for i in layout.spares() if i in data.get("privateSpares", [])]
        # Two passes privatize every entry they change (deploy.release_sync), so a base made
        # of hard links is safe for them: a prepared base, or a partial they left.
        two_pass = self.spec.two_pass
        resumable_two = [
            r["id"] for r in records if r["id"] in leftovers and r.get("base") == BASE_PREPARED
        ]
        bases = layout.bases() if two_pass else []
        base = "fresh"
        if private and resumable:
            base = resumable[-1]
            layout.rename_partial(base, release_id)  # rsync resumes into it
        elif private and spares:
            layout.recycle(spares[-1], release_id)
            base = "spare"
        elif two_pass and resumable_two:
            base = resumable_two[-1]
            layout.rename_partial(base, release_id)
        elif bases:
            layout.take_base(bases.pop(), release_id)
            base = BASE_PREPARED
        else:
            os.mkdir(layout.partial(release_id), 0o755)
        prepared = base == BASE_PREPARED or base in resumable_two
        for old in leftovers:
            if old != base:
                layout.doom(PARTIAL + old)
        for old in layout.spares():
            layout.doom(SPARE + old)
        for name in layout.scratches():
            layout.doom(name)  # a killed two-pass sync's (none runs now: this one starts)
        # one base at most: the newest stays for a later sync when a leftover partial was
        # taken; none once the group has no two passes
        stale = bases if two_pass else layout.bases()
        for old in stale[:-1] if base in resumable_two else stale:
            layout.doom(BASE + old)
        data["privateSpares"] = []
        data["releases"] = records = [r for r in records if r["id"] not in leftovers]
        link_base = None if prepared else self._link_base()
        live_record = self.record(data, link_base) if link_base else None
        if live_record is not None:
            live_record["private"] = False  # the new release's files will be links to its inodes
        records.append(_record(release_id, self.spec.label, source, now, None))
        records[-1].update(state=STATE_PARTIAL, runId=run_id)
        records[-1]["private"] = link_base is None and not prepared
        if prepared:
            records[-1]["base"] = BASE_PREPARED
        self.save(data)
        return release_id

    def two_pass(self, data: dict[str, Any], release_id: str) -> bool:
        """Whether the sync of the partial `release_id` runs in two passes (see `begin`)."""
        return (self.record(data, release_id) or {}).get("base") == BASE_PREPARED

    def rsync_extras(self, data: dict[str, Any], release_id: str) -> list[str]:
        """Options the sync into a partial adds: --link-dest to the live release (none for two
        passes from a prepared base)."""
        link_base = None if self.two_pass(data, release_id) else self._link_base()
        return [f"--link-dest={self.layout.path(link_base)}"] if link_base else []

    def _link_base(self) -> str | None:
        """The release a new one is linked to (`begin` marks it shared): the live one, with
        link_dest."""
        return self.layout.live_id() if self.spec.link_dest else None

    def complete(
        self,
        data: dict[str, Any],
        release_id: str,
        outcome: str,
        files: Any,
        size: Any,
        now: float,
        steps: dict[str, Any] | None = None,
    ) -> tuple[bool, str | None]:
        """Record how the sync into `.partial-<id>` ended; after ok/warning it becomes `<id>`, and
        is switched to with `activate = auto` (with the `steps` then due). Answers (switched, the
        release live before)."""
        record = self.record(data, release_id)
        if record is None:
            raise ReleaseError(f"release {release_id} is not in the history")
        record.update(outcome=outcome, files=files, bytes=size)
        if outcome not in GOOD_OUTCOMES:
            self.save(data)
            return False, None
        self.layout.stage_to_release(release_id)
        record["state"] = STATE_STAGED
        self.save(data)
        if self.spec.activate != "auto":
            return False, None
        return True, self.switch(data, release_id, now, steps=steps)

    def switch(
        self,
        data: dict[str, Any],
        to: str,
        now: float,
        mark_bad: str | None = None,
        steps: dict[str, Any] | None = None,
    ) -> str | None:
        """Make `to` live (intent first, then the rename, then the record), cleanup after; answers
        the release that was live before. `steps` (see deploy.release_steps) go with the intent,
        so the record says which steps are due even when the process dies right after the rename."""
        before = self.layout.live_id()
        data["pending"] = {"to": to, "from": before, "at": now, "markBad": mark_bad}
        if steps:
            data["pending"]["steps"] = steps
        self.save(data)
        self.layout.switch(to)
        self._switched(data, data["pending"])
        data["pending"] = None
        self._cleanup(data, to)
        data["releases"] = [
            r
            for r in data["releases"]
            if r["state"] == STATE_PARTIAL or self.layout.exists(r["id"])
        ]
        self.save(data)
        return before

    def activate(self, data: dict[str, Any], release_id: str | None, now: float) -> str | None:
        """Switch to `release_id` (staged or good), default the newest staged one."""
        records = data["releases"]
        if release_id is None:
            staged = [r["id"] for r in records if r["state"] == STATE_STAGED]
            if not staged:
                raise ReleaseConflict("no staged release to activate")
            release_id = staged[-1]
        record = self.record(data, release_id)
        if record is None or record["state"] not in (STATE_STAGED, STATE_GOOD):
            state = "unknown" if record is None else record["state"]
            raise ReleaseConflict(f"release {release_id} is {state}: cannot activate it")
        return self.switch(data, release_id, now)

    def rollback(self, data: dict[str, Any], release_id: str | None, now: float) -> str:
        """Switch to the previous good release (or `release_id`); the release left is bad.
        Answers the release switched to."""
        live = self.layout.live_id()
        if release_id is None:
            release_id = previous_good(data["releases"], live)
            if release_id is None:
                raise ReleaseConflict("no earlier good release to roll back to")
        record = self.record(data, release_id)
        if record is None or record["state"] not in (STATE_GOOD, STATE_STAGED):
            state = "unknown" if record is None else record["state"]
            raise ReleaseConflict(f"release {release_id} is {state}: cannot roll back to it")
        if release_id == live:
            raise ReleaseConflict(f"release {release_id} is already live")
        self.switch(data, release_id, now, mark_bad=live)
        return release_id

    # -- questions

    def record(self, data: dict[str, Any], release_id: str) -> dict[str, Any] | None:
        return next((r for r in data["releases"] if r["id"] == release_id), None)

    def listing(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Newest first, each with its state as shown (`live` for the live one)."""
        live = self.layout.live_id()
        out = []
        for r in sorted(data["releases"], key=lambda r: r["id"], reverse=True):
            shown = {k: r.get(k) for k in ("id", "label", "created", "activated", "files")}
            shown.update(bytes=r.get("bytes"), outcome=r.get("outcome"), source=r.get("source"))
            shown["state"] = STATE_LIVE if r["id"] == live else r["state"]
            out.append(shown)
        return out

    def live(self, data: dict[str, Any]) -> dict[str, Any] | None:
        live = self.layout.live_id()
        record = self.record(data, live) if live else None
        if record is None:
            return None
        return {"id": live, "label": record.get("label", ""), "activated": record.get("activated")}

    # -- internals

    def _switched(self, data: dict[str, Any], pending: dict[str, Any]) -> None:
        record = self.record(data, pending["to"])
        if record is not None:
            record.update(state=STATE_GOOD, activated=pending.get("at"))
            if pending.get("steps"):
                record["steps"] = dict(pending["steps"], previous=pending.get("from"))
        bad = self.record(data, pending["markBad"]) if pending.get("markBad") else None
        if bad is not None:
            bad["state"] = STATE_BAD

    def _cleanup(self, data: dict[str, Any], live: str) -> None:
        """Take the releases `cleanup_plan` names out of the set: the newest becomes the spare
        the next sync starts from (replacing an older spare) when it is private and the group
        does not use link_dest, the others are doomed."""
        doomed = [i for i in cleanup_plan(data["releases"], live, self.spec.keep)]
        doomed = [i for i in doomed if self.layout.exists(i)]
        if not doomed:
            return
        for old in self.layout.spares():
            self.layout.doom(SPARE + old)
        data["privateSpares"] = []
        newest = self.record(data, doomed[-1])
        if not self.spec.link_dest and newest is not None and newest.get("private") is True:
            self.layout.make_spare(doomed.pop())  # see begin: only a private tree is a safe base
            data["privateSpares"] = [newest["id"]]
        for release_id in doomed:
            self.layout.doom(release_id)

    def _convert(self, data: dict[str, Any], now: float) -> None:
        release_id = new_release_id(now)
        record = _record(release_id, "converted", "the live directory", now, now)
        record["private"] = True  # the operator's own tree (until a sync links to it)
        data["releases"].append(record)
        data["pending"] = {"to": release_id, "from": None, "at": now, "markBad": None}
        self.save(data)
        try:
            self.layout.convert(release_id)
        except BaseException:
            data["releases"].remove(record)
            data["pending"] = None
            self.save(data)
            raise
        self._switched(data, data["pending"])
        data["pending"] = None
        self.save(data)


def _next_id(data: dict[str, Any], now: float) -> str:
    """A new id that sorts after every recorded one (a clock that steps back, or two in the
    same microsecond)."""
    newest = max((r["id"] for r in data["releases"]), default="")
    created = [r["created"] for r in data["releases"] if isinstance(r.get("created"), int | float)]
    now = max([now, *(c + 0.000001 for c in created)])
    release_id = new_release_id(now)
    while release_id <= newest:
        now += 0.000001
        release_id = new_release_id(now)
    return release_id


def _record(
    release_id: str, label: str, source: str, created: float | None, activated: float | None
) -> dict[str, Any]:
    return {
        "id": release_id,
        "label": label,
        "created": created,
        "activated": activated,
        "source": source,
        "files": None,
        "bytes": None,
        "outcome": None,
        "state": STATE_GOOD,
    }
