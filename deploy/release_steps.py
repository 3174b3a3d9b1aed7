"""What the sync supervisor does for a release-mode sync once rsync has ended: record the outcome,
rename `.partial-<id>` to `<id>`, switch (activate = auto), run `after_activate` and `check`, and
switch back when the check fails. The supervisor outlives the agent, so these steps finish even
when the agent dies; what a supervisor killed between them leaves, `recover` finishes (the agent
calls it at start)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from deploy.jobstate import GOOD_OUTCOMES, OUTCOME_OK
from deploy.process import is_same_process, proc_start_ticks, signal_group
from deploy.release_layout import ReleaseError
from deploy.releases import (
    OUTCOME_CHECK_FAILED,
    STATE_STAGED,
    ReleaseHistory,
    ReleaseSpec,
)

HOOK_GRACE = 2.0
OUTPUT_KEPT = 2000


def run_hook(argv: list[str], timeout: float) -> tuple[bool, str]:
    """Run a jobs-file command (no shell) in its own process group: (ok, what it said). A run
    past `timeout` is TERMed, then KILLed, and is not ok."""
    try:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    except OSError as e:
        return False, f"cannot run {argv[0]}: {e}"
    try:
        out, _ = child.communicate(timeout=timeout if timeout > 0 else None)
    except subprocess.TimeoutExpired:
        signal_group(child.pid, signal.SIGTERM)
        try:
            child.communicate(timeout=HOOK_GRACE)
        except subprocess.TimeoutExpired:
            signal_group(child.pid, signal.SIGKILL)
            child.communicate()
        return False, f"timed out after {timeout:g}s"
    text = out.decode("utf-8", "replace").strip()[-OUTPUT_KEPT:]
    if child.returncode != 0:
        return False, f"exit code {child.returncode}" + (f": {text}" if text else "")
    return True, text


def after_sync(
    spec_data: dict[str, Any], release_id: str, outcome: str, files: Any, size: Any
) -> tuple[str, str]:
    """The release steps after rsync ended with `outcome`: answers the sync's outcome (maybe
    `check_failed`) and a message ("" when all went well). The releases cleanup took out of the
    set are left for `purge_after_sync`, once the end is recorded: removing a big tree takes as
    long as the sync, and nobody waiting for the outcome needs to wait for it."""
    spec = ReleaseSpec.from_dict(spec_data)
    history = ReleaseHistory(spec)
    try:
        with history.locked() as data:
            switched, before = history.complete(
                data, release_id, outcome, files, size, time.time(), steps=due_steps(spec)
            )
    except (OSError, ReleaseError) as e:
        return "failed", f"release {release_id}: {e}"
    if switched:
        outcome, message = run_steps(history, release_id, before, outcome)
    else:
        message = ""
    return outcome, message


def purge_after_sync(spec_data: dict[str, Any]) -> None:
    """Remove the directories the switch doomed (see `after_sync`), then, for a group that
    makes its releases in two passes, prepare the next sync's base (deploy.release_sync)."""
    spec = ReleaseSpec.from_dict(spec_data)
    history = ReleaseHistory(spec)
    history.layout.purge()
    if spec.two_pass:
        try:
            prepare_base(history)
        except (OSError, ReleaseError):
            pass  # the next sync links into a fresh directory instead


def prepare_base(history: ReleaseHistory) -> None:
    """A hard-link copy of the live release, the base of the next two-pass sync, unless one is
    ready or the release has fewer files than the group's `two_pass_min_files`. Slow (one link
    per file; run after a sync's end is recorded): the copy is made outside the history's lock,
    and becomes the base under it, only once the history says its release is shared (a flag
    saying so wrongly costs nothing; the other way round, cleanup could keep that release as a
    private spare and rsync it in place)."""
    layout = history.layout
    live = layout.live_id()
    if live is None or live in layout.bases():
        return
    with history.locked() as data:
        files = (history.record(data, live) or {}).get("files")
    if not isinstance(files, int) or files < history.spec.two_pass_min_files:
        return  # a small tree: one --link-dest run into a fresh directory costs as much
    pid, ticks = me()
    temp = layout.copy_release(live, (pid, ticks))
    if temp is None:
        return
    try:
        with history.locked() as data:
            record = history.record(data, live)
            if record is not None and record.get("private") is not False:
                record["private"] = False  # the base's files are links to its inodes
                history.save(data)
            layout.make_base(temp, live)
    except BaseException:
        layout.doom(temp)
        raise


# -- the steps after a switch, recorded in the release's history record (`steps`): each is
# `due`, then `running` (written before it starts), then `done` or `failed`; `skipped` when
# another release went live first, `interrupted` for an after_activate whose runner died
# mid-run (never run twice). `owner` is the process running them (pid, start ticks).

STEPS = ("after_activate", "check")
STEP_DUE, STEP_RUNNING, STEP_DONE, STEP_FAILED = "due", "running", "done", "failed"
STEP_SKIPPED, STEP_INTERRUPTED = "skipped", "interrupted"
Runner = Callable[[list[str], float], tuple[bool, str]]


def me() -> list[int]:
    """This process as a steps owner: pid and start ticks (a reused pid is not the owner)."""
    pid = os.getpid()
    return [pid, proc_start_ticks(pid) or 0]


def due_steps(spec: ReleaseSpec, owner: list[int] | None = None) -> dict[str, Any] | None:
    """The steps a switch to a release makes due (None when the group has neither)."""
    steps: dict[str, Any] = {name: STEP_DUE for name in STEPS if getattr(spec, name)}
    return dict(steps, owner=owner or me()) if steps else None


def run_steps(
    history: ReleaseHistory,
    release_id: str,
    before: str | None,
    outcome: str,
    runner: Runner = run_hook,
) -> tuple[str, str]:
    """Run the due steps of the live `release_id`, each claimed in the history before it runs
    and its end recorded after; a failed check switches back to `before` (see switch_back).
    Answers the outcome and a message ("" when all went well)."""
    spec, message = history.spec, ""
    for name in STEPS:
        argv = getattr(spec, name)
        if not argv or not _claim(history, release_id, name):
            continue
        ok, text = runner(argv, spec.check_timeout)
        _record_step(history, release_id, name, STEP_DONE if ok else STEP_FAILED)
        if ok:
            continue
        if name == "after_activate":
            message = f"after_activate failed ({text})"
        else:
            outcome, message = OUTCOME_CHECK_FAILED, f"check failed ({text})"
            message += switch_back(history, release_id, before)
    return outcome, message


def recover(
    history: ReleaseHistory,
    runner: Runner = run_hook,
    alive: Callable[[int, int], bool] = is_same_process,
) -> tuple[str, str, str] | None:
    """Finish what a dead supervisor (or agent) left of a sync's release steps: switch to a
    staged release of an `activate = auto` group whose sync ended ok (newer than the live one),
    then run the live release's steps still due, unless their owner still runs. Blocking (run
    it in a thread). Answers (release, outcome, message), or None when nothing was left."""
    spec = history.spec
    with history.locked() as data:
        live = history.layout.live_id()
        staged = [
            r["id"]
            for r in data["releases"]
            if r["state"] == STATE_STAGED
            and r.get("outcome") in GOOD_OUTCOMES
            and (live is None or r["id"] > live)
        ]
        switched = spec.activate == "auto" and bool(staged)
        if switched:
            history.switch(data, staged[-1], time.time(), steps=due_steps(spec))
            live = staged[-1]
        record = history.record(data, live) if live else None
        steps = record.get("steps") if record else None
        left = steps and any(steps.get(n) in (STEP_DUE, STEP_RUNNING) for n in STEPS)
        owner = (steps or {}).get("owner") or [0, 0]
        if not steps or not left or (owner != me() and alive(owner[0], owner[1])):
            # nothing left, or its supervisor still runs them
            return (staged[-1], OUTCOME_OK, "") if switched else None
        if steps.get("after_activate") == STEP_RUNNING:
            steps["after_activate"] = STEP_INTERRUPTED
        if steps.get("check") == STEP_RUNNING:
            steps["check"] = STEP_DUE  # a check has no effects, and the live release needs one
        steps["owner"] = me()
        history.save(data)
    assert live is not None
    outcome, message = run_steps(history, live, steps.get("previous"), OUTCOME_OK, runner)
    return live, outcome, message


def _claim(history: ReleaseHistory, release_id: str, name: str) -> bool:
    """Mark step `name` of `release_id` running when it is due and the release still live."""
    with history.locked() as data:
        record = history.record(data, release_id)
        steps = record.get("steps") if record else None
        if not steps or steps.get(name) != STEP_DUE:
            return False
        live = history.layout.live_id() == release_id
        steps[name] = STEP_RUNNING if live else STEP_SKIPPED
        history.save(data)
        return live


def _record_step(history: ReleaseHistory, release_id: str, name: str, state: str) -> None:
    with history.locked() as data:
        record = history.record(data, release_id)
        if record is not None and record.get("steps"):
            record["steps"][name] = state
            history.save(data)


def switch_back(history: ReleaseHistory, release_id: str, before: str | None) -> str:
    """After a failed check of `release_id`: back to `before` (marking it bad) when the group
    says so; answers what happened, for the message."""
    if not history.spec.rollback_on_failed_check:
        return "; kept live (rollback_on_failed_check = false)"
    if before is None:
        return "; no earlier release to switch back to"
    try:
        with history.locked() as data:
            if history.layout.live_id() != release_id:
                return "; another release went live meanwhile"
            history.switch(data, before, time.time(), mark_bad=release_id)
            record = history.record(data, release_id)
            if record is not None:
                record["outcome"] = OUTCOME_CHECK_FAILED
                history.save(data)
    except (OSError, ReleaseError) as e:
        return f"; could not switch back to {before}: {e}"
    return f"; switched back to {before}"
