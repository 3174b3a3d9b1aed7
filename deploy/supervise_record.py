"""The sync supervisor's job record (deploy.supervise): the state file written at each step, soft
writes while the sync runs (a failure costs the record, not the sync), and the end, written
through a full file system (tried again, less and less often, until there is space)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from deploy.jobstate import is_disk_full, write_state
from deploy.rsync_output import Progress, clock

# Writing the end on a full file system is tried again, every RECORD_RETRY_MAX seconds at most,
# for RECORD_RETRY_FOR seconds before the supervisor gives up.
RECORD_RETRY_FIRST = 0.25
RECORD_RETRY_MAX = 2.0
RECORD_RETRY_FOR = 24 * 3600.0


class SyncRecord:
    """One sync's state file and what was last written to it; `complain` takes a line for the
    job's log."""

    def __init__(self, path: str, complain: Callable[[str], None]) -> None:
        self.path = path
        self.complain = complain
        self.state: dict[str, Any] = {}
        self.last_write = 0.0
        self.failed = False

    def save(self, **changes: Any) -> None:
        self.state.update(changes)
        write_state(self.path, self.state)
        self.last_write = time.monotonic()

    def save_soft(self, **changes: Any) -> None:
        """Record changes while the sync runs; a failure costs the record, not the sync (the
        whole record is written again with the outcome)."""
        try:
            self.save(**changes)
        except OSError as e:
            self.last_write = time.monotonic()
            if not self.failed:
                self.failed = True
                self.complain(f"cannot record the sync in {self.path}: {e}")

    @staticmethod
    def progress(started: float | None, p: Progress) -> dict[str, Any]:
        """The `progress` of the record: rsync's figures, the time left as rsync means it, and
        the time since rsync `started` (monotonic) by our own clock (rsync prints it only as a
        file ends)."""
        since = 0.0 if started is None else time.monotonic() - started
        return {
            "bytes": p.bytes,
            "percent": p.percent,
            "rate": p.rate,
            "eta": p.remaining(),
            "elapsed": clock(since),
        }

    def save_end(self, **end: Any) -> bool:
        """Record the end; a full file system is waited out (tried again, less and less often,
        for RECORD_RETRY_FOR seconds), any other error gives up at once."""
        delay = RECORD_RETRY_FIRST
        give_up_at = time.monotonic() + RECORD_RETRY_FOR
        said = False
        while True:
            try:
                self.save(**end)
                return True
            except OSError as e:
                if not is_disk_full(e) or time.monotonic() >= give_up_at:
                    self.complain(f"cannot record the outcome ({end.get('outcome')}): {e}")
                    return False
                if not said:
                    said = True
                    self.complain(f"cannot record the outcome yet: {e}; trying again")
            time.sleep(delay)
            delay = min(delay * 2, RECORD_RETRY_MAX)
