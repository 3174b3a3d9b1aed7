"""Protecting the source: when rsyncd answers `@ERROR: max connections (N) reached` (rsync exit
5), a sync waits with jittered exponential backoff and tries again, until `source_retry`
seconds have gone by; only then does it count as failed."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

EXIT_SOURCE_BUSY = 5
SOURCE_BUSY = "@ERROR: max connections"
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


def source_busy(exit_code: int | None, stderr_text: str) -> bool:
    """rsync ended because the rsync daemon had no connection left for it."""
    return exit_code == EXIT_SOURCE_BUSY and SOURCE_BUSY in stderr_text


class SourceRetry:
    """The retries of one sync: `delay()` answers how long to wait before the next try, or None
    once `limit` seconds have gone by since the source first said it was full."""

    def __init__(
        self,
        limit: float,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.limit = limit
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        self.since: float | None = None
        self.attempts = 0

    def delay(self) -> float | None:
        now = self.monotonic()
        if self.since is None:
            self.since = now
        left = self.limit - (now - self.since)
        if left <= 0:
            return None
        backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2**self.attempts)
        self.attempts += 1
        # full-ish jitter: a fleet turned away at once does not come back at once
        return min(left, self.rng.uniform(backoff / 2, backoff))

    def waiting(self, reason: str, delay: float) -> dict[str, Any]:
        """What the sync's record (and so `status`) says while it waits."""
        return {"reason": reason, "attempt": self.attempts, "until": time.time() + delay}


def sleep_unless(delay: float, stop: Callable[[], bool], step: float = 0.1) -> None:
    """Sleep `delay` seconds, returning early once `stop()` says so (an rkill)."""
    end = time.monotonic() + delay
    while not stop() and (left := end - time.monotonic()) > 0:
        time.sleep(min(step, left))
