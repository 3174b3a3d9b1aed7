"""deploy-proxy end to end: real `twistd deploy-proxy` in front of real agents on 127.0.0.2-6, an
address with nothing listening, a socket that never answers and a scripted agent that records what
the proxy sends; the original client's requests replayed; API grants, auth, fan-out and rolling.
Plus the proxy's options and sample configs, without processes."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from deploy import auth
from deploy.config import ClientSettings, ServerSettings, load_proxy_config
from deploy.proxy_tap import Options
from deploy.wire import encode_form
from tests.conftest import JOBS, Daemons
from tests.harness import (
    DATA,
    PROXY_REFUSALS,
    ProxyProcess,
    ScriptedServer,
    captured_response,
    free_port,
    legacy_request,
    parse_response,
    raw_request,
    run_client,
    shared_free_port,
    wait_until,
)

REPO = Path(__file__).parent.parent
KEY1 = "peerkey000000000000000000000000001"  # the captures' keys
KEY2 = "peerkey000000000000000000000000002"
AGENTS = [f"127.0.0.{i}" for i in range(2, 7)]
DEAD = "127.0.0.7"  # nothing listens there
SILENT = "127.0.0.8"  # accepts, reads, never answers
RECORDER = "127.0.0.9"  # answers like the captured agent and keeps what it got
THREAD_TIMEOUT = 2

API = f"""\
; the captures' keys and group names, on our loopback fleet
[keys]
{KEY1}[] = fan1,fan10,relay1,recorder,WebFront,withdead,roll,rollrec
{KEY2}[] = fan1

[servers]
fan1[] = 127.0.0.2
{"".join(f"fan10[] = {h}{chr(10)}" for h in AGENTS)}
relay1[] = 127.0.0.2
recorder[] = {RECORDER}
WebFront[] = 127.0.0.3
webfront[] = 127.0.0.4
withdead[] = 127.0.0.2
withdead[] = {DEAD}
withdead[] = {SILENT}
withdead[] = 127.0.0.4
roll[] = 127.0.0.2
roll[] = 127.0.0.3
roll[] = {DEAD}
roll[] = {SILENT}
roll[] = 127.0.0.4
roll[] = 127.0.0.5
rollrec[] = 127.0.0.2
rollrec[] = {DEAD}
rollrec[] = 127.0.0.3
rollrec[] = {RECORDER}
"""


def proxy_ini(port: int, api: Path, client_port: int, server: str = "", client: str = "") -> str:
    return f"""\
[server]
addr = 127.0.0.1
port = {port}
socket_timeout = 5
{server}
[client]
port = {client_port}
thread_timeout = {THREAD_TIMEOUT}
socket_timeout = 2
{client}
[allow::hosts]
host[] = 127.0.0.0/8

[api]
path = {api}
"""


def form_request(path: str, fields: dict[str, str]) -> bytes:
    """A POST as the original client writes it: no Content-Type, the fields as a form."""
    body = encode_form(fields)
    head = f"POST {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@dataclass
class Fleet:
    daemons: Daemons
    workdir: Path
    port: int  # every agent's port
    api: Path
    proxy: ProxyProcess
    recorder: ScriptedServer
    silent: ScriptedServer

    def request(self, raw: bytes, proxy: ProxyProcess | None = None) -> tuple[int, dict, bytes]:
        p = proxy or self.proxy
        return parse_response(raw_request(p.host, p.port, raw, timeout=30))

    def post(self, path: str, fields: dict[str, str], proxy: ProxyProcess | None = None):
        return self.request(form_request(path, fields), proxy)

    def client(self, *args: str, proxy: ProxyProcess | None = None):
        p = proxy or self.proxy
        return run_client(f"--hosts={p.address}", *args, timeout=60)


@pytest.fixture(scope="module")
def fleet(module_daemons: Daemons):
    daemons = module_daemons
    workdir = daemons.workdir
    port = shared_free_port([*AGENTS, DEAD, SILENT, RECORDER])
    jobs = workdir / "jobs.ini"
    jobs.write_text(JOBS)
    (workdir / "targets").mkdir()
    scripted: list[ScriptedServer] = []
    try:
        agents = [
            daemons.agent(host, port, jobs=jobs, state=workdir / f"state-{host}", wait=False)
            for host in AGENTS
        ]
        forwarded = (DATA / "wire" / "proxy-to-agent-forwarded.response").read_bytes()
        recorder = ScriptedServer(RECORDER, port, forwarded)
        silent = ScriptedServer(SILENT, port, None)
        scripted += [recorder, silent]
        api = workdir / "api.ini"
        api.write_text(API)
        pport = free_port()
        proxy = daemons.proxy(proxy_ini(pport, api, port), "127.0.0.1", pport)
        for agent in agents:
            agent.wait_listening(agent.host, port)
        yield Fleet(daemons, workdir, port, api, proxy, recorder, silent)
    finally:
        for s in scripted:
            s.close()


def answer_of(body: bytes) -> dict:
    return json.loads(body)


def entries(answer: dict, order: str = "exec") -> dict[str, dict]:
    return {host: per_order[order] for host, per_order in answer.items()}


def shape(value: object, like: object) -> object:
    """The type names of `value`, for the keys `like` has (new keys beside them are allowed)."""
    if isinstance(like, dict) and isinstance(value, dict):
        return {k: shape(value.get(k), v) for k, v in like.items()}
    return type(value).__name__


# -- the original client's requests, replayed


def test_replay_exec_group_answers_like_the_original(fleet):
    """proxy-exec-group replayed: 200 text/plain, the captured per-host keys and value types."""
    status, headers, body = fleet.request(legacy_request("proxy-exec-group"))
    want_status, want_headers, want_body = captured_response("proxy-exec-group")
    assert status == want_status == 200
    assert headers["content-type"] == want_headers["content-type"] == "text/plain; charset=utf-8"
    got = entries(answer_of(body))
    (want,) = entries(answer_of(want_body)).values()
    assert list(got) == ["127.0.0.2"]
    entry = got["127.0.0.2"]
    assert shape(entry, want) == shape(want, want)
    assert entry["returnCode"] == 200 and entry["serverStatus"] == 1 and entry["return"] == 1
    for key, value in want["content"].items():
        assert entry["content"][key] == value  # same command, same output


def test_replay_agent_error_seen_through_the_proxy(fleet):
    """proxy-exec-unknown-command: the agent's 400 comes back in the proxy's 200, as captured."""
    status, headers, body = fleet.request(legacy_request("proxy-exec-unknown-command"))
    want_status, want_headers, want_body = captured_response("proxy-exec-unknown-command")
    assert status == want_status == 200
    assert headers["content-type"] == want_headers["content-type"]
    got = answer_of(body)
    # Ours beside the captured keys (issue 13): the agent's own round trip.
    assert got["127.0.0.2"]["exec"].pop("seconds") >= 0
    assert got == answer_of(want_body)


@pytest.mark.parametrize("name", PROXY_REFUSALS)
def test_replay_refusals_match_the_original_bytes(fleet, name):
    """The old 403s: same status line, Content-Type and text, byte for byte."""
    raw = raw_request(fleet.proxy.host, fleet.proxy.port, legacy_request(name))
    want = (DATA / "wire" / f"{name}.response").read_bytes()
    assert raw.split(b"\r\n")[0] == want.split(b"\r\n")[0] == b"HTTP/1.1 403 Permission Denied"
    assert parse_response(raw)[1]["content-type"] == parse_response(want)[1]["content-type"]
    assert parse_response(raw)[2] == parse_response(want)[2]


def test_agents_get_the_order_with_the_api_key_emptied(fleet):
    """Agents get POST /agent/<order> with the captured fields, api_key emptied, args as sent."""
    before = len(fleet.recorder.requests)
    fields = {
        "auth_key": auth.legacy_auth_key("65535", time.time()),
        "options": "service:echo,hello",
        "args": "groups:recorder",
        "batch": "1",
        "max_fail": "0",
        "api_key": KEY1,
    }
    request = form_request("/api/exec", fields)
    status, _, answer = fleet.request(request)
    assert status == 200
    got = entries(answer_of(answer))[RECORDER]
    assert got["content"] == answer_of(captured_response("proxy-to-agent-forwarded")[2])
    assert len(fleet.recorder.requests) == before + 1
    head, _, body = fleet.recorder.requests[-1].partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "POST /agent/exec HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["connection"] == "close"
    fields = parse_qsl(body.decode(), keep_blank_values=True)
    captured = (DATA / "wire" / "proxy-to-agent-forwarded.request").read_bytes()
    captured_fields = parse_qsl(captured.partition(b"\r\n\r\n")[2].decode(), keep_blank_values=True)
    assert [k for k, _ in fields] == [k for k, _ in captured_fields]
    assert dict(fields) == {
        "auth_key": "",
        "options": "service:echo,hello",
        "args": "groups:recorder",
        "api_key": "",
    }
    verifier = auth.HmacVerifier(auth.DEFAULT_KEY_CIPHER, clock=_Now())
    verifier.verify(headers["authorization"], "POST", "/agent/exec", body)


class _Now:
    def seconds(self) -> float:
        return time.time()


def test_path_form_request(fleet):
    """GET /api/<order>/<options>/<args>/<api_key>, percent-decoded, works like the body form."""
    raw = (
        f"GET /api/exec/service%3Aecho%2Chello%20world/groups:fan1/{KEY1} HTTP/1.1\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    status, headers, body = fleet.request(raw)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    entry = entries(answer_of(body))["127.0.0.2"]
    assert entry["returnCode"] == 200
    assert entry["content"]["content"] == "aGVsbG8gd29ybGQK"  # "hello world\n"


def test_order_by_groups_and_by_hosts_with_deploy_client(fleet):
    """deploy-client through the proxy: by group every host of it answers, by hosts only those."""
    r = fleet.client(
        f"--api-key={KEY1}", "--args=groups:fan10", "--order=exec", "--options=service:echo,hi"
    )
    assert r.rc == 0, r.stdout + r.stderr
    proxy_entry = r.entry(fleet.proxy.address, "exec")
    assert proxy_entry["returnCode"] == "200"
    inner = entries(proxy_entry["content"])
    assert list(inner) == AGENTS
    assert all(e["returnCode"] == 200 and e["content"]["content"] == "aGkK" for e in inner.values())
    r = fleet.client(
        f"--api-key={KEY1}",
        "--args=hosts:127.0.0.5,127.0.0.3",
        "--order=exec",
        "--options=app:true",
    )
    assert r.rc == 0, r.stdout + r.stderr
    assert list(r.content(fleet.proxy.address, "exec")) == ["127.0.0.5", "127.0.0.3"]


def test_group_names_keep_their_case(fleet):
    """A mixed-case group matches as written; its lower-case twin is another, ungranted group."""
    status, _, body = fleet.post(
        "/api/exec", {"options": "app:true", "args": "groups:WebFront", "api_key": KEY1}
    )
    assert status == 200 and list(answer_of(body)) == ["127.0.0.3"]
    status, _, body = fleet.post(
        "/api/exec", {"options": "app:true", "args": "groups:webfront", "api_key": KEY1}
    )
    assert (status, body) == (403, b"You don't have permisson to access on this[webfront].")


def test_a_key_reaches_only_the_hosts_of_its_groups(fleet):
    """KEY2 has fan1 only: its host is allowed by name, a host of another group is not."""
    status, _, _ = fleet.post(
        "/api/exec", {"options": "app:true", "args": "hosts:127.0.0.2", "api_key": KEY2}
    )
    assert status == 200
    status, _, body = fleet.post(
        "/api/exec", {"options": "app:true", "args": "hosts:127.0.0.2,127.0.0.3", "api_key": KEY2}
    )
    assert (status, body) == (403, b"You don't have permisson to access on this[127.0.0.3].")


# -- fan-out


def test_dead_and_silent_hosts_are_reported_per_host_within_the_timeout(fleet):
    """Dead and silent hosts are reported per host, within thread_timeout, not delaying others."""
    accepted_before = len(fleet.silent.accepted)
    start = time.monotonic()
    status, _, body = fleet.post(
        "/api/exec", {"options": "app:true", "args": "groups:withdead", "api_key": KEY1}
    )
    elapsed = time.monotonic() - start
    assert status == 200
    got = entries(answer_of(body))
    assert list(got) == ["127.0.0.2", DEAD, SILENT, "127.0.0.4"]
    assert got[DEAD]["serverStatus"] == 0 and got[DEAD]["return"] == 0
    assert got[DEAD]["content"] == f"can't connect to {DEAD}:{fleet.port}"
    assert got[SILENT]["serverStatus"] == 0
    assert got[SILENT]["content"] == f"Process Timeout({THREAD_TIMEOUT})!"
    for host in ("127.0.0.2", "127.0.0.4"):
        assert got[host]["returnCode"] == 200 and got[host]["content"]["return"] == "true"
    assert THREAD_TIMEOUT - 0.2 <= elapsed < THREAD_TIMEOUT + 1.5
    assert len(fleet.silent.accepted) == accepted_before + 1
    wait_until(
        lambda: len(fleet.silent.closed) == len(fleet.silent.accepted),
        5,
        what="the proxy to close the silent host's connection",
    )
    opened, closed = fleet.silent.accepted[-1], fleet.silent.closed[-1]
    assert closed - opened < THREAD_TIMEOUT + 1


def test_an_order_to_five_agents_returns_when_they_answer(fleet):
    """No polling floor: exec /bin/true on 5 agents through the proxy is quick (sanity bound)."""
    fields = {"options": "app:true", "args": "groups:fan10", "api_key": KEY1}
    fleet.post("/api/exec", fields)  # warm-up
    start = time.monotonic()
    status, _, body = fleet.post("/api/exec", fields)
    elapsed = time.monotonic() - start
    assert status == 200 and len(answer_of(body)) == 5
    assert all(e["returnCode"] == 200 for e in entries(answer_of(body)).values())
    assert elapsed < 3, f"{elapsed:.2f}s for 5 agents"


# -- rolling


def test_rolling_through_the_proxy_stops_at_the_failure_budget(fleet):
    """Rolling via the proxy stops once failures exceed max_fail; the rest skipped, not ordered."""
    before = len(fleet.recorder.requests)
    start = time.monotonic()
    r = fleet.client(
        f"--api-key={KEY1}",
        "--args=groups:roll",
        "--order=exec",
        "--options=app:true",
        "--batch=1",
        "--max-fail=1",
    )
    elapsed = time.monotonic() - start
    assert r.rc == 4, r.stdout + r.stderr  # stopped at its failure budget
    inner = entries(r.content(fleet.proxy.address, "exec"))
    assert list(inner) == ["127.0.0.2", "127.0.0.3", DEAD, SILENT, "127.0.0.4", "127.0.0.5"]
    assert [h for h, e in inner.items() if e.get("skipped")] == ["127.0.0.4", "127.0.0.5"]
    assert inner["127.0.0.4"]["content"] == "skipped" and inner["127.0.0.4"]["serverStatus"] == 0
    assert inner[SILENT]["content"] == f"Process Timeout({THREAD_TIMEOUT})!"
    assert elapsed < 2 * THREAD_TIMEOUT + 3
    r = fleet.client(
        f"--api-key={KEY1}",
        "--args=groups:rollrec",
        "--order=exec",
        "--options=app:true",
        "--batch=1",
        "--max-fail=0",
    )
    inner = entries(r.content(fleet.proxy.address, "exec"))
    assert [h for h, e in inner.items() if e.get("skipped")] == ["127.0.0.3", RECORDER]
    assert len(fleet.recorder.requests) == before, "a skipped host was ordered"


def test_rolling_percentages_through_the_proxy(fleet):
    """batch=40% of 5 is 2 hosts, max_fail=20% is 1: two failures skip the other three."""
    status, _, body = fleet.post(
        "/api/exec",
        {
            "options": "service:false",
            "args": "groups:fan10",
            "api_key": KEY1,
            "batch": "40%",
            "max_fail": "20%",
        },
    )
    assert status == 200
    inner = entries(answer_of(body))
    assert [h for h, e in inner.items() if not e.get("skipped")] == AGENTS[:2]
    assert all(inner[h]["content"]["return"] == "false" for h in AGENTS[:2])


def test_bad_rolling_fields_are_refused(fleet):
    """A batch or max_fail that is not N or N% gets a 400 naming the field."""
    status, _, body = fleet.post(
        "/api/exec",
        {"options": "app:true", "args": "groups:fan1", "api_key": KEY1, "max_fail": "lots"},
    )
    assert (status, body) == (400, b"max_fail: expected N or N%, got 'lots'")


def test_rolling_with_deploy_client_directly(fleet):
    """Without a proxy, deploy-client --batch/--max-fail rolls over agents itself: exit code 4."""
    hosts = ",".join(f"{h}:{fleet.port}" for h in ("127.0.0.2", DEAD, "127.0.0.3"))
    r = run_client(
        f"--hosts={hosts}",
        "--order=exec",
        "--options=app:true",
        "--batch=1",
        "--max-fail=0",
        timeout=60,
    )
    assert r.rc == 4, r.stdout + r.stderr
    assert r.entry(f"127.0.0.2:{fleet.port}", "exec")["returnCode"] == "200"
    assert (
        r.entry(f"{DEAD}:{fleet.port}", "exec")["content"]
        == f"can't connect to {DEAD}:{fleet.port}"
    )
    assert r.entry(f"127.0.0.3:{fleet.port}", "exec")["skipped"] is True


# -- authentication at the proxy


@pytest.fixture(scope="module")
def signed_proxy(fleet):
    """A proxy whose [server] has a key_cipher (signed requests only), and which talks to
    agents with the original auth_key made from its own [client] key_cipher."""
    port = free_port()
    text = proxy_ini(
        port,
        fleet.api,
        fleet.port,
        server="key_cipher = proxysecret",
        client="key_cipher = agentsecret\nlegacy_auth = true",
    )
    return fleet.daemons.proxy(text, "127.0.0.1", port)


def test_signed_request_is_accepted_and_forwarded_with_the_client_settings(fleet, signed_proxy):
    """A signed request passes [server] key_cipher; agents get [client] key_cipher's auth_key."""
    r = fleet.client(
        "--key-cipher=proxysecret",
        f"--api-key={KEY1}",
        "--args=groups:recorder",
        "--order=exec",
        "--options=service:echo,hi",
        proxy=signed_proxy,
    )
    assert r.rc == 0, r.stdout + r.stderr
    assert r.entry(signed_proxy.address, "exec")["returnCode"] == "200"
    head, _, body = fleet.recorder.requests[-1].partition(b"\r\n\r\n")
    assert b"authorization:" not in head.lower()
    fields = dict(parse_qsl(body.decode(), keep_blank_values=True))
    auth.check_legacy_auth_key("agentsecret", fields["auth_key"], now=time.time())
    assert fields["api_key"] == ""


def test_unsigned_or_badly_signed_requests_get_401(fleet, signed_proxy):
    """With [server] key_cipher, wrong/no signature or an old auth_key get 401, no host ordered."""
    before = len(fleet.recorder.requests)
    r = fleet.client(
        "--key-cipher=wrong",
        f"--api-key={KEY1}",
        "--args=groups:recorder",
        "--order=exec",
        "--options=service:echo,hi",
        proxy=signed_proxy,
    )
    assert r.entry(signed_proxy.address, "exec")["returnCode"] == "401"
    status, _, body = fleet.request(
        legacy_request("proxy-exec-group", {"relay1": "recorder"}, key="proxysecret"), signed_proxy
    )
    assert status == 401
    status, _, _ = fleet.post(
        "/api/exec",
        {"options": "app:true", "args": "groups:recorder", "api_key": KEY1},
        signed_proxy,
    )
    assert status == 401
    assert len(fleet.recorder.requests) == before


def test_legacy_auth_accepts_the_old_auth_key(fleet, signed_proxy):
    """--legacy-auth (beating the file) accepts the old auth_key of the proxy's key, only that."""
    port = free_port()
    proxy = fleet.daemons.proxy(
        signed_proxy.ini.read_text(), "127.0.0.1", port, extra=["--legacy-auth", f"--port={port}"]
    )
    request = legacy_request("proxy-exec-group", {"relay1": "recorder"}, key="proxysecret")
    status, _, body = fleet.request(request, proxy)
    assert status == 200 and entries(answer_of(body))[RECORDER]["returnCode"] == 200
    request = legacy_request("proxy-exec-group", {"relay1": "recorder"}, key="65535")
    assert fleet.request(request, proxy)[0] == 401


# -- options and configs


def test_original_sample_and_every_old_option_under_twistd(fleet):
    """twistd runs the original sample with every old option; --client-port beats the file."""
    conf = fleet.workdir / "original-deploy_proxy.ini"
    text = (DATA / "config" / "original-deploy_proxy.ini").read_text()
    old_line = ";path        = /etc/deploy/deploy_proxy_api.ini"
    assert old_line in text
    conf.write_text(text.replace(old_line, f"path = {fleet.api}"))
    port = free_port()
    logs = fleet.workdir / "oldopts"
    logs.mkdir(exist_ok=True)
    args = [
        f"--user={pwd.getpwuid(os.getuid()).pw_name}",
        f"--group={grp.getgrgid(os.getgid()).gr_name}",
        "--addr=127.0.0.1",
        f"--port={port}",
        "--backlog=64",
        "--max-prefork=0",
        "--max-requests-per-child=0",
        "--max-process-timeout=0",
        "--socket-timeout=5",
        "--socket-accept-filter=off",
        "--log-write=off",
        "--log-error-level=6",
        f"--log-error-path={logs}/error.log",
        f"--log-access-path={logs}/access.log",
        "--key-cipher=oldoptskey",
        "--client-worker-method=fork",
        "--client-ipc-path=memory",
        f"--client-port={fleet.port}",
        f"--client-thread-timeout={THREAD_TIMEOUT}",
        "--client-socket-timeout=2",
        "--client-key-cipher=65535",
        "--debug",
    ]
    proxy = fleet.daemons.proxy(conf.read_text(), "127.0.0.1", port, extra=args)
    r = fleet.client(
        "--key-cipher=oldoptskey",
        f"--api-key={KEY1}",
        "--args=groups:fan1",
        "--order=exec",
        "--options=service:echo,hello",
        proxy=proxy,
    )
    assert r.rc == 0, r.stdout + r.stderr + proxy.log_text()
    inner = entries(r.content(proxy.address, "exec"))
    assert inner["127.0.0.2"]["content"]["content"] == "aGVsbG8K"


def write_original_samples(tmp_path: Path) -> Path:
    api = tmp_path / "api-copy.ini"
    shutil.copy(DATA / "config" / "original-deploy_proxy_api.ini", api)
    text = (DATA / "config" / "original-deploy_proxy.ini").read_text()
    conf = tmp_path / "proxy.ini"
    conf.write_text(
        text.replace(";path        = /etc/deploy/deploy_proxy_api.ini", f"path = {api}")
    )
    return conf


def test_original_samples_load_unchanged(tmp_path):
    """The original sample configs load unchanged (api path pointed at a copy): port 3441."""
    config = load_proxy_config(str(write_original_samples(tmp_path)))
    assert config.server.port == 3441 and config.server.key_cipher is None
    assert config.client == ClientSettings()
    assert config.allow_hosts == ["127.0.0.1"]
    assert config.keys == {} and config.servers == {}
    conf = tmp_path / "plain.ini"
    conf.write_text((DATA / "config" / "original-deploy_proxy.ini").read_text())
    assert load_proxy_config(str(conf)).api_path is None


def test_default_port_is_3441(tmp_path):
    """Without a port in the file or on the command line, the proxy listens on 3441."""
    options = Options()
    options.parseOptions(["--path", str(write_original_samples(tmp_path))])
    assert options.config.server.port == 3441
    assert options.config.client.port == 3440


def test_every_old_option_lands_in_the_config_and_beats_the_file(tmp_path):
    """Each option of the old --help is accepted; the command line wins over the file."""
    conf = tmp_path / "proxy.ini"
    conf.write_text(
        "[server]\nport = 4000\nsocket_timeout = 9\nkey_cipher = file\n"
        "[client]\nport = 4001\nthread_timeout = 9\nkey_cipher = filec\n"
    )
    options = Options()
    options.parseOptions(
        [
            f"--path={conf}",
            "--user=nobody",
            "--group=nogroup",
            "--addr=127.0.0.9",
            "--port=4100",
            "--backlog=7",
            "--max-prefork=3",
            "--max-requests-per-child=5",
            "--max-process-timeout=11",
            "--socket-timeout=4",
            "--socket-accept-filter=on",
            "--log-write=on",
            "--log-error-level=7",
            "--log-error-path=/tmp/e.log",
            "--log-access-path=/tmp/a.log",
            "--key-cipher=cmd",
            "--ssl-private-key=/k.pem",
            "--client-worker-method=thread",
            "--client-ipc-path=memory",
            "--client-port=4101",
            "--client-thread-timeout=3",
            "--client-socket-timeout=1",
            "--client-key-cipher=cmdc",
            "--client-ssl-public-key=/p.pem",
            "--debug",
        ]
    )
    server, client = options.config.server, options.config.client
    assert (server.user, server.group, server.addr, server.port) == (
        "nobody",
        "nogroup",
        "127.0.0.9",
        4100,
    )
    assert (server.backlog, server.max_prefork, server.max_requests_per_child) == (7, 3, 5)
    assert (server.max_process_timeout, server.socket_timeout) == (11, 4)
    assert server.socket_accept_filter and server.log_write
    assert server.log_error_level == "debug"  # --debug
    assert (server.log_error_path, server.log_access_path) == ("/tmp/e.log", "/tmp/a.log")
    assert server.key_cipher == "cmd"
    assert server.ssl and server.ssl_private_key == "/k.pem"
    assert (client.port, client.thread_timeout, client.socket_timeout) == (4101, 3, 1)
    assert client.key_cipher == "cmdc" and client.ssl_public_key == "/p.pem"
    assert (client.worker_method, client.ipc_path) == ("thread", "memory")


def test_our_options_beyond_the_old_ones(tmp_path):
    """--legacy-auth, --client-legacy-auth and --client-max-parallel set their config keys."""
    conf = tmp_path / "proxy.ini"
    conf.write_text("[client]\nmax_parallel = 8\n")
    options = Options()
    options.parseOptions([f"--path={conf}"])
    assert options.config.client.max_parallel == 8
    assert not options.config.server.legacy_auth and not options.config.client.legacy_auth
    options = Options()
    options.parseOptions(
        [f"--path={conf}", "--legacy-auth", "--client-legacy-auth", "--client-max-parallel=0"]
    )
    assert options.config.server.legacy_auth and options.config.client.legacy_auth
    assert options.config.client.max_parallel == 0


def test_options_the_proxy_ignores_are_warned_about(tmp_path):
    """Process options (max_prefork, max_process_timeout, worker/ipc) get a warning at start."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import globalLogPublisher

    from deploy.proxy_tap import build_service

    conf = tmp_path / "proxy.ini"
    conf.write_text("[server]\nport = 4000\nmax_prefork = 4\n[client]\nipc_path = memory\n")
    options = Options()
    options.parseOptions(
        [f"--path={conf}", "--max-process-timeout=9", "--client-worker-method=fork"]
    )
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        build_service(options, MemoryReactorClock())
    finally:
        globalLogPublisher.removeObserver(events.append)
    ignored = {e["name"] for e in events if "accepted for compatibility" in e.get("log_format", "")}
    assert ignored == {"max_prefork", "max_process_timeout", "worker_method", "ipc_path"}


def test_proxy_needs_a_way_to_verify_agents_when_client_tls_is_on(tmp_path):
    """[client] ssl = true without ssl_public_key or ssl_ca stops the proxy at start."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.usage import UsageError

    from deploy.proxy_tap import build_service

    conf = tmp_path / "proxy.ini"
    conf.write_text("[server]\nport = 4000\n[client]\nssl = true\n")
    options = Options()
    options.parseOptions([f"--path={conf}"])
    with pytest.raises(UsageError, match=r"\[client\]"):
        build_service(options, MemoryReactorClock())


# -- the commented samples in etc/

SAMPLE = REPO / "etc" / "deploy_proxy.ini"
SAMPLE_API = REPO / "etc" / "deploy_proxy_api.ini"
AGENT_ONLY = {"rkill_grace", "dry_run_timeout", "allow_inline_remote_shell", "source_retry"}
# state_path: the proxy keeps its rollouts there


def test_etc_samples_load_as_shipped():
    """etc/deploy_proxy.ini loads as shipped, with etc/deploy_proxy_api.ini next to it."""
    config = load_proxy_config(str(SAMPLE))
    assert config.api_path == str(SAMPLE_API)
    assert config.server.port == 3441 and config.client.max_parallel == 64
    assert config.keys == {}


def commented_settings(text: str) -> dict[str, list[str]]:
    """section → the `;key = value` lines of the sample, uncommented."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line.startswith(";") and "=" in line and not line.startswith((";;", "; ")):
            out.setdefault(section, []).append(line[1:])
    return out


def test_etc_sample_documents_every_key():
    """Every [server] key the proxy uses and every [client] key has an example in the sample."""
    text = SAMPLE.read_text()
    settings = commented_settings(text)
    keys = {s: {line.split("=")[0].strip() for line in lines} for s, lines in settings.items()}
    server_keys = {f for f in ServerSettings.__dataclass_fields__} - AGENT_ONLY
    assert server_keys <= keys["server"], server_keys - keys["server"]
    assert set(ClientSettings.__dataclass_fields__) <= keys["client"]
    for key in (
        "max_parallel",
        "key_cipher",
        "legacy_auth",
        "ssl_public_key",
        "ssl_ca",
        "ssl_cert",
        "ssl_key",
    ):
        assert f"\n;{key} " in text.split("\n[client]\n")[1]


def test_etc_sample_with_every_key_uncommented_loads(tmp_path):
    """Both samples with every example value uncommented still load, with the example grants."""
    text = SAMPLE.read_text()
    for lines in commented_settings(text).values():
        for line in lines:
            text = text.replace(f"\n;{line}\n", f"\n{line}\n", 1)
    shutil.copy(SAMPLE_API, tmp_path / "deploy_proxy_api.ini")
    api = tmp_path / "deploy_proxy_api.ini"
    api_text = api.read_text()
    for lines in commented_settings(api_text).values():
        for line in lines:
            api_text = api_text.replace(f"\n;{line}\n", f"\n{line}\n", 1)
    api.write_text(api_text)
    conf = tmp_path / "deploy_proxy.ini"
    conf.write_text(text)
    config = load_proxy_config(str(conf))
    assert config.keys and config.servers
    assert all(group in config.servers for groups in config.keys.values() for group in groups)
    assert config.server.key_cipher and config.client.ssl_public_key
