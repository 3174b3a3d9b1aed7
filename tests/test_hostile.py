"""Hostile input against a real `twistd -n deploy-agent` (and a real rsync daemon): path escapes
and look-alikes, option and shell injection, header and Content-Length abuse, bodies that are
not UTF-8, stale, future and misdirected signatures. Each gets its 4xx and nothing runs: the
commands that would run write marker files, and no marker may appear. Cases already proven
elsewhere (plain `..`, symlinks, `-` and `%0a` in exec arguments, regex exec names, replays,
header counts...) are listed in docs/robustness.md with the test that proves them."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote

import pytest
from twisted.internet.task import Clock

from deploy import auth
from deploy.wire import MAX_LINE
from tests.conftest import JOBS, Daemons
from tests.harness import (
    AgentProcess,
    RsyncDaemon,
    jail,
    make_tree,
    parse_response,
    parsed_answer,
    raw_request,
    wait_until,
)

KEY = "65535"
SOCKET_TIMEOUT = 2
TOUCH = shutil.which("touch") or "/usr/bin/touch"


@dataclass
class Env:
    work: Path
    tree: Path
    targets: Path
    outside: Path
    markers: Path
    rsyncd: RsyncDaemon
    agent: AgentProcess

    def send(self, data: bytes) -> tuple[int, Any]:
        """Raw bytes to the agent: (status, JSON answer or text)."""
        return parsed_answer(raw_request(self.agent.host, self.agent.port, data))

    def order(self, order: str, options: str, **kw: Any) -> tuple[int, Any]:
        """One signed order whose options are form-encoded as deploy-client encodes them."""
        body = b"options=" + quote(options, safe="").encode() + b"&args=&api_key="
        return self.send(signed("/agent/" + order, body, **kw))

    def marker(self, name: str) -> Path:
        return self.markers / name


def signed(
    path: str,
    body: bytes,
    *,
    key: str = KEY,
    now: float | None = None,
    sign_path: str | None = None,
    headers: tuple[str, ...] = (),
) -> bytes:
    """A POST signed with `key` at `now` (for `sign_path`, when it differs from `path`)."""
    stamp = time.time() if now is None else now
    header = auth.sign_request(key, "POST", sign_path or path, body, now=stamp)
    lines = [f"POST {path} HTTP/1.1", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [*headers, f"Authorization: {header}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture(scope="module")
def env(module_daemons: Daemons) -> Env:
    daemons = module_daemons
    work = daemons.workdir
    tree = make_tree(work / "tree", files=6, size=100)
    targets, outside = jail(work)
    markers = work / "markers"
    markers.mkdir()
    jobs = work / "jobs.ini"
    jobs.write_text(
        JOBS
        + f"service:touch           =   {TOUCH} %s\n"
        # A template that runs a shell, in the safe form (`sh -c 'echo %s'` is refused at load).
        + "service:shell           =   /bin/sh -c 'echo \"$1\"' sh %s\n"
    )
    rsyncd = daemons.rsyncd({"DEST": tree})
    agent = daemons.agent(
        groups={"web": rsyncd.group(targets / "web", "--archive")},
        jobs=jobs,
        state=work / "state",
        allow_paths=[targets],
        server={"socket_timeout": SOCKET_TIMEOUT},
    )
    return Env(work, tree, targets, outside, markers, rsyncd, agent)


@pytest.fixture(autouse=True)
def nothing_ran_and_agent_lives(env: Env) -> Iterator[None]:
    """After every test: no marker was written, nothing landed outside the jail, and the agent
    still runs."""
    yield
    assert not list(env.markers.iterdir()), "a command the request tried to inject ran"
    assert not list(env.outside.iterdir()), "something was written outside allow::paths"
    assert env.agent.proc.poll() is None, f"the agent died:\n{env.agent.log_text()}"


def inline(env: Env, src: str) -> str:
    """An inline target: the test rsync daemon's module (on its own port), then `src`."""
    return f"rsync://{env.rsyncd.host}:{env.rsyncd.port}/DEST/,{src}"


def last_rsync(env: Env, options: str) -> dict[str, Any]:
    """Poll status of `options` until its sync has ended; its lastRsync record."""

    def ended() -> dict[str, Any] | None:
        status, body = env.order("status", options)
        assert status == 200, body
        return body.get("lastRsync") if body.get("alreadyRsync") != "true" else None

    return wait_until(ended, 30, 0.1, f"the sync of {options} to end")


# --------------------------------------------------------------------------- path escapes


ESCAPES = [
    "{targets}//..//outside/web",
    "//{outside_rel}/web",
    "{targets}/link/.",
    "{targets}/link//web",
    "{targets}/web/../../outside/.",
    "{targets}/../.",
    "{outside}/.",
    "{targets}/./link/./web",
    "{targets}/web/",  # control: inside, allowed
]


@pytest.mark.parametrize("template", ESCAPES)
def test_double_slash_and_trailing_dot_escapes_are_403(env: Env, template: str) -> None:
    """`//`, `/.`, `/./` around `..` or a symlink: 403 for every order (control served)."""
    src = template.format(
        targets=env.targets, outside=env.outside, outside_rel=str(env.outside).lstrip("/")
    )
    for order in ("rsync", "status", "rlist"):
        status, body = env.order(order, inline(env, src))
        if template == "{targets}/web/":
            assert status == 200, body
            continue
        assert (status, body) == (403, f"{src} is not allowed!"), order


def test_percent_encoded_dots_decode_before_the_jail(env: Env) -> None:
    """`%2e%2e` and `%2f` decode before the jail judges the path: 403 naming it."""
    for encoded, decoded in (
        (f"{env.targets}/%2e%2e/outside/web", f"{env.targets}/../outside/web"),
        (f"{env.targets}%2flink%2fweb", f"{env.targets}/link/web"),
    ):
        body = f"options={inline(env, encoded)}&args=".encode()
        status, text = env.send(signed("/agent/rsync", body))
        assert (status, text) == (403, f"{decoded} is not allowed!")


LOOKALIKES = [
    "\uff0e\uff0e\uff0foutside\uff0fweb",  # fullwidth full stops and solidus: one file name
    "\u2024\u2024/outside/web",  # ONE DOT LEADER twice: a directory named so, not ".."
    "%2e%2e/outside/web",  # sent double-encoded (%252e): a literal "%2e%2e" directory
]


@pytest.mark.parametrize("name", LOOKALIKES)
def test_unicode_and_encoded_lookalikes_stay_plain_names_inside_the_jail(
    env: Env, name: str
) -> None:
    """Look-alikes of `..` and `/` are plain names: a real sync lands inside the jail."""
    # Nothing outside it: checked by the autouse fixture.
    src = f"{env.targets}/{name}"
    landed = env.targets / name
    landed.parent.mkdir(parents=True, exist_ok=True)  # rsync makes only the last directory
    status, body = env.order("rsync", inline(env, src))
    assert status == 200 and body["return"] == "true", body
    last = last_rsync(env, inline(env, src))
    assert last["outcome"] == "ok", last
    assert sorted(p.name for p in landed.iterdir()) == sorted(p.name for p in env.tree.iterdir())


# --------------------------------------------------------------------------- option injection


def injections(marker: Path) -> list[str]:
    return [
        f"-e touch {marker}",
        f"--rsh=touch {marker}",
        f"h::DEST/\n--rsh=touch {marker}",
        "h::DEST/\x00",
        f"127.0.0.1:/x;touch {marker}",
        f"127.0.0.1:/x$(touch {marker})",
        f"127.0.0.1:/x`touch {marker}`",
        f"127.0.0.1:/x|touch {marker}",
        f"127.0.0.1:/x&touch {marker}",
        f"127.0.0.1:/x>{marker}",
    ]


def test_remote_source_injection_is_400_and_nothing_runs(env: Env) -> None:
    """A remote source that is an option or holds control/shell characters: 400, no marker."""
    for source in injections(env.marker("remote-source")):
        for order in ("rsync", "status", "rlist", "rkill"):
            status, body = env.order(order, f"{source},{env.targets}/inject")
            assert (status, body) == (400, f"bad remote source {source!r}"), (order, source)
    assert not (env.targets / "inject").exists()


def test_local_source_in_a_request_is_400_and_nothing_is_copied(env: Env) -> None:
    """An inline source must name a host: a local one is 400 and nothing is copied."""
    # Else a request could copy what the agent can read (/etc) into an allowed directory;
    # only a config group may name a local source.
    secret = env.work / "secret"
    secret.mkdir(exist_ok=True)
    (secret / "key").write_text("do not copy\n")
    for source in (f"{secret}/", "/etc/passwd", "./", "dir/with:colon", ":/etc/"):
        for order in ("rsync", "status", "rlist"):
            status, body = env.order(order, f"{source},{env.targets}/copy")
            assert status == 400 and body.startswith(f"bad remote source {source!r}"), body
    assert not (env.targets / "copy").exists()


@pytest.mark.parametrize("src", ["--delete", "-rf /", "relative/web", "web,--rsh=sh"])
def test_local_path_that_is_an_option_or_relative_is_403(env: Env, src: str) -> None:
    """A local path that is not absolute (an option, relative) is outside every root: 403."""
    status, body = env.order("rsync", f"h::DEST/,{src}")
    assert (status, body) == (403, f"{src} is not allowed!")


SHELL_ARGUMENTS = ["x;touch {m}", "$(touch {m})", "`touch {m}`", "x|touch {m}", "x&&touch {m}"]


@pytest.mark.parametrize("template", SHELL_ARGUMENTS)
def test_exec_shell_metacharacters_are_400_and_nothing_runs(env: Env, template: str) -> None:
    """Shell syntax in an exec argument is refused (400) even through a `sh -c` template; what
    it names never runs."""
    marker = env.marker("exec-shell")
    arg = template.format(m=marker)
    for job in ("service:echo", "service:shell"):
        status, body = env.order("exec", f"{job},{arg}")
        assert status == 400, body
        assert "shell syntax" in body
    assert not marker.exists()


@pytest.mark.parametrize("arg", ["\x00", "a\x1bb", "a\rtouch", "\x7f", "-", "--version", "-n"])
def test_exec_control_and_option_arguments_are_400_and_nothing_runs(env: Env, arg: str) -> None:
    """A control character or leading `-` in any exec argument: 400 before anything runs."""
    marker = env.marker("exec-arg")
    status, body = env.order("exec", f"service:touch,{marker},{arg}")
    assert status == 400
    assert "control character" in body or "may not start with '-'" in body


@pytest.mark.parametrize(
    "name", ["service:echo$", "^service:echo", "service:e[c]ho", "service:echo|.*", "(.*)"]
)
def test_exec_names_with_regex_characters_are_unknown(env: Env, name: str) -> None:
    """An exec name is looked up as a key: regex syntax in it names no command (400)."""
    status, body = env.order("exec", f"{name},{env.marker('regex')}")
    assert (status, body) == (400, f"exec[{name}] not found!")


# --------------------------------------------------------------------------- headers, lengths


def test_one_header_line_over_the_limit_is_431(env: Env) -> None:
    """One header line over MAX_LINE is 431, whether or not its newline arrived."""
    long_value = b"a" * (MAX_LINE + 10)
    for tail in (b"\r\n\r\n", b""):
        data = b"POST /agent/status HTTP/1.1\r\nX-Bomb: " + long_value + tail
        assert env.send(data)[0] == 431


@pytest.mark.parametrize(
    "value", ["+5", "0x10", "1e3", "5 5", "\uff15", "-0", "5,5", "", "18446744073709551621"]
)
def test_odd_content_length_is_400(env: Env, value: str) -> None:
    """A Content-Length that is not plain decimal digits (or too long) is 400."""
    data = f"POST /agent/status HTTP/1.1\r\nContent-Length: {value}\r\n\r\nxxxxx".encode()
    status, _ = env.send(data)
    assert status == 400, (value, status)


def test_conflicting_content_lengths_are_400(env: Env) -> None:
    """Two disagreeing Content-Length headers are 400 (RFC 9112 6.3); the same twice is fine."""
    body = b"options=web"
    twice = signed("/agent/rkill", body, headers=("Content-Length: 5",))
    status, text = env.send(twice)
    assert status == 400 and "Content-Length" in text
    same = signed("/agent/rkill", body, headers=(f"Content-Length: {len(body)}",))
    assert env.send(same)[0] == 200


def test_body_shorter_than_its_content_length_is_408_at_socket_timeout(env: Env) -> None:
    """A client that announces 100 bytes, sends 10 and waits gets 408 at socket_timeout."""
    started = time.monotonic()
    with socket.create_connection((env.agent.host, env.agent.port), timeout=15) as s:
        s.sendall(b"POST /agent/status HTTP/1.1\r\nContent-Length: 100\r\n\r\noptions=we")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    elapsed = time.monotonic() - started
    assert parse_response(raw)[0] == 408
    assert SOCKET_TIMEOUT - 0.2 <= elapsed < SOCKET_TIMEOUT + 2


# --------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "encoded",
    [
        b"%c0%ae%c0%ae%c0%af",  # overlong UTF-8 for "../": lax decoders make it a path
        b"%ed%a0%80",  # a UTF-16 surrogate encoded in UTF-8
        b"caf\xe9",  # latin-1, raw
        b"%ff%fe",
        b"\xc3",  # a cut multi-byte character
    ],
)
def test_bodies_that_are_not_utf8_are_400(env: Env, encoded: bytes) -> None:
    """Fields that are not UTF-8 (overlong dots, surrogates, latin-1, cut) are 400 first."""
    body = b"options=service:touch," + encoded + b"&args="
    assert env.send(signed("/agent/exec", body)) == (400, "request fields must be UTF-8")
    body = b"options=h::DEST/," + str(env.targets).encode() + b"/" + encoded
    assert env.send(signed("/agent/rsync", body)) == (400, "request fields must be UTF-8")


def test_raw_non_ascii_in_the_request_target_is_400(env: Env) -> None:
    """A raw byte above 0x7e in the path or query (not %-encoded) is 400."""
    assert env.send(b"GET /agent/status?options=\xff HTTP/1.1\r\n\r\n")[0] == 400
    assert env.send(b"GET /agent/st\xc3\xa4tus HTTP/1.1\r\n\r\n")[0] == 400


# --------------------------------------------------------------------------- signatures


def test_expired_future_misdirected_and_wrong_key_signatures_are_401(env: Env) -> None:
    """Old, future, other-path, other-body, wrong-key signatures: 401; the exec never runs."""
    marker = env.marker("signature")
    body = b"options=service:touch," + quote(str(marker)).encode() + b"&args="
    now = time.time()
    cases = {
        "expired": signed("/agent/exec", body, now=now - 120),
        "future": signed("/agent/exec", body, now=now + 120),
        "other path": signed("/agent/exec", body, sign_path="/agent/rkill"),
        "wrong key": signed("/agent/exec", body, key="not-the-key"),
        "other body": signed("/agent/exec", body)[: -len(body)] + body.replace(b"touch", b"echo!"),
    }
    for what, data in cases.items():
        status, text = env.send(data)
        assert status == 401, (what, status, text)
    assert env.order("exec", "service:echo,still-serving")[0] == 200


def test_signature_and_legacy_key_are_compared_in_constant_time() -> None:
    """Signature and legacy key are compared with hmac.compare_digest, never `==`."""
    clock = Clock()
    clock.advance(1_700_000_000)
    verifier = auth.HmacVerifier(KEY, clock=clock)
    header = auth.sign_request("wrong", "POST", "/agent/exec", b"x", now=clock.seconds())
    real = auth.hmac.compare_digest
    with mock.patch.object(auth.hmac, "compare_digest", side_effect=real) as spy:
        with pytest.raises(auth.AuthError, match="bad signature"):
            verifier.verify(header, "POST", "/agent/exec", b"x")
        assert spy.call_count == 1
        expected, given = spy.call_args.args
        assert given == header.rsplit("sig=", 1)[1] and expected != given
        spy.reset_mock()
        legacy = auth.legacy_auth_key("wrong", clock.seconds())
        with pytest.raises(auth.AuthError):
            auth.check_legacy_auth_key(KEY, legacy, now=clock.seconds())
        assert spy.call_count == 1
        assert spy.call_args.args[0] == hashlib.md5(KEY.encode()).hexdigest()


# --------------------------------------------------------------------------- a remote shell


FAKE_SSH = """#!/bin/sh
# Stands in for ssh to the release host: logs the call, then hands the joined arguments to a
# shell, as sshd does on the far side.
shift
echo called >> {log}
exec /bin/sh -c "$*"
"""


def test_shell_metacharacters_would_reach_a_remote_shell_so_they_are_refused(
    daemons: Daemons, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shell syntax in a `host:path` source is refused before it can reach a remote shell."""
    # rsync < 3.2.4 (or RSYNC_OLD_ARGS=1) hands the path to the remote shell unescaped, where
    # `;touch M` would run. The fake ssh is never called for those; a plain `host:path` source
    # still reaches it, so the refusal (not the set-up) keeps the marker away.
    marker = tmp_path / "remote-marker"
    calls = tmp_path / "ssh-calls"
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(FAKE_SSH.format(log=calls))
    fake_ssh.chmod(0o755)
    release = make_tree(tmp_path / "release", files=2, size=10)
    targets = tmp_path / "targets"
    targets.mkdir()
    monkeypatch.setenv("RSYNC_RSH", str(fake_ssh))
    monkeypatch.setenv("RSYNC_OLD_ARGS", "1")
    agent = daemons.agent(
        state=tmp_path / "state",
        allow_paths=[targets],
        server={"allow_inline_remote_shell": "true"},  # HOST:path sources are off by default
    )
    env = Env(tmp_path, release, targets, tmp_path, tmp_path, None, agent)  # type: ignore[arg-type]
    for source in (
        f"127.0.0.1:{release}/;touch {marker}",
        f"127.0.0.1:{release}/$(touch {marker})",
        f"127.0.0.1:{release}/`touch {marker}`",
    ):
        status, body = env.order("status", f"{source},{targets}/web")
        assert (status, body) == (400, f"bad remote source {source!r}")
    assert not calls.exists() and not marker.exists()
    status, body = env.order("status", f"127.0.0.1:{release}/,{targets}/web")
    assert status == 200 and body["return"] == "true", body
    assert calls.read_text() == "called\n"
    assert not marker.exists()
