"""Tests for deploy.errors: the one table from a request's error to its HTTP status, and the
texts of the errors whose wording the original fixed."""

from __future__ import annotations

import pytest

from deploy.access import PathNotAllowed
from deploy.auth import AuthError
from deploy.commands import CommandError
from deploy.errors import (
    BadHostSelection,
    BadRequest,
    CapacityExceeded,
    InvalidTarget,
    NotGranted,
    RequestError,
    UnknownGroup,
    UnknownOrder,
    status_for,
)
from deploy.jobs import JobError


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RequestError(413, "body larger than 1 bytes"), 413),
        (BadRequest("options too long"), 400),
        (InvalidTarget("bad remote source '-x'"), 400),
        (UnknownGroup("web"), 400),
        (CommandError("exec[x] not found!"), 400),
        (AuthError("bad signature"), 401),
        (BadHostSelection("nope"), 403),
        (NotGranted("web"), 403),
        (PathNotAllowed("/etc"), 403),
        (UnknownOrder(), 404),
        (JobError("cannot start the sync supervisor"), 500),
        (CapacityExceeded(4), 503),
    ],
)
def test_each_error_has_its_status(error: Exception, status: int) -> None:
    """Every request error maps to the status the daemons have always answered it with."""
    assert status_for(error) == status


def test_subclass_of_a_mapped_error_gets_its_status() -> None:
    """An error derived from a mapped one is answered like it (the table follows the MRO)."""

    class EmptySide(InvalidTarget):
        pass

    assert status_for(EmptySide("empty value in options!")) == 400


@pytest.mark.parametrize("error", [ValueError("x"), OSError(5, "EIO"), KeyError("k")])
def test_unexpected_error_has_no_status(error: Exception) -> None:
    """A bug is not a request error: no status, so the wire logs it and answers a plain 500."""
    assert status_for(error) is None


def test_texts_are_the_originals() -> None:
    """The proxy's refusals and the unknown group keep the original's words, typo included."""
    assert str(NotGranted("web")) == "You don't have permisson to access on this[web]."
    assert str(BadHostSelection("web")) == "Syntax error, unrecognized expression: [web]"
    # issue 15: the unknown group is named; the original's words stay as the suffix
    assert str(UnknownGroup("nosuch")) == "unknown group 'nosuch': empty value in options!"
    assert str(UnknownOrder()) == ""
    assert str(CapacityExceeded(4)) == (
        "too many child processes running (max_prefork = 4); try again later"
    )
