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


class ClientGone(Exception):
    """The client hung up before its answer, and what ran only to answer it was stopped. Nobody
    reads this answer: its status (nginx's 499) is for the logs."""

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the answer")


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
    ReleaseError: 500,
    StateFull: 503,
    CapacityExceeded: 503,
    ClientGone: 499,
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
