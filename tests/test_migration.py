"""Replacing the old system box by box, both ways. Old clients and old proxies (their captured
requests, with a fresh one-time auth_key) against our agent with `legacy_auth = true` and our
proxy; our proxy in front of a fleet that still has an old agent; and our deploy-client with
`--legacy-auth` against old agents and proxies (a scripted server replaying the captured answers
byte for byte). Answers are compared with the captures: status line, Content-Type, JSON keys and
value types (new keys beside the old ones are allowed)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from deploy import auth
from tests.conftest import JOBS, Daemons
from tests.harness import (
    DATA,
    PROXY_REFUSALS,
    AgentProcess,
    ProxyProcess,
    ScriptedServer,
    free_port,
    legacy_request,
    make_tree,
    parse_response,
    raw_request,
    run_client,
    shared_free_port,
    wait_until,
)

WIRE = DATA / "wire"
KEY1 = "peerkey000000000000000000000000001"  # the captures' API keys
KEY2 = "peerkey000000000000000000000000002"
NEW_AGENT = "127.0.0.2"  # the captures' agent address (proxy-exec-unknown-command names it)
OLD_AGENT = "127.0.0.3"  # a scripted old agent, beside the new one


# --------------------------------------------------------------------------- comparing


def captured(name: str) -> bytes:
    return (WIRE / f"{name}.response").read_bytes()


def shape(value: Any) -> Any:
    """Keys and value types of a JSON value, as the old clients see them."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def assert_shape_like(ours: Any, theirs: Any, where: str = "") -> None:
    """Every key the original sent is there with a value of the same type (lists: items of
    the same type); keys we add beside them are allowed."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{where}: {ours!r} is not an object"
        for key, value in theirs.items():
            assert key in ours, f"{where}: key {key!r} missing from {sorted(ours)}"
            assert_shape_like(ours[key], value, f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list), f"{where}: {ours!r} is not a list"
        if theirs and ours:
            assert_shape_like(ours[0], theirs[0], f"{where}[0]")
    else:
        assert type(ours) is type(theirs), f"{where}: {ours!r} is not like {theirs!r}"


def assert_like_original(raw: bytes, name: str, *, body: bool = True) -> Any:
    """Status line and Content-Type as captured; JSON bodies (the proxy's text/plain ones too)
    of the same shape, other text the same text (the body unchecked with `body=False`).
    Returns the parsed JSON, or the text."""
    want = captured(name)
    assert raw.split(b"\r\n")[0] == want.split(b"\r\n")[0], (name, raw[:300])
    _, headers, got = parse_response(raw)
    _, want_headers, want_body = parse_response(want)
    assert headers["content-type"] == want_headers["content-type"], name
    # JSON, or the proxy's per-host JSON sent as text/plain (laid out differently)
    if want_body.lstrip().startswith(b"{"):
        ours = json.loads(got)
        if body:
            assert_shape_like(ours, json.loads(want_body), name)
        return ours
    if body and name == "agent-error-unknown-group":
        # issue 15: the group is named first; the original's words stay as the suffix
        assert got.endswith(b": " + want_body) and got.startswith(b"unknown group "), got
    elif body:
        assert got == want_body, (name, got)
    return got.decode()


def request_fields(name: str) -> dict[str, str]:
    raw = (WIRE / f"{name}.request").read_bytes()
    return dict(parse_qsl(raw.partition(b"\r\n\r\n")[2].decode(), keep_blank_values=True))


def assert_fresh_legacy_key(fields: dict[str, str], key: str = "65535") -> None:
    """The old one-time auth_key an old agent/proxy checks: md5(key) + the reversed
    digit-xor of a time inside its 60 s window."""
    auth.check_legacy_auth_key(key, fields["auth_key"], now=time.time(), window=60)


# --------------------------------------------------------------------------- our side of the fleet


@dataclass
class NewFleet:
    workdir: Path
    targets: Path
    agent: AgentProcess
    proxy: ProxyProcess
    old_agent: ScriptedServer
    dead_port: int

    def to_agent(self, raw: bytes) -> bytes:
        return raw_request(self.agent.host, self.agent.port, raw, timeout=60)

    def to_proxy(self, raw: bytes) -> bytes:
        return raw_request(self.proxy.host, self.proxy.port, raw, timeout=60)


@pytest.fixture(scope="module")
def fleet(module_daemons: Daemons):
    """Our agent (legacy_auth = true) on 127.0.0.2 with the captures' groups; a scripted old
    agent on 127.0.0.3; our proxy (legacy auth in front and towards the agents) reaching both."""
    daemons = module_daemons
    workdir = daemons.workdir
    old_agent = None
    try:
        tree = make_tree(workdir / "tree", files=20, size=1000)
        rsyncd = daemons.rsyncd({"DEST": tree})
        targets = workdir / "targets"
        targets.mkdir()
        jobs = workdir / "jobs.ini"
        jobs.write_text(JOBS)
        base = ["--archive", "--delete", "--force"]
        groups = {
            "web": rsyncd.group(targets / "web", *base),
            # 1 KiB/s: the 20 kB sync runs long enough to be seen running and killed
            "webslow": rsyncd.group(targets / "webslow", *base, "--bwlimit=1"),
            "badpath": {"dest": rsyncd.url("DEST"), "src": "/srv/peer-notallowed/web"},
        }
        port = shared_free_port([NEW_AGENT, OLD_AGENT])
        agent = daemons.agent(
            NEW_AGENT,
            port,
            groups=groups,
            jobs=jobs,
            state=workdir / "state",
            allow_paths=[targets],
            server={"legacy_auth": "true", "rkill_grace": 2},
        )
        old_agent = ScriptedServer(OLD_AGENT, port, captured("proxy-to-agent-forwarded"))
        api = workdir / "api.ini"
        api.write_text(
            "[keys]\n"
            f"{KEY1}[] = fan1,fan10,relay1\n"
            f"{KEY2}[] = fan1\n"
            "[servers]\n"
            f"fan1[] = {NEW_AGENT}\n"
            f"fan10[] = {NEW_AGENT}\nfan10[] = {OLD_AGENT}\n"
            f"relay1[] = {NEW_AGENT}\nrelay1[] = {OLD_AGENT}\n"
        )
        pport = free_port()
        proxy = daemons.proxy(
            "[server]\naddr = 127.0.0.1\n"
            f"port = {pport}\nkey_cipher = 65535\nlegacy_auth = true\n"
            f"[client]\nport = {port}\nlegacy_auth = true\nthread_timeout = 10\n"
            "[allow::hosts]\nhost[] = 127.0.0.0/8\n"
            f"[api]\npath = {api}\n",
            "127.0.0.1",
            pport,
        )
        yield NewFleet(workdir, targets, agent, proxy, old_agent, free_port())
    finally:
        if old_agent is not None:
            old_agent.close()


# --------------------------------------------------------------------------- old client → new agent

# Cases that need nothing but the config; the inline target points at a port where nothing
# listens, as the capture's did (its rsync daemon was elsewhere), so the answer is the same
# "rsync failed" shape.
STATELESS_AGENT_CASES = [
    "agent-error-group-path-not-allowed",
    "agent-error-inline-path-not-allowed",
    "agent-error-unknown-group",
    "agent-error-unknown-exec",
    "agent-exec-ok",
    "agent-exec-nonzero-exit",
    "agent-exec-plus-sign",
    "agent-status-inline-target",
    "agent-rkill-not-running",
]


@pytest.mark.parametrize("name", STATELESS_AGENT_CASES)
def test_old_client_request_gets_the_original_answer_from_our_agent(fleet, name):
    """An old client's captured request (fresh auth_key) gets the original's status line,
    Content-Type and JSON keys/types, or the same error text, from our agent."""
    replace = {
        "127.0.0.1::DEST/": f"rsync://127.0.0.1:{fleet.dead_port}/DEST/",
        "/srv/peer/targets": str(fleet.targets),
    }
    answer = assert_like_original(fleet.to_agent(legacy_request(name, replace)), name)
    if name == "agent-exec-ok":
        want = json.loads(parse_response(captured(name))[2])
        assert {k: answer[k] for k in want} == want  # same command line, same output
    if name == "agent-exec-plus-sign":
        assert answer["content"] == "MSAxCg=="  # `1+1` reached echo as `1 1`
    if name == "agent-status-inline-target":
        assert answer["return"] == "false"


def test_old_auth_key_signed_with_another_key_gets_401(fleet):
    """agent-error-bad-auth-key: an auth_key made with another key_cipher is refused, 401."""
    raw = fleet.to_agent(legacy_request("agent-error-bad-auth-key", key="not-the-key"))
    # the original sent no text with it; we say why, which old clients ignore
    assert_like_original(raw, "agent-error-bad-auth-key", body=False)


def test_old_client_drives_a_whole_sync_on_our_agent(fleet):
    """The captured status → rlist → rsync → status-in-sync → rlist-with-deletes, then a slow
    sync seen running by rsync and status and stopped by rkill: every answer has the original's
    shape, and the values an old client acts on are right."""
    web = fleet.targets / "web"
    if web.exists():
        shutil.rmtree(web)

    def send(name: str, replace: dict[str, str] | None = None) -> Any:
        return assert_like_original(fleet.to_agent(legacy_request(name, replace)), name)

    status = send("agent-status-empty-target")
    assert status["alreadyRsync"] == "false" and status["transferFilesCount"] == "20"
    rlist = send("agent-rlist-empty-target-10k")
    assert rlist["transferNewFiles"][0] == f"created directory {web}"
    assert len(rlist["transferNewFiles"]) == 21 and rlist["transferDeleteFiles"] == []
    started = send("agent-rsync-start")
    assert len(started["checksum"]) == 32

    def in_sync() -> Any:
        raw = fleet.to_agent(legacy_request("agent-status-in-sync"))
        answer = json.loads(parse_response(raw)[2])
        return answer if answer.get("lastRsync") else None

    wait_until(in_sync, 30, 0.2, "the web sync to end")
    assert send("agent-status-in-sync")["transferFilesCount"] == "0"
    (web / "extra").mkdir()
    for i in (1, 2, 3):
        (web / "extra" / f"junk{i}.txt").write_text("junk\n")
    (web / "d00" / "f00000.dat").write_bytes(b"changed")
    rlist = send("agent-rlist-with-deletes")
    assert set(rlist["transferDeleteFiles"]) >= {f"extra/junk{i}.txt" for i in (1, 2, 3)}
    assert "d00/f00000.dat" in rlist["transferNewFiles"]

    slow = {"options=web&": "options=webslow&"}
    send("agent-rsync-start", slow)
    running = send("agent-rsync-while-running")  # the capture's own request names webslow
    assert running["alreadyRsync"] == "true" and running["process"]
    assert send("agent-status-while-running")["alreadyRsync"] == "true"
    killed = send("agent-rkill-running")
    assert killed["process"] and all(p.isdigit() for p in killed["process"])
    assert send("agent-rkill-not-running")["process"] == []


# --------------------------------------------------------------------------- old client → new proxy


@pytest.mark.parametrize("name", [*PROXY_REFUSALS, "proxy-exec-unknown-command"])
def test_old_client_request_gets_the_original_answer_from_our_proxy(fleet, name):
    """Captured client → proxy requests (fresh auth_key, checked: legacy_auth = true) get the
    original's status line, Content-Type and text, or per-host JSON of the same shape."""
    answer = assert_like_original(fleet.to_proxy(legacy_request(name)), name)
    if name == "proxy-exec-unknown-command":
        want = json.loads(parse_response(captured(name))[2])
        # Ours beside the captured keys (issue 13): the agent's own round trip.
        assert answer["127.0.0.2"]["exec"].pop("seconds") >= 0
        assert answer == want  # same host, same agent error, through the proxy


def test_our_proxy_checks_the_old_auth_key(fleet):
    """The original proxy never checked auth_key; ours, with key_cipher and legacy_auth set,
    answers a key made with another cipher 401 and orders no agent."""
    before = len(fleet.old_agent.requests)
    raw = fleet.to_proxy(legacy_request("proxy-exec-group", key="not-the-key"))
    assert raw.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert len(fleet.old_agent.requests) == before


def test_our_proxy_drives_a_mixed_fleet_of_new_and_old_agents(fleet):
    """proxy-exec-group to a group holding our agent and an old one: both entries have the
    captured per-host shape, and the old agent got what the old proxy sent (captured
    proxy-to-agent-forwarded: same fields in the same order, api_key emptied) with a valid
    one-time auth_key."""
    before = len(fleet.old_agent.requests)
    raw = fleet.to_proxy(legacy_request("proxy-exec-group"))
    answer = assert_like_original(raw, "proxy-exec-group", body=False)  # other host names
    (want,) = json.loads(parse_response(captured("proxy-exec-group"))[2]).values()
    assert sorted(answer) == [NEW_AGENT, OLD_AGENT]
    for host in (NEW_AGENT, OLD_AGENT):
        assert_shape_like(answer[host], want, host)
        content = answer[host]["exec"]["content"]
        assert {k: content[k] for k in want["exec"]["content"]} == want["exec"]["content"]
    assert len(fleet.old_agent.requests) == before + 1
    start, headers, fields = fleet.old_agent.last()
    assert start == "POST /agent/exec HTTP/1.1"
    assert "authorization" not in headers  # an old agent reads auth_key only
    assert list(fields) == list(request_fields("proxy-to-agent-forwarded"))
    assert fields["api_key"] == "" and fields["args"] == "groups:relay1"
    assert fields["options"] == "service:echo,hello"
    assert_fresh_legacy_key(fields)


# --------------------------------------------------------------------------- new client → old agent


@pytest.fixture(scope="module")
def old_server():
    server = ScriptedServer("127.0.0.1")
    try:
        yield server
    finally:
        server.close()


# (captured exchange, exit code our client must give)
OLD_AGENT_ANSWERS = [
    ("agent-status-empty-target", 0),
    ("agent-status-in-sync", 0),
    ("agent-status-inline-target", 2),
    ("agent-status-while-running", 0),
    ("agent-rlist-empty-target-10k", 0),
    ("agent-rlist-with-deletes", 0),
    ("agent-rsync-start", 0),
    ("agent-rsync-while-running", 0),
    ("agent-rkill-running", 0),
    ("agent-rkill-not-running", 0),
    ("agent-exec-ok", 0),
    ("agent-exec-nonzero-exit", 2),
    ("agent-exec-plus-sign", 0),
    ("agent-error-bad-auth-key", 2),
    ("agent-error-group-path-not-allowed", 2),
    ("agent-error-inline-path-not-allowed", 2),
    ("agent-error-unknown-group", 2),
    ("agent-error-unknown-exec", 2),
]


def client_args(name: str) -> list[str]:
    """The deploy-client options that make the captured request `name`."""
    raw = (WIRE / f"{name}.request").read_bytes()
    order = raw.split(b" ")[1].decode().rsplit("/", 1)[1]
    fields = request_fields(name)
    args = [f"--order={order}", f"--options={fields['options']}"]
    if fields.get("args"):
        args.append(f"--args={fields['args']}")
    if fields.get("api_key"):
        args.append(f"--api-key={fields['api_key']}")
    return args


def expected_entry(name: str) -> dict[str, Any]:
    """What the original client printed for the captured answer `name`."""
    status, headers, body = parse_response(captured(name))
    reason = captured(name).split(b"\r\n")[0].decode().split(" ", 2)[2]
    text = body.decode()
    content: Any = json.loads(text) if text.lstrip().startswith("{") else text
    return {
        "return": 1 if status == 200 else 0,
        "serverStatus": 1,
        "returnCode": str(status),
        "returnString": reason,
        "content": content,
    }


@pytest.mark.parametrize(("name", "rc"), OLD_AGENT_ANSWERS)
def test_our_client_with_legacy_auth_reads_an_old_agent(old_server, name, rc):
    """Our deploy-client --legacy-auth sends an old agent the original's request (fields and
    a valid one-time auth_key, no signature), parses its captured answer, prints the original
    JSON and exits with the code the answer means."""
    old_server.reply = captured(name)
    before = len(old_server.requests)
    host = f"{old_server.host}:{old_server.port}"
    r = run_client("--legacy-auth", f"--hosts={host}", *client_args(name), timeout=60)
    assert len(old_server.requests) == before + 1
    start, headers, fields = old_server.last()
    assert start == (WIRE / f"{name}.request").read_bytes().split(b"\r\n")[0].decode()
    assert "authorization" not in headers
    want_fields = request_fields(name)
    assert list(fields)[: len(want_fields)] == list(want_fields)
    assert {k: fields[k] for k in ("options", "args", "api_key")} == {
        k: want_fields[k] for k in ("options", "args", "api_key")
    }
    assert_fresh_legacy_key(fields)
    order = start.split(" ")[1].rsplit("/", 1)[1]
    assert r.json == {host: {order: expected_entry(name)}}, r.stderr
    assert r.rc == rc, (r.rc, r.stdout, r.stderr)


def test_our_client_gives_up_on_an_old_agent_that_never_answers(old_server):
    """agent-bug-rkill-unknown-group-no-answer: the old agent crashed inside and never
    answered; our client reports a timeout for that host within --thread-timeout, exit 3."""
    old_server.reply = None
    host = f"{old_server.host}:{old_server.port}"
    started = time.monotonic()
    r = run_client(
        "--legacy-auth",
        f"--hosts={host}",
        "--thread-timeout=1",
        *client_args("agent-bug-rkill-unknown-group-no-answer"),
        timeout=60,
    )
    assert time.monotonic() - started < 15
    entry = r.json[host]["rkill"]
    assert entry["serverStatus"] == 0 and entry["content"] == "Process Timeout(1)!"
    assert r.rc == 3


# --------------------------------------------------------------------------- new client → old proxy


@pytest.mark.parametrize(
    ("name", "rc"),
    [
        ("proxy-exec-group", 0),
        ("proxy-exec-unknown-command", 2),
        ("proxy-error-unknown-api-key", 2),
        ("proxy-error-group-not-granted", 2),
        ("proxy-error-host-not-granted", 2),
        ("proxy-error-args-syntax", 2),
    ],
)
def test_our_client_with_legacy_auth_reads_an_old_proxy(old_server, name, rc):
    """Through an old proxy: our client sends the API key, args and a valid auth_key as the
    original did; the proxy's per-agent JSON (sent as text/plain) becomes the content of the
    proxy's entry, as the original client printed it; an agent's error inside makes exit 2."""
    old_server.reply = captured(name)
    host = f"{old_server.host}:{old_server.port}"
    r = run_client("--legacy-auth", f"--hosts={host}", *client_args(name), timeout=60)
    start, headers, fields = old_server.last()
    assert start == "POST /agent/exec HTTP/1.1"
    want_fields = request_fields(name)
    assert {k: fields[k] for k in ("options", "args", "api_key")} == {
        k: want_fields[k] for k in ("options", "args", "api_key")
    }
    assert_fresh_legacy_key(fields)
    assert r.json == {host: {"exec": expected_entry(name)}}, r.stderr
    assert r.rc == rc, (r.rc, r.stdout, r.stderr)
