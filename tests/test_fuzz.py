"""Fuzz targets (hypothesis; `HYPOTHESIS_PROFILE=fuzz` runs 10,000 examples each, tox env
`fuzz`): the request parser behind the real agent and proxy protocols, fed arbitrary bytes in
arbitrary chunks on a `StringTransport` and a `Clock`; the config loaders on arbitrary text; the
rsync output parser on arbitrary itemize/stats/progress lines; the target, exec and grant
parsers. Every target asserts only documented outcomes: a 4xx (or a real answer), a clean close
by socket_timeout, no failure logged, no timer left behind; or the module's own error class."""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ProcessDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from deploy import auth
from deploy.access import PathNotAllowed, is_within
from deploy.agent import AgentFactory, AgentService
from deploy.commands import MAX_ARG_LENGTH, CommandError, build_command, unsafe_character
from deploy.config import (
    ConfigError,
    load_agent_config,
    load_jobs,
    load_proxy_config,
)
from deploy.errors import BadHostSelection, InvalidTarget, NotGranted, status_for
from deploy.jobstate import error_message
from deploy.message import ORDERS
from deploy.proxy import ProxyFactory, ProxyService
from deploy.rsync import OTHER_LINES_KEPT, RsyncOutputParser, build_argv
from deploy.targets import names_a_remote_host

SOCKET_TIMEOUT = 2.0
NOW = 1_700_000_000
PROXY_THREAD_TIMEOUT = 3.0
KEY = "fuzzkey"
API_KEY = "apikey0000000000000000000000000001"
PEER = IPv4Address("TCP", "127.0.0.1", 40000)
# What a request may get: the parser's and the handlers' documented answers. 500 is not one.
ERRORS = {400, 401, 403, 404, 405, 408, 411, 413, 431}
ANSWERS = ERRORS | {200, 503}

JOBS = """\
[service]
service:echo = /bin/echo %s
service:greet = /bin/echo 'hello world' --name %s
service:date = /bin/date +%%s
app:true = /bin/true
"""


# --------------------------------------------------------------------------- fixtures


class FakeProcessTransport:
    """What a spawned child looks like to its protocol; it never really runs."""

    pid = None

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, signal: Any) -> None:
        pass


class InstantProcessReactor(MemoryReactorClock):
    """A clock whose children end with exit 0 on the next tick, having written nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[list[str]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], **kw: Any) -> Any:
        transport = FakeProcessTransport()
        proto.makeConnection(transport)
        self.spawned.append(list(args))
        self.callLater(0, proto.processEnded, Failure(ProcessDone(0)))
        return transport


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    """Config files for one agent and one proxy, in a directory kept for the whole module."""
    with tempfile.TemporaryDirectory(prefix="deploy-fuzz-") as tmp:
        root = Path(tmp)
        targets = root / "targets"
        (targets / "web").mkdir(parents=True)
        (root / "outside").mkdir()
        (targets / "escape").symlink_to(root / "outside")
        (root / "state").mkdir()
        jobs = root / "jobs.ini"
        jobs.write_text(JOBS)
        agent_ini = root / "agent.ini"
        agent_ini.write_text(
            f"[server]\nstate_path = {root / 'state'}\nsocket_timeout = {SOCKET_TIMEOUT:g}\n"
            f"key_cipher = {KEY}\nlegacy_auth = true\nmax_prefork = 4\n"
            "[allow::hosts]\nhost[] = 127.0.0.0/8\n"
            f"[allow::paths]\npath[] = {targets}\n"
            f"[rsync::group::web]\ndest = 127.0.0.1::DEST/\nsrc = {targets}/web\n"
            f"[rsync::group::badpath]\ndest = 127.0.0.1::DEST/\nsrc = {root}/outside/web\n"
            f"[jobs]\npath = {jobs}\n"
        )
        api = root / "api.ini"
        api.write_text(
            f"[keys]\n{API_KEY}[] = web,db\n"
            "[servers]\nweb[] = 127.0.0.2\nweb[] = 127.0.0.3\ndb[] = 127.0.0.4\n"
            "other[] = 127.0.0.5\n"
        )
        proxy_ini = root / "proxy.ini"
        proxy_ini.write_text(
            f"[server]\nsocket_timeout = {SOCKET_TIMEOUT:g}\n"
            f"[client]\nport = 3440\nthread_timeout = {PROXY_THREAD_TIMEOUT:g}\n"
            "socket_timeout = 1\n"
            "[allow::hosts]\nhost[] = 127.0.0.0/8\n"
            f"[api]\npath = {api}\n"
        )
        yield {
            "root": root,
            "targets": targets,
            "agent": load_agent_config(str(agent_ini)),
            "proxy": load_proxy_config(str(proxy_ini)),
        }


def agent_service(world: dict[str, Any]) -> tuple[AgentService, InstantProcessReactor]:
    """A fresh agent (fresh nonce cache and clock) on the module's config."""
    reactor = InstantProcessReactor()
    reactor.advance(NOW)
    return AgentService(world["agent"], reactor), reactor


class LoggedFailures:
    """Collects every log event that carries a failure or is logged as an error."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if "log_failure" in event or getattr(level, "name", "") in ("error", "critical"):
            self.events.append(event)

    def __enter__(self) -> LoggedFailures:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


# --------------------------------------------------------------------------- request bytes


TOKENS = st.sampled_from(
    [b"POST ", b"GET ", b"PUT ", b"/agent/", b"/api/", b"status", b"exec", b"rkill", b"rlist"]
    + [b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"Content-Length: "]
    + [b"Content-Length: 0\r\n", b"Content-Length: -1", b"Content-Length: 99999999999999"]
    + [b"Transfer-Encoding: chunked\r\n", b"Authorization: Deploy-HMAC-SHA256 ts=1, nonce="]
    + [b"X: y\r\n", b":", b" ", b"\t", b"\x00", b"\xff", b"\xc3", b"%", b"%ff", b"%0a", b"+"]
    + [b"options=", b"web", b",", b"&", b"=", b"args=", b"api_key=", b"auth_key=", b"?"]
    + [b"0", b"9", b"12", b"a" * 300, b"\xb2", b"..", b"/"]
)

GRANTS = st.sampled_from(
    ["groups:web", "groups:web,db", "hosts:127.0.0.2", "hosts:127.0.0.5", "groups:other"]
    + ["groups:", "hosts:", "groups:web,,db", "groups:nosuch", "users:x", "hosts:127.0.0.2,db"]
)
FIELD_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "web",
            "badpath",
            "service:echo,hi",
            "service:echo,-n",
            "service:echo,a\nb",
            "service:greet,$(id)",
            "app:true",
            ".*,x",
            "h::M/,/nonexistent",
            "--rsh=sh,/tmp",
            "groups:web",
            "groups:web,db",
            "hosts:127.0.0.2",
            "hosts:127.0.0.5",
            "groups:other",
            API_KEY,
            "1",
            "50%",
        ]
    ),
)


@st.composite
def form_requests(draw: st.DrawFn, root: str = "agent") -> tuple[bytes, bool]:
    """A well-framed request with fuzzed fields, signed (so it reaches the order handlers) or
    not; answers (bytes, signed). Mostly to `root`'s real orders, sometimes elsewhere."""
    method = draw(st.sampled_from(["POST", "POST", "GET"]))
    order = draw(st.sampled_from([*ORDERS, *ORDERS, "nosuch", ""]))
    path = f"/{root}/{order}"
    if draw(st.integers(0, 9)) == 0:
        path = draw(st.sampled_from(["/", "/x/status", "/agent", "/api/exec/a/b/c/d"]))
        path += draw(st.sampled_from(["", "/..%2f", "/%2e%2e", "//"]))
    if root == "api" and draw(st.integers(0, 3)) == 0:
        # the proxy's path form: /api/<order>/<options>/<args>/<api_key>
        segments = draw(st.lists(FIELD_TEXT, max_size=3))
        path += "".join(
            "/" + quote_from_bytes(s.encode("utf-8", "surrogatepass")) for s in segments
        )
    fields = [("options", draw(FIELD_TEXT))]
    if root == "api" and draw(st.integers(0, 4)) > 0:
        fields.append(("args", draw(st.one_of(GRANTS, GRANTS, FIELD_TEXT))))
        fields.append(("api_key", draw(st.sampled_from([API_KEY, API_KEY, "", "nokey"]))))
        for name in ("batch", "max_fail"):
            if draw(st.booleans()):
                fields.append((name, draw(st.sampled_from(["1", "50%", "0", "-1", "x", "101%"]))))
    names = ["args", "api_key", "batch", "max_fail", "auth_key", "x", "options"]
    fields += draw(st.lists(st.tuples(st.sampled_from(names), FIELD_TEXT), max_size=2))
    body = b"&".join(
        quote_from_bytes(k.encode()).encode()
        + b"="
        + quote_from_bytes(v.encode("utf-8", "surrogatepass")).encode()
        for k, v in fields
    )
    if draw(st.integers(0, 4)) == 0:
        body += draw(st.binary(max_size=12))
    target = path if method == "POST" else f"{path}?{body.decode('latin-1')}"
    if not all(0x21 <= b < 0x7F for b in target.encode("latin-1")):
        target = path
    payload = body if method == "POST" else b""
    head = [f"{method} {target} HTTP/1.1", "Connection: close"]
    if method == "POST":
        head.append(f"Content-Length: {len(payload)}")
    signed = draw(st.integers(0, 3)) > 0
    if signed:
        head.append(
            "Authorization: " + auth.sign_request(KEY, method, target, payload, now=NOW + 1)
        )
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload, signed


def request_bytes(root: str) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, HTTP-ish fragments, fuzzed requests, and requests cut or corrupted."""
    requests = form_requests(root).map(lambda pair: pair[0])
    return st.one_of(
        st.binary(max_size=600),
        st.lists(TOKENS, max_size=40).map(b"".join),
        requests,
        requests,
        st.tuples(requests, st.integers(min_value=0, max_value=600), st.binary(max_size=8)).map(
            lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
        ),
    )


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def pass_time(reactor: Clock, seconds: float, step: float = 0.25) -> None:
    """Advance in small steps: a `Clock` jumps, so a timer set while it advances would start
    from the end of one big step."""
    for _ in range(round(seconds / step)):
        reactor.advance(step)


def check_exchange(
    proto: Any,
    reactor: MemoryReactorClock,
    chunks: list[bytes],
    pauses: list[float],
    hang_up: bool,
    settle: float,
) -> None:
    """Feed `chunks`, pausing between them, and check the one documented outcome: whatever the
    pace, a request not complete by socket_timeout is closed then; the answer is whole."""
    transport = StringTransport(peerAddress=PEER)
    opened = reactor.seconds()
    with LoggedFailures() as failures:
        proto.makeConnection(transport)
        for i, chunk in enumerate(chunks):
            proto.dataReceived(chunk)
            reactor.advance(0)
            pause = pauses[i % len(pauses)] if pauses else 0.0
            pass_time(reactor, pause)
            if reactor.seconds() - opened >= SOCKET_TIMEOUT and proto.request is None:
                assert transport.disconnecting, "an incomplete request outlived socket_timeout"
        if hang_up:
            proto.connectionLost(Failure(ConnectionError("client went away")))
        pass_time(reactor, SOCKET_TIMEOUT + settle)
        if not hang_up:
            assert transport.disconnecting, "connection left open"
            proto.connectionLost(Failure(ConnectionError("closed")))
        gc.collect(1)  # an unhandled error in a Deferred is logged when it is collected
    assert not failures.events, failures.events[0]
    assert not reactor.getDelayedCalls(), "a timer outlived the connection"
    written = transport.value()
    if hang_up and not written:
        return
    assert written, "closed without an answer"
    head, sep, body = written.partition(b"\r\n\r\n")
    assert sep, written[:200]
    lines = head.decode("ascii").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body), "one answer, whole, nothing after it"
    assert status in ANSWERS, (status, body)
    if headers["Content-Type"].startswith("application/json"):
        json.loads(body)


CUTS = st.lists(st.integers(min_value=0, max_value=700), max_size=12)
PAUSES = st.lists(st.sampled_from([0.0, 0.0, 0.25, 0.75, 1.0, 1.5]), max_size=6)


SLOW_LORIS = b"POST /agent/status HTTP/1.1\r\nContent-Length: 11\r\n\r\noptions=web"


@given(data=request_bytes("agent"), cuts=CUTS, pauses=PAUSES, hang_up=st.booleans())
@example(data=SLOW_LORIS, cuts=list(range(12)), pauses=[1.0], hang_up=False)
def test_fuzz_agent_protocol_answers_4xx_or_closes(
    world: dict[str, Any], data: bytes, cuts: list[int], pauses: list[float], hang_up: bool
) -> None:
    """Any bytes, chunks, pace to the agent: one documented answer or a close by socket_timeout."""
    # Never a 500, nothing logged as a failure, no unhandled Deferred error, no timer left.
    service, reactor = agent_service(world)
    proto = AgentFactory(service).buildProtocol(PEER)
    check_exchange(proto, reactor, chunked(data, cuts), pauses, hang_up, settle=1.0)


@given(data=request_bytes("api"), cuts=CUTS, pauses=PAUSES, hang_up=st.booleans())
@example(
    data=SLOW_LORIS.replace(b"/agent/", b"/api/"), cuts=list(range(12)), pauses=[1.0], hang_up=False
)
def test_fuzz_proxy_protocol_answers_4xx_or_closes(
    world: dict[str, Any], data: bytes, cuts: list[int], pauses: list[float], hang_up: bool
) -> None:
    """The same for the proxy; granted orders are answered per host after thread_timeout."""
    # Agents never connect here: one thread_timeout per batch, at most three batches.
    reactor = MemoryReactorClock()
    reactor.advance(NOW)
    service = ProxyService(world["proxy"], reactor)
    proto = ProxyFactory(service).buildProtocol(PEER)
    check_exchange(
        proto, reactor, chunked(data, cuts), pauses, hang_up, settle=3 * PROXY_THREAD_TIMEOUT + 1
    )


# --------------------------------------------------------------------------- config loaders


SECTIONS = st.sampled_from(
    ["[server]", "[client]", "[allow::hosts]", "[allow::paths]", "[rsync::group::g]"]
    + ["[rsync::group::]", "[rsync::group::h]", "[jobs]", "[api]", "[keys]", "[servers]"]
    + ["[service]", "[", "[]", "[a::b::c]", "[server"]
)
CONFIG_KEYS = st.sampled_from(
    ["port", "addr", "backlog", "socket_timeout", "max_prefork", "max_process_timeout"]
    + ["key_cipher", "legacy_auth", "auth_window", "ssl", "ssl_private_key", "state_path"]
    + ["rkill_grace", "log_error_level", "user", "thread_timeout", "max_parallel", "ssl_ca"]
    + ["host", "path", "dest", "src", "option", "exclude", "include", "rsync", "rsh"]
    + ["queue_path", "max_delete", "allow_empty_source", "service:echo", "web", "apikey"]
)
CONFIG_VALUES = st.one_of(
    st.sampled_from(
        ["0", "1", "-1", "65536", "99999999999", "1e9", "nan", "inf", "0.5", "true", "off"]
        + ["x", "/tmp", "relative/dir", "127.0.0.1", "10.0.0.0/33", "::1", "fe80::1%eth0", ""]
        + ['"quoted"', "a,b", "/bin/echo %s", "/bin/echo 'unclosed", "-a", "h::M/", "debug"]
    ),
    st.text(max_size=20),
)
CONFIG_LINES = st.one_of(
    SECTIONS,
    st.builds(
        lambda k, sep, v: f"{k}{sep}{v}",
        CONFIG_KEYS,
        st.sampled_from([" = ", "[] = ", "=", " : ", "[]=", " "]),
        CONFIG_VALUES,
    ),
    st.sampled_from(["; comment", "# comment", "", "   ", "\ufeff[server]", "path = other.ini"]),
    st.text(max_size=40),
)
CONFIG_TEXT = st.lists(CONFIG_LINES, max_size=14).map("\n".join)


def no_dns(name: str) -> list[str]:
    """Fuzzed host names are never looked up: tests stay on loopback."""
    return []


@given(main=CONFIG_TEXT, other=CONFIG_TEXT, raw=st.binary(max_size=40))
@example(main="[allow::paths]\npath[] = relative/dir", other="", raw=b"")
def test_fuzz_config_loaders_give_a_config_or_a_located_error(
    main: str, other: str, raw: bytes
) -> None:
    """Any config text: a config the daemon can start with, or one ConfigError line."""
    # Starting means AgentService/ProxyService build, groups resolve, jobs build (or their
    # documented errors); a traceback at start-up is a failure.
    from unittest import mock

    from deploy import access
    from deploy.tls import TLSConfigError

    with tempfile.TemporaryDirectory() as directory:
        main_path = os.path.join(directory, "main.ini")
        with open(main_path, "w", encoding="utf-8", errors="surrogatepass") as handle:
            handle.write(main)
        other_path = os.path.join(directory, "other.ini")
        with open(other_path, "wb") as handle:
            handle.write(other.encode("utf-8", "surrogatepass") + raw)
        loaded = []
        for load in (load_agent_config, load_proxy_config, load_jobs):
            for path in (main_path, other_path):
                try:
                    loaded.append(load(path))
                except ConfigError as error:
                    text = str(error)
                    assert text and "\n" not in text, text
                    assert error.path is not None
        with mock.patch.object(access, "_resolve_name", no_dns):
            for config in loaded:
                if isinstance(config, dict):  # a jobs file
                    for options in config:
                        try:
                            build_command(config, options)
                        except CommandError:
                            pass
                elif hasattr(config, "groups"):
                    service = AgentService(config, Clock())
                    for name in config.groups:
                        try:
                            target, _ = service.targets.resolve(name)
                            build_argv(target, dry_run=True)
                        except (InvalidTarget, PathNotAllowed) as error:
                            assert status_for(error) in (400, 403)
                        except ValueError:
                            pass  # a group dest starting with "-": build_argv's 400
                else:
                    try:
                        ProxyService(config, Clock())
                    except TLSConfigError:
                        pass  # said in one line at start by deploy-proxy


# --------------------------------------------------------------------------- rsync output


ITEM_CODE = st.builds(
    lambda y, x, attrs: y + x + attrs,
    st.sampled_from(["<", ">", "c", "h", ".", "*", "X"]),
    st.sampled_from(["f", "d", "L", "D", "S", "?"]),
    st.text(alphabet="+.?cstpoguaxnST -", min_size=0, max_size=11),
)
NAMES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["a b", "x -> y", "x => y", "\\#377", "\\#12", "\\#", "dir/"]),
)
NUMBERS = st.one_of(
    st.integers(min_value=0, max_value=10**30).map(str),
    st.integers(min_value=0, max_value=10**15).map(lambda n: f"{n:,}"),
    st.sampled_from(["", ",", "1,,2", "-1", "1.5", "١٢", "9" * 400]),
)
STATS_NAMES = st.sampled_from(
    ["Number of files", "Number of created files", "Number of deleted files"]
    + ["Number of regular files transferred", "Number of files transferred", "Total file size"]
    + ["Total transferred file size", "Literal data", "Matched data", "Total bytes sent"]
    + ["Total bytes received", "File list size", "sent 1 bytes  received", "total size is"]
)
RSYNC_LINES = st.one_of(
    st.builds(lambda c, n: f"{c} {n}", ITEM_CODE, NAMES),
    st.builds(lambda n: f"*deleting   {n}", NAMES),
    st.builds(lambda n: f"created directory {n}", NAMES),
    st.builds(
        lambda name, number, tail: f"{name}: {number}{tail}",
        STATS_NAMES,
        NUMBERS,
        st.sampled_from(["", " bytes", " (reg: 1, dir: 2)", "x"]),
    ),
    st.builds(
        lambda lead, b, p, rate, eta, tail: f"{lead}{b} {p}% {rate} {eta}{tail}",
        st.sampled_from(["", " ", "     "]),
        NUMBERS,
        st.one_of(st.integers(min_value=0, max_value=1000).map(str), st.just("x")),
        st.sampled_from(["1.00kB/s", "0.00kB/s", "", "∞"]),
        st.sampled_from(["0:00:01", "", "99:99:99"]),
        st.sampled_from(["", " (xfr#1, to-chk=1/2)", " (xfr#1, ir-chk=1000/1001)"]),
    ),
    st.text(max_size=40),
)


@given(
    lines=st.lists(RSYNC_LINES, max_size=30),
    separators=st.lists(st.sampled_from(["\n", "\r", "\r\n", "\n\n"]), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    max_line=st.sampled_from([8, 64, 65536]),
    keep_lists=st.booleans(),
)
def test_fuzz_rsync_output_parser_never_raises(
    lines: list[str], separators: list[str], cuts: list[int], max_line: int, keep_lists: bool
) -> None:
    """rsync-shaped lines in any chunks parse without raising, as one feed, in bounded memory."""
    text = "".join(line + separators[i % len(separators)] for i, line in enumerate(lines))
    data = text.encode("utf-8", "surrogateescape")
    progressed = []
    whole = RsyncOutputParser(max_line=max_line, keep_lists=keep_lists)
    whole.feed(data)
    whole.close()
    parser = RsyncOutputParser(
        max_line=max_line, keep_lists=keep_lists, on_progress=progressed.append
    )
    for chunk in chunked(data, cuts):
        parser.feed(chunk)
        assert len(parser._partial) <= max_line
    parser.close()
    assert parser.new_files == whole.new_files and parser.deleted_files == whole.deleted_files
    assert parser.stats == whole.stats and parser.progress == whole.progress
    assert len(parser.new_files) + len(parser.deleted_files) <= len(lines)
    assert len(parser.other_lines) <= OTHER_LINES_KEPT
    assert all(len(line) <= max_line for line in parser.other_lines)
    for progress in progressed:
        assert progress.bytes >= 0 and progress.percent >= 0
    if not keep_lists:
        assert not parser.new_files and not parser.deleted_files
    assert len(error_message(text)) <= 2000


# --------------------------------------------------------------------------- targets, exec, grants


SEGMENTS = st.sampled_from(
    ["web", "..", ".", "", "escape", "outside", "new", "\uff0e\uff0e", "\u2024\u2024", "\uff0f"]
    + ["x\x00", "a\nb", "%2e%2e", "-rf", "web/.", "$(id)", "~", "\u202e", "\udcff"]
)
INLINE_DEST = st.one_of(
    st.sampled_from(["h::M/", "rsync://h/M/", "h:/x", "/local/", "-e sh", "--rsh=sh", "h::M/;x"]),
    st.text(max_size=20),
)


@given(
    dest=INLINE_DEST,
    parts=st.lists(SEGMENTS, max_size=6),
    lead=st.sampled_from(["{targets}/", "{targets}//", "//", "/", "", "{root}/"]),
    raw=st.text(max_size=40),
    use_raw=st.booleans(),
)
def test_fuzz_resolve_target_stays_in_the_jail(
    world: dict[str, Any], dest: str, parts: list[str], lead: str, raw: str, use_raw: bool
) -> None:
    """Any options: a jailed target with a safe remote source behind `--`, or 400/403."""
    # Safe: not an option, no control character, no shell metacharacter (a `host:path` source
    # reaches a remote shell), and naming a host (a local one would copy the agent's files).
    service, _ = agent_service(world)
    src = lead.format(targets=world["targets"], root=world["root"]) + "/".join(parts)
    options = raw if use_raw else f"{dest},{src}"
    try:
        target, group = service.targets.resolve(options)
    except (InvalidTarget, PathNotAllowed) as error:
        assert status_for(error) in (400, 403), status_for(error)
        return
    root = os.path.realpath(world["targets"])
    assert is_within(service.targets.allowed_paths.check(target.src), root)
    if group is None:
        assert not target.dest.startswith("-")
        assert not any(ord(c) < 32 or ord(c) == 127 for c in target.dest)
        assert not set(";&|`$<>()") & set(target.dest), "a remote shell would run this"
        assert names_a_remote_host(target.dest), "a request may not name a local source"
    argv = build_argv(target, dry_run=True)
    assert argv[-3:] == ["--", target.dest, target.src]


EXEC_JOBS = {
    "service:echo": "/bin/echo %s",
    "service:greet": "/bin/echo 'hello world' --name %s",
    "service:date": "/bin/date +%%s",
    "app:true": "/bin/true",
    "a.b": "/bin/echo dot",
}
EXEC_NAMES = st.one_of(
    st.sampled_from([*EXEC_JOBS, ".*", "service:.*", "a.", "a?b", "SERVICE:ECHO", " app:true"]),
    st.text(max_size=12),
)
EXEC_ARGS = st.one_of(
    st.sampled_from(["hi", "-n", "--help", "a b", "a\nb", "$(id)", "`id`", ";", "%s", "%%", ""]),
    st.sampled_from(["a\x85b", "\x9b31m", "x\u202ey", "\u2066", "a\u2028b", "\u2029"]),
    st.text(max_size=12),
    st.sampled_from(["a" * MAX_ARG_LENGTH, "a" * (MAX_ARG_LENGTH + 1)]),
)


@given(name=EXEC_NAMES, args=st.lists(EXEC_ARGS, max_size=34))
def test_fuzz_build_command_runs_only_known_names_with_safe_arguments(
    name: str, args: list[str]
) -> None:
    """Any exec options: that exact job's argv with safe whole arguments, or CommandError."""
    options = ",".join([name, *args])
    try:
        found, argv = build_command(EXEC_JOBS, options)
    except CommandError as error:
        assert str(error).startswith("exec[")
        return
    assert found == options.split(",")[0] and found in EXEC_JOBS
    assert argv[0] == EXEC_JOBS[found].split()[0]
    given_args = [a for a in options.split(",")[1:] if a]
    for arg in given_args:
        assert not arg.startswith("-")
        assert unsafe_character(arg) is None, "C0/C1 controls, bidi overrides, U+2028/9"
        assert any(arg in item for item in argv[1:]), (arg, argv)


GRANT_ARGS = st.one_of(
    GRANTS,
    st.builds(
        lambda kind, names: f"{kind}:{','.join(names)}",
        st.sampled_from(["hosts", "groups", "HOSTS", ""]),
        st.lists(
            st.sampled_from(["web", "db", "other", "127.0.0.2", "127.0.0.5", " web", "", "*"]),
            max_size=4,
        ),
    ),
    st.text(max_size=30),
)


@given(
    api_key=st.sampled_from([API_KEY, "", "nokey", API_KEY.upper(), API_KEY + " "]),
    args=GRANT_ARGS,
)
def test_fuzz_granted_hosts_never_exceed_the_keys_groups(
    world: dict[str, Any], api_key: str, args: str
) -> None:
    """Any api_key and args: hosts all in the key's groups, or a 403."""
    service = ProxyService(world["proxy"], Clock())
    try:
        hosts = service.granted_hosts(api_key, args)
    except (BadHostSelection, NotGranted) as error:
        assert status_for(error) == 403
        return
    config = world["proxy"]
    reachable = {h for g in config.keys[api_key] for h in config.servers.get(g, ())}
    assert hosts and set(hosts) <= reachable
    assert len(hosts) == len(set(hosts))
