"""Every error a request to a daemon can end in, and the one table that says which HTTP status
each is answered with (`status_for`); the error's message is the text/plain body the user reads.
Domain errors are raised where the problem is found and never wrapped by hand."""

from __future__ import annotations

from deploy.access import PathNotAllowed
from deploy.auth import AuthError
from deploy.commands import CommandError
from deploy.jobs import JobError, StateFull
from deploy.release_layout import ReleaseError
from deploy.releases import ReleaseConflict


class RequestError(Exception):
    """A request the wire itself refuses (framing, sizes, deadline): it carries its own status."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UnknownOrder(Exception):
    """A path that names no order this daemon takes; answered with an empty body."""


class BadRequest(Exception):
    """A request whose fields cannot be acted on: missing, too long or malformed."""


class InvalidTarget(BadRequest):
    """`options` names no target the agent may sync: an empty side, or an unsafe remote source."""


class UnknownGroup(InvalidTarget):
    """`options` names no `[rsync::group::NAME]`. The message names it; the original's words
    (it answered an empty value) stay as a suffix for the scripts that match them."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown group {name!r}: empty value in options!")
        self.name = name


class BadHostSelection(Exception):
    """Proxy `args` that are neither `hosts:a,b` nor `groups:g1,g2`; the original's text."""

    def __init__(self, selection: str) -> None:
        super().__init__(f"Syntax error, unrecognized expression: [{selection}]")
        self.selection = selection


class NotGranted(Exception):
    """A host or group the API key does not grant (or no such key)."""

    def __init__(self, name: str) -> None:
        # The original's text, spelling included: scripts match on it.
        super().__init__(f"You don't have permisson to access on this[{name}].")
        self.name = name


class NotPermitted(Exception):
    """The key's policy refuses this order, group or job; the message names what was refused."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"not permitted: {reason}")
        self.reason = reason


class CapacityExceeded(Exception):
    """`max_prefork` child processes already run; the caller may try again later."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"too many child processes running (max_prefork = {limit}); try again later"
        )
        self.limit = limit


class RolloutConflict(Exception):
    """A rollout of the same group to some of the same hosts is already running on this proxy."""

    def __init__(self, rollout_id: str, group: str) -> None:
        super().__init__(f"rollout {rollout_id} of group {group} is already running")
        self.rollout_id = rollout_id


class UnknownRollout(Exception):
    """No rollout of that id is kept here (or the API key may not see it)."""

    def __init__(self, rollout_id: str) -> None:
        super().__init__(f"no rollout {rollout_id}")


class PendingBytesExceeded(Exception):
    """Connections already hold as many bytes of requests not yet authenticated as the daemon
    allows (a flood of stalled requests); the caller may try again later."""

    def __init__(self) -> None:
        super().__init__("too many requests in flight; try again later")


class ClientWentAway(Exception):
    """An order stopped because its client hung up before the answer: only ever logged (the
    status nginx logs for it), never sent."""

    def __init__(self) -> None:
        super().__init__("the client went away before its answer")


STATUS: dict[type, int] = {
    BadRequest: 400,
    CommandError: 400,
    AuthError: 401,
    BadHostSelection: 403,
    NotGranted: 403,
    NotPermitted: 403,
    PathNotAllowed: 403,
    UnknownOrder: 404,
    JobError: 500,
    ReleaseConflict: 409,
    RolloutConflict: 409,
    UnknownRollout: 404,
    ReleaseError: 500,
    StateFull: 503,
    ClientWentAway: 499,
    CapacityExceeded: 503,
    PendingBytesExceeded: 503,
}


def status_for(error: BaseException) -> int | None:
    """The HTTP status `error` is answered with, or None for an unexpected error (a bug: 500,
    logged)."""
    if isinstance(error, RequestError):
        return error.status
    for cls in type(error).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return None
