"""Replays across a restart (issue 12, point 5), on a `Clock`: the nonce cache starts empty, so a
verifier refuses every request signed before the second in which its daemon started, and accepts
at most FUTURE_SKEW seconds of a client's clock running ahead; the head of a request (its
signature header's shape and time) can be judged before its body is read."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from deploy.auth import (
    FUTURE_SKEW,
    AuthError,
    HmacVerifier,
    RequestAuthenticator,
    legacy_auth_key,
    sign_request,
)
from deploy.wire import Request

KEY = "s3cret-key"
STARTED = 1_700_000_000.4  # the daemon started 0.4 s into this second
METHOD, PATH, BODY = "POST", "/agent/status", b"options=web"
BEFORE_START = "request signed before this daemon started; sign it again"


def started_verifier(**kwargs: object) -> tuple[Clock, HmacVerifier]:
    """A verifier made when its daemon started, at STARTED."""
    clock = Clock()
    clock.advance(STARTED)
    return clock, HmacVerifier(KEY, clock=clock, **kwargs)


def signed(now: float, nonce: str | None = None) -> str:
    return sign_request(KEY, METHOD, PATH, BODY, now=now, nonce=nonce)


def test_a_request_captured_before_a_restart_is_refused_after_it() -> None:
    """A request the old daemon accepted is refused by the new one, though its nonce is unknown
    there and its time is well inside the window."""
    old_clock, old = started_verifier()
    old_clock.advance(30)
    captured = signed(old_clock.seconds())
    old.verify(captured, METHOD, PATH, BODY)
    restart = Clock()
    restart.advance(old_clock.seconds() + 1.5)  # killed, started again 1.5 s later
    new = HmacVerifier(KEY, clock=restart)
    restart.advance(1)
    with pytest.raises(AuthError, match=f"^{BEFORE_START}$"):
        new.verify(captured, METHOD, PATH, BODY)


@pytest.mark.parametrize("signed_at", [STARTED - 1, STARTED - 1.4, STARTED - 30, STARTED - 59])
def test_a_request_signed_a_second_or_more_before_the_start_is_refused(signed_at: float) -> None:
    """Signed one second (or more) before the start: refused, whatever the clock says now."""
    clock, verifier = started_verifier()
    clock.advance(0.5)
    with pytest.raises(AuthError, match=f"^{BEFORE_START}$"):
        verifier.verify(signed(signed_at), METHOD, PATH, BODY)


def test_requests_signed_in_the_second_of_the_start_and_after_are_accepted() -> None:
    """The skew is the timestamp's resolution: a request of the start's own second passes (a
    client that signs as the daemon starts is not refused), and so does everything after."""
    clock, verifier = started_verifier()
    clock.advance(0.3)
    verifier.verify(signed(STARTED - 0.4), METHOD, PATH, BODY)
    verifier.verify(signed(STARTED + 0.5), METHOD, PATH, BODY)
    clock.advance(10)
    verifier.verify(signed(clock.seconds()), METHOD, PATH, BODY)


def test_the_start_can_be_given() -> None:
    """`started` sets the start explicitly (a daemon that records it earlier than its verifier)."""
    clock = Clock()
    clock.advance(STARTED + 10)
    verifier = HmacVerifier(KEY, clock=clock, started=STARTED)
    assert verifier.not_before == int(STARTED)
    verifier.verify(signed(STARTED + 1), METHOD, PATH, BODY)
    with pytest.raises(AuthError, match=f"^{BEFORE_START}$"):
        verifier.verify(signed(STARTED - 1), METHOD, PATH, BODY)


@pytest.mark.parametrize("ahead", [FUTURE_SKEW + 1, 30, 60])
def test_a_request_from_the_future_beyond_the_skew_is_refused(ahead: float) -> None:
    """A request dated more than FUTURE_SKEW ahead is refused, not accepted for the whole window
    (where it would outlive a restart by as much)."""
    clock, verifier = started_verifier()
    clock.advance(100)
    with pytest.raises(AuthError, match="^request time outside the allowed window$"):
        verifier.verify(signed(clock.seconds() + ahead), METHOD, PATH, BODY)
    assert FUTURE_SKEW <= 5


def test_check_header_judges_shape_and_time_without_the_body_and_remembers_nothing() -> None:
    """check_header: a good header passes (and its nonce is not used up: verify still takes it
    once); a stale, early, pre-start or malformed one raises AuthError."""
    clock, verifier = started_verifier()
    clock.advance(5)
    good = signed(clock.seconds())
    verifier.check_header(good)
    verifier.check_header(good)
    verifier.verify(good, METHOD, PATH, BODY)
    for bad in (
        signed(clock.seconds() - 61),
        signed(clock.seconds() + 30),
        signed(STARTED - 1),
        "Deploy-HMAC-SHA256 ts=x",
        None,
    ):
        with pytest.raises(AuthError):
            verifier.check_header(bad)


def test_check_head_leaves_an_unsigned_request_to_authenticate() -> None:
    """No Authorization header: check_head lets it by (the body may hold a legacy auth_key, or
    the refusal should say what was asked); authenticate then decides as before."""
    clock = Clock()
    clock.advance(STARTED)
    authenticator = RequestAuthenticator(KEY, clock=clock, legacy=True)
    request = Request(METHOD, PATH, body=b"auth_key=x")
    authenticator.check_head(request)
    authenticator.authenticate(request, {"auth_key": legacy_auth_key(KEY, STARTED)})
    stale = Request(METHOD, PATH, headers={"authorization": signed(STARTED - 120)})
    with pytest.raises(AuthError, match="outside the allowed window"):
        authenticator.check_head(stale)


def test_a_reload_keeps_the_start_of_the_daemon_not_of_the_reload() -> None:
    """A fresh verifier that takes over a running one's nonces (SIGHUP reload) takes over when
    the daemon started too: a request signed after the start but before the reload passes
    (once), one signed before the start still does not."""
    clock, running = started_verifier()
    clock.advance(30)
    fresh = HmacVerifier(KEY, clock=clock)
    fresh.carry_nonces(running)
    assert fresh.not_before == running.not_before == int(STARTED)
    fresh.verify(signed(STARTED + 10), METHOD, PATH, BODY)
    with pytest.raises(AuthError, match=f"^{BEFORE_START}$"):
        fresh.verify(signed(STARTED - 1), METHOD, PATH, BODY)
