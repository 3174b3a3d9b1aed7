"""The budget of bytes a daemon holds for requests not yet handed to their handler (so not yet
authenticated), across all its connections, and handing the heap a flood leaves behind back to
the system."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

# What a flood of stalled requests can make a daemon hold at most.
MAX_PENDING_BYTES = 8 * 1024 * 1024
# Held at once before a flood's end hands the freed heap back to the system.
TRIM_AFTER_BYTES = 1024 * 1024


class PendingBytes:
    """The bytes a daemon holds for requests not yet handed to their handler, across all its
    connections, and the most it may hold: a connection whose bytes would pass it is refused.

    When the held bytes fall back to none after more than `trim_after` were held at once (a
    flood ended), the C heap is asked to give its free pages back to the system
    (`release_free_memory`): the buffers of thousands of small requests are freed, but without
    that the process would keep their pages."""

    def __init__(
        self,
        limit: int = MAX_PENDING_BYTES,
        *,
        trim_after: int = TRIM_AFTER_BYTES,
        release: Callable[[], object] | None = None,
    ) -> None:
        self.limit = limit
        self.held = 0
        self.trim_after = trim_after
        self._release = release or release_free_memory
        self._peak = 0

    def take(self, count: int) -> bool:
        """Count `count` more bytes as held, or answer False (and count nothing) if that would
        pass the limit."""
        if self.held + count > self.limit:
            return False
        self.held += count
        self._peak = max(self._peak, self.held)
        return True

    def give_back(self, count: int) -> None:
        self.held -= count
        if self.held == 0 and self._peak > self.trim_after:
            self._peak = 0
            self._release()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`; elsewhere
    nothing)."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
