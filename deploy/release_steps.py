"""What the sync supervisor does for a release-mode sync once rsync has ended: record the outcome,
rename `.partial-<id>` to `<id>`, switch (activate = auto), run `after_activate` and `check`, and
switch back when the check fails. The supervisor outlives the agent, so these steps finish even
when the agent dies; a supervisor killed between them leaves what `reconcile` completes."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

from deploy.process import signal_group
from deploy.release_layout import ReleaseError
from deploy.releases import OUTCOME_CHECK_FAILED, ReleaseHistory, ReleaseSpec

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
    `check_failed`) and a message ("" when all went well)."""
    spec = ReleaseSpec.from_dict(spec_data)
    history = ReleaseHistory(spec)
    try:
        with history.locked() as data:
            switched, before = history.complete(data, release_id, outcome, files, size, time.time())
    except (OSError, ReleaseError) as e:
        return "failed", f"release {release_id}: {e}"
    if not switched:
        history.layout.purge()
        return outcome, ""
    message = ""
    if spec.after_activate:
        ok, text = run_hook(spec.after_activate, spec.check_timeout)
        if not ok:
            message = f"after_activate failed ({text})"
    if spec.check:
        ok, text = run_hook(spec.check, spec.check_timeout)
        if not ok:
            outcome = OUTCOME_CHECK_FAILED
            message = f"check failed ({text})"
            message += switch_back(history, release_id, before)
    history.layout.purge()
    return outcome, message


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
