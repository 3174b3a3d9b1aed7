"""Tests for deploy.auth: HMAC request signatures, the replay cache and the original's auth_key."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from deploy.auth import (
    DEFAULT_KEY_CIPHER,
    FUTURE_SKEW,
    SCHEME,
    AuthError,
    HmacVerifier,
    RequestAuthenticator,
    check_legacy_auth_key,
    legacy_auth_key,
    sign_request,
)
from deploy.wire import Request

KEY = "s3cret-key"
NOW = 1_700_000_000
METHOD = "POST"
PATH = "/agent/status"
BODY = b"auth_key=&options=web&args=&api_key="
NONCE = "0123456789abcdef0123456789abcdef"

CAPTURED_AUTH_KEY = "3c9b5f1cd6a030bcb7bed9eac80589fb8840744860"
CAPTURED_TIME = 1795561599


def make_verifier(**kwargs: object) -> tuple[Clock, HmacVerifier]:
    """A verifier of a daemon that started long before NOW (see test_auth_restart.py)."""
    clock = Clock()
    verifier = HmacVerifier(KEY, clock=clock, **kwargs)
    clock.advance(NOW)
    return clock, verifier


def signed(now: float = NOW, nonce: str | None = NONCE, body: bytes = BODY) -> str:
    return sign_request(KEY, METHOD, PATH, body, now=now, nonce=nonce)


def header_fields(header: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=([0-9a-f]+)", header))


def test_header_format() -> None:
    """The header is `SCHEME ts=<int>, nonce=<hex>, sig=<64 hex>` with a 32-hex default nonce."""
    header = sign_request(KEY, METHOD, PATH, BODY, now=NOW + 0.9)
    assert re.fullmatch(rf"{SCHEME} ts={NOW}, nonce=[0-9a-f]{{32}}, sig=[0-9a-f]{{64}}", header), (
        header
    )


def test_signature_is_hmac_of_the_documented_string() -> None:
    """sig = HMAC-SHA256(key, METHOD\\nPATH\\nts\\nnonce\\nsha256hex(body)), as DESIGN.md says."""
    import hashlib
    import hmac

    message = f"{METHOD}\n{PATH}\n{NOW}\n{NONCE}\n{hashlib.sha256(BODY).hexdigest()}"
    expected = hmac.new(KEY.encode(), message.encode(), hashlib.sha256).hexdigest()
    assert header_fields(signed())["sig"] == expected


def test_default_nonces_differ() -> None:
    """Two signatures made in the same second get different random nonces."""
    first = sign_request(KEY, METHOD, PATH, BODY, now=NOW)
    second = sign_request(KEY, METHOD, PATH, BODY, now=NOW)
    assert header_fields(first)["nonce"] != header_fields(second)["nonce"]


def test_round_trip() -> None:
    """A request signed with the shared key verifies."""
    _, verifier = make_verifier()
    verifier.verify(signed(), METHOD, PATH, BODY)
    get_header = sign_request(KEY, "GET", "/agent/rlist?x=1", b"", now=NOW)
    verifier.verify(get_header, "GET", "/agent/rlist?x=1", b"")


def test_wrong_key_refused() -> None:
    """A request signed with another key is refused as a bad signature."""
    _, verifier = make_verifier()
    header = sign_request("other", METHOD, PATH, BODY, now=NOW, nonce=NONCE)
    with pytest.raises(AuthError, match="^bad signature$"):
        verifier.verify(header, METHOD, PATH, BODY)


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", PATH, BODY),
        ("post", PATH, BODY),
        (METHOD, "/agent/rsync", BODY),
        (METHOD, PATH + "/", BODY),
        (METHOD, PATH, BODY + b"x"),
        (METHOD, PATH, b""),
    ],
)
def test_tampered_request_refused(method: str, path: str, body: bytes) -> None:
    """Changing the method, path or body after signing breaks the signature."""
    _, verifier = make_verifier()
    with pytest.raises(AuthError, match="^bad signature$"):
        verifier.verify(signed(), method, path, body)


def test_tampered_ts_refused() -> None:
    """Changing ts inside the window breaks the signature."""
    _, verifier = make_verifier()
    header = signed().replace(f"ts={NOW}", f"ts={NOW + 1}")
    with pytest.raises(AuthError, match="^bad signature$"):
        verifier.verify(header, METHOD, PATH, BODY)


def test_tampered_nonce_refused() -> None:
    """Changing the nonce (to dodge the replay cache) breaks the signature."""
    _, verifier = make_verifier()
    header = signed().replace(NONCE, NONCE[:-1] + "0")
    with pytest.raises(AuthError, match="^bad signature$"):
        verifier.verify(header, METHOD, PATH, BODY)


def test_tampered_sig_refused() -> None:
    """Flipping one hex digit of sig is refused."""
    _, verifier = make_verifier()
    header = signed()
    sig = header_fields(header)["sig"]
    bad = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    with pytest.raises(AuthError, match="^bad signature$"):
        verifier.verify(header.replace(sig, bad), METHOD, PATH, BODY)


def test_uppercase_hex_sig_accepted() -> None:
    """Hex digits of sig are case-insensitive."""
    _, verifier = make_verifier()
    header = signed()
    sig = header_fields(header)["sig"]
    verifier.verify(header.replace(sig, sig.upper()), METHOD, PATH, BODY)


@pytest.mark.parametrize("ts", [NOW - 60, NOW + FUTURE_SKEW, NOW - 1, NOW + 1, NOW])
def test_window_edges_inside(ts: int) -> None:
    """A request at most `window` seconds old, or at most FUTURE_SKEW early, is accepted."""
    _, verifier = make_verifier()
    verifier.verify(signed(now=ts), METHOD, PATH, BODY)


@pytest.mark.parametrize(
    "ts", [NOW - 61, NOW + FUTURE_SKEW + 1, NOW + 60, NOW + 61, NOW - 3600, NOW + 3600, 0]
)
def test_window_edges_outside(ts: int) -> None:
    """A request more than `window` seconds old, or more than FUTURE_SKEW early, is refused."""
    _, verifier = make_verifier()
    with pytest.raises(AuthError, match="^request time outside the allowed window$"):
        verifier.verify(signed(now=ts), METHOD, PATH, BODY)


def test_fractional_clock_edge() -> None:
    """|now - ts| is compared exactly: 60.5 s after an integer ts is outside a 60 s window."""
    clock, verifier = make_verifier()
    clock.advance(60.5)
    with pytest.raises(AuthError, match="outside the allowed window"):
        verifier.verify(signed(now=NOW), METHOD, PATH, BODY)
    clock2, verifier2 = make_verifier()
    clock2.advance(60)
    verifier2.verify(signed(now=NOW), METHOD, PATH, BODY)


def test_custom_window() -> None:
    """The window is configurable."""
    _, verifier = make_verifier(window=5)
    verifier.verify(signed(now=NOW - 5), METHOD, PATH, BODY)
    with pytest.raises(AuthError, match="outside the allowed window"):
        verifier.verify(signed(now=NOW - 6, nonce=None), METHOD, PATH, BODY)


def replay_refusal(signed_at: float, later: float) -> str:
    """Verify a request signed at `signed_at`, then the same one again `later` seconds on: the
    refusal of the second."""
    clock, verifier = make_verifier()
    header = signed(now=signed_at)
    verifier.verify(header, METHOD, PATH, BODY)
    clock.advance(later)
    with pytest.raises(AuthError) as refused:
        verifier.verify(header, METHOD, PATH, BODY)
    return str(refused.value)


def test_replay_refused() -> None:
    """The same signed request a second time inside the window is refused."""
    assert replay_refusal(NOW, 30) == "replayed request"


def test_replay_at_last_second_of_window_refused() -> None:
    """The nonce is still remembered at exactly ts + window, the last second the ts passes."""
    # from a client whose clock runs as far ahead as allowed
    assert replay_refusal(NOW + FUTURE_SKEW, 60 + FUTURE_SKEW) == "replayed request"


def test_replay_after_window_refused_by_time() -> None:
    """Once the nonce is forgotten, a replay is still refused by the ts check."""
    assert replay_refusal(NOW, 61) == "request time outside the allowed window"


def test_nonces_expire() -> None:
    """Nonces older than the window are pruned, so the cache does not grow without bound."""
    clock, verifier = make_verifier()
    for _ in range(10):
        verifier.verify(signed(nonce=None), METHOD, PATH, BODY)
        clock.advance(1)
    assert len(verifier) == 10
    clock.advance(60)
    verifier.verify(signed(now=clock.seconds(), nonce=None), METHOD, PATH, BODY)
    assert len(verifier) == 1


def test_same_nonce_reusable_after_expiry() -> None:
    """A nonce used long ago may be used again in a new, freshly signed request."""
    clock, verifier = make_verifier()
    verifier.verify(signed(), METHOD, PATH, BODY)
    clock.advance(1000)
    verifier.verify(signed(now=clock.seconds()), METHOD, PATH, BODY)


def test_bad_requests_not_remembered() -> None:
    """A nonce is remembered only after a valid signature, so forged requests cannot burn it."""
    _, verifier = make_verifier()
    forged = sign_request("wrong", METHOD, PATH, BODY, now=NOW, nonce=NONCE)
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify(forged, METHOD, PATH, BODY)
    assert len(verifier) == 0
    verifier.verify(signed(), METHOD, PATH, BODY)


def test_full_cache_refuses_new_requests() -> None:
    """With max_nonces unexpired nonces, new requests are refused until old ones expire."""
    clock, verifier = make_verifier(max_nonces=3)
    for _ in range(3):
        verifier.verify(signed(nonce=None), METHOD, PATH, BODY)
    with pytest.raises(AuthError, match="too many requests"):
        verifier.verify(signed(nonce=None), METHOD, PATH, BODY)
    clock.advance(61)
    verifier.verify(signed(now=clock.seconds(), nonce=None), METHOD, PATH, BODY)


def test_missing_header() -> None:
    """No Authorization header gives the documented message."""
    _, verifier = make_verifier()
    for header in (None, ""):
        with pytest.raises(AuthError, match="^missing Authorization header$"):
            verifier.verify(header, METHOD, PATH, BODY)


def test_wrong_scheme() -> None:
    """Another scheme (e.g. Basic) is refused; the scheme name is case-insensitive."""
    _, verifier = make_verifier()
    with pytest.raises(AuthError, match="scheme"):
        verifier.verify("Basic dXNlcjpwYXNz", METHOD, PATH, BODY)
    with pytest.raises(AuthError, match="scheme"):
        verifier.verify(signed().replace(SCHEME, "Deploy-HMAC-SHA1"), METHOD, PATH, BODY)
    verifier.verify(signed().replace(SCHEME, SCHEME.lower()), METHOD, PATH, BODY)


@pytest.mark.parametrize(
    "header",
    [
        f"{SCHEME}",
        f"{SCHEME} ",
        f"{SCHEME} garbage",
        f"{SCHEME} ts={NOW}, nonce={NONCE}",
        f"{SCHEME} ts={NOW}, sig={'a' * 64}",
        f"{SCHEME} nonce={NONCE}, sig={'a' * 64}",
        f"{SCHEME} ts={NOW}, ts={NOW}, nonce={NONCE}, sig={'a' * 64}",
        f"{SCHEME} ts={NOW}, nonce={NONCE}, sig={'a' * 64}, extra=1",
        f"{SCHEME} ts=-{NOW}, nonce={NONCE}, sig={'a' * 64}",
        f"{SCHEME} ts={NOW}.5, nonce={NONCE}, sig={'a' * 64}",
        f"{SCHEME} ts=١٧٠٠٠٠٠٠٠٠, nonce={NONCE}, sig={'a' * 64}",
        f"{SCHEME} ts={'9' * 16}, nonce={NONCE}, sig={'a' * 64}",
        f"{SCHEME} ts={NOW}, nonce={'a' * 15}, sig={'a' * 64}",
        f"{SCHEME} ts={NOW}, nonce={'a' * 65}, sig={'a' * 64}",
        f"{SCHEME} ts={NOW}, nonce={'g' * 32}, sig={'a' * 64}",
        f"{SCHEME} ts={NOW}, nonce={NONCE}, sig={'a' * 63}",
        f"{SCHEME} ts={NOW}, nonce={NONCE}, sig={'a' * 65}",
        f"{SCHEME} ts={NOW}, nonce={NONCE}, sig={'a' * 64}\n",
        f"{SCHEME} ts={NOW}; nonce={NONCE}; sig={'a' * 64}",
        f"{SCHEME} ts={NOW}, nonce={NONCE}, sig={'a' * 64}, " + " " * 600,
        f"{SCHEME} ts=" + "1" * 5000,
        "x" * 100_000,
    ],
)
def test_malformed_header(header: str) -> None:
    """Malformed, oversized or incomplete headers raise AuthError and nothing else."""
    _, verifier = make_verifier()
    with pytest.raises(AuthError):
        verifier.verify(header, METHOD, PATH, BODY)


def test_header_length_bound() -> None:
    """A header longer than 512 characters is refused before parsing, even if well formed."""
    _, verifier = make_verifier()
    short = signed(nonce="a" * 64).replace(SCHEME + " ", SCHEME + " " * 200)
    assert len(short) <= 512
    verifier.verify(short, METHOD, PATH, BODY)
    long = signed(nonce="b" * 64).replace(SCHEME + " ", SCHEME + " " * 400)
    assert len(long) > 512
    with pytest.raises(AuthError, match="^malformed Authorization header$"):
        verifier.verify(long, METHOD, PATH, BODY)


@given(st.text(max_size=700))
def test_arbitrary_text_only_raises_auth_error(header: str) -> None:
    """Whatever text arrives as the header, verify raises AuthError and nothing else."""
    _, verifier = make_verifier()
    with pytest.raises(AuthError):
        verifier.verify(header, METHOD, PATH, BODY)


@given(
    st.text(alphabet="0123456789abcdefABCDEFg-=, \t.ts=noncesig", max_size=200),
)
def test_arbitrary_header_params_only_raise_auth_error(params: str) -> None:
    """Text after a correct scheme never raises anything but AuthError."""
    _, verifier = make_verifier()
    with pytest.raises(AuthError):
        verifier.verify(f"{SCHEME} {params}", METHOD, PATH, BODY)


@given(st.text(max_size=50), st.text(max_size=50), st.binary(max_size=50))
def test_arbitrary_request_round_trip(method: str, path: str, body: bytes) -> None:
    """Any method/path/body (even lone surrogates in the path) signs and verifies."""
    _, verifier = make_verifier()
    header = sign_request(KEY, method, path, body, now=NOW)
    verifier.verify(header, method, path, body)


def test_sign_rejects_bad_nonce_and_empty_key() -> None:
    """sign_request refuses a nonce verify would refuse, and an empty key."""
    with pytest.raises(ValueError):
        sign_request(KEY, METHOD, PATH, BODY, now=NOW, nonce="xyz")
    with pytest.raises(ValueError):
        sign_request("", METHOD, PATH, BODY, now=NOW)
    with pytest.raises(ValueError):
        HmacVerifier("", clock=Clock())


# --- the original's one-time auth_key -------------------------------------------------------


def test_legacy_captured_key_accepted() -> None:
    """The auth_key captured from the original client decodes to its time and is accepted."""
    check_legacy_auth_key(DEFAULT_KEY_CIPHER, CAPTURED_AUTH_KEY, now=CAPTURED_TIME)
    check_legacy_auth_key(DEFAULT_KEY_CIPHER, CAPTURED_AUTH_KEY, now=CAPTURED_TIME + 59.9)
    check_legacy_auth_key(DEFAULT_KEY_CIPHER, CAPTURED_AUTH_KEY, now=CAPTURED_TIME - 59.9)


def test_legacy_captured_key_is_what_we_generate() -> None:
    """legacy_auth_key reproduces the captured bytes exactly."""
    assert legacy_auth_key(DEFAULT_KEY_CIPHER, CAPTURED_TIME) == CAPTURED_AUTH_KEY
    assert legacy_auth_key(DEFAULT_KEY_CIPHER, CAPTURED_TIME + 0.7) == CAPTURED_AUTH_KEY


@pytest.mark.parametrize("offset", [61, -61, 60, -60, 10_000])
def test_legacy_captured_key_expires(offset: int) -> None:
    """The captured key is refused 60 s or more away from its time (|now - t| < 60 to pass)."""
    with pytest.raises(AuthError, match="^auth_key time outside the allowed window$"):
        check_legacy_auth_key(DEFAULT_KEY_CIPHER, CAPTURED_AUTH_KEY, now=CAPTURED_TIME + offset)


def test_legacy_wrong_cipher_refused() -> None:
    """A key made with another key_cipher (the captured bad-auth-key case) is refused."""
    with pytest.raises(AuthError, match="^bad auth_key$"):
        check_legacy_auth_key("other", CAPTURED_AUTH_KEY, now=CAPTURED_TIME)
    captured_bad = "bc04403ce0ac8a22f6bbbd92a28f7c432440744860"
    with pytest.raises(AuthError, match="^bad auth_key$"):
        check_legacy_auth_key(DEFAULT_KEY_CIPHER, captured_bad, now=CAPTURED_TIME)


@pytest.mark.parametrize(
    "auth_key",
    [
        "",
        "3c9b5f1cd6a030bcb7bed9eac80589fb",
        "3c9b5f1cd6a030bcb7bed9eac80589f",
        "3c9b5f1cd6a030bcb7bed9eac80589fb884074486x",
        "3c9b5f1cd6a030bcb7bed9eac80589fb-840744860",
        "3c9b5f1cd6a030bcb7bed9eac80589fb 840744860",
        "3c9b5f1cd6a030bcb7bed9eac80589fb٨٨٤٠٧٤٤٨٦٠",
        "3C9B5F1CD6A030BCB7BED9EAC80589FB8840744860",
        "3c9b5f1cd6a030bcb7bed9eac80589fb" + "1" * 21,
        "é" * 42,
    ],
)
def test_legacy_malformed_refused(auth_key: str) -> None:
    """Short, long, non-digit or non-ASCII auth_keys are refused with AuthError."""
    with pytest.raises(AuthError, match="^bad auth_key$"):
        check_legacy_auth_key(DEFAULT_KEY_CIPHER, auth_key, now=CAPTURED_TIME)


@given(st.integers(min_value=0, max_value=10**12), st.text(min_size=1, max_size=20))
def test_legacy_round_trip(t: int, key: str) -> None:
    """Any key made by legacy_auth_key at time t is accepted at t and refused at t + 60."""
    auth_key = legacy_auth_key(key, t)
    check_legacy_auth_key(key, auth_key, now=t)
    with pytest.raises(AuthError):
        check_legacy_auth_key(key, auth_key, now=t + 60)


@given(st.text(max_size=80))
def test_legacy_arbitrary_text_only_raises_auth_error(auth_key: str) -> None:
    """Whatever arrives as auth_key, the check raises AuthError and nothing else."""
    with pytest.raises(AuthError):
        check_legacy_auth_key(DEFAULT_KEY_CIPHER, auth_key, now=CAPTURED_TIME + 3600)


# --------------------------------------------------------------------------- the request check


def make_authenticator(
    *, legacy: bool = False, legacy_refusal: str | None = None
) -> RequestAuthenticator:
    clock = Clock()
    clock.advance(NOW)
    return RequestAuthenticator(KEY, clock=clock, legacy=legacy, legacy_refusal=legacy_refusal)


def test_authenticator_accepts_a_signed_request_path_and_query() -> None:
    """A signed request passes; the signature covers the path with its query string."""
    authenticator = make_authenticator()
    header = sign_request(KEY, "GET", "/agent/rlist?options=web", b"", now=NOW, nonce=NONCE)
    request = Request("GET", "/agent/rlist", "options=web", {"authorization": header})
    authenticator.authenticate(request, {"options": "web"})
    with pytest.raises(AuthError, match="^replayed request$"):
        authenticator.authenticate(request, {"options": "web"})


def test_authenticator_takes_an_auth_key_only_when_legacy_is_on() -> None:
    """auth_key: accepted with legacy on; else the refusal text given, or as if absent."""
    request = Request(METHOD, PATH, body=BODY)
    fields = {"auth_key": legacy_auth_key(KEY, NOW)}
    make_authenticator(legacy=True).authenticate(request, fields)
    with pytest.raises(AuthError, match="^legacy refused$"):
        make_authenticator(legacy_refusal="legacy refused").authenticate(request, fields)
    with pytest.raises(AuthError, match="^missing Authorization header$"):
        make_authenticator().authenticate(request, fields)
    with pytest.raises(AuthError, match="^missing Authorization header$"):
        make_authenticator(legacy=True).authenticate(request, {})
