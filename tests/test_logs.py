"""The daemons' logs: the old level names, the error log's level filter and its start-up hold,
the access line in the original's format, the JSON-lines audit log (API key id, never the key),
strftime paths that roll over, files moved away by logrotate, syslog; and the real agent and
proxy writing all three under twistd."""

from __future__ import annotations

import hashlib
import json
import os
import re
import syslog
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, LogPublisher

from deploy import logs
from deploy.agent import AgentFactory, AgentService
from deploy.config import LOG_LEVELS, ConfigError, load_agent_config, load_proxy_config
from deploy.proxy import ProxyFactory, ProxyService
from deploy.wire import HttpRequestReceiver, Request, RequestFactory, Response
from tests.harness import free_port, run_client, wait_until

T0 = 1_700_000_000.0  # a fixed "now"
ACCESS_LINE = re.compile(
    r'^(\S+) (\S+) \[(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d)\] "([^"\\]*(?:\\.[^"\\]*)*)" (\d{3}) (\d+)$'
)


def when(t: float) -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t))


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class EchoProtocol(HttpRequestReceiver):
    """Answers every request 200 with a small JSON body and notes an order for the audit."""

    socket_timeout = 0

    def handleRequest(self, request: Request) -> Response:
        self.audit.update(order="status", options=request.form().get("options", ""))
        return Response.json({"return": "true"})


class EchoFactory(RequestFactory):
    protocol = EchoProtocol


def connect(factory: Any, peer: str = "127.0.0.1") -> tuple[Any, StringTransport]:
    proto = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    proto.makeConnection(transport)
    return proto, transport


def service_for(tmp_path: Path, factory: Any, clock: Clock, **kw: Any) -> logs.LogService:
    options: dict[str, Any] = {
        "log_write": True,
        "log_error_level": "info",
        "log_error_path": str(tmp_path / "error.log"),
        "log_access_path": str(tmp_path / "access.log"),
        "audit_log_path": None,
    }
    options.update(kw)
    return logs.build_log_service(
        **options, factory=factory, daemon="agent", now=clock, publisher=LogPublisher()
    )


# --------------------------------------------------------------------------- levels


def test_old_level_names_and_numbers_map_onto_twisted_levels(tmp_path):
    """emerg..debug and 0-7 load from the ini, and each maps to the Twisted level that keeps
    what the old level kept (notice keeps warnings and up: Twisted has no notice)."""
    want = {
        "emerg": LogLevel.critical,
        "alert": LogLevel.critical,
        "crit": LogLevel.critical,
        "error": LogLevel.error,
        "warn": LogLevel.warn,
        "notice": LogLevel.warn,
        "info": LogLevel.info,
        "debug": LogLevel.debug,
    }
    assert list(want) == list(LOG_LEVELS)
    for number, name in enumerate(LOG_LEVELS):
        for spelled in (name, str(number)):
            ini = tmp_path / "agent.ini"
            ini.write_text(f"[server]\nlog_error_level = {spelled}\n")
            level = load_agent_config(str(ini)).server.log_error_level
            assert level == name and logs.log_level(level) == want[name]
    ini.write_text("[server]\nlog_error_level = 8\n")
    with pytest.raises(ConfigError, match="agent.ini:2: log_error_level"):
        load_agent_config(str(ini))


def test_error_log_keeps_only_events_at_or_above_its_level(tmp_path):
    """log_error_level = error: info and warn events stay out of the error file, error and
    critical go in, each as `[YYYY/MM/DD HH:MM:SS] [level] (namespace) text`."""
    svc = service_for(tmp_path, EchoFactory(), Clock(), log_error_level="error")
    svc.startService()
    log = Logger(namespace="deploy.test", observer=svc.publisher)
    log.info("an info {n}", n=1)
    log.warn("a warning")
    log.error("an error {what}", what="happened")
    log.critical("critical")
    svc.stopService()
    lines = (tmp_path / "error.log").read_text().splitlines()
    assert [re.sub(r"^\[[^]]+\] ", "", line) for line in lines] == [
        "[error] (deploy.test) an error happened",
        "[critical] (deploy.test) critical",
    ]
    assert re.match(r"^\[\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\] ", lines[0])


def test_error_log_holds_start_up_events_until_it_starts(tmp_path):
    """What is logged while the daemon is being built (before privileges drop) is not written
    then, and is written, in order, when the service starts."""
    svc = service_for(tmp_path, EchoFactory(), Clock())
    log = Logger(namespace="deploy.test", observer=svc.publisher)
    log.warn("max_requests_per_child = 10 is accepted for compatibility and ignored")
    log.info("second")
    assert not (tmp_path / "error.log").exists()
    svc.startService()
    log.info("third")
    svc.stopService()
    text = (tmp_path / "error.log").read_text()
    assert re.findall(r"\) (.*)", text) == [
        "max_requests_per_child = 10 is accepted for compatibility and ignored",
        "second",
        "third",
    ]


def test_a_failure_is_logged_with_its_traceback(tmp_path):
    """log.failure writes the message and the traceback to the error log."""
    svc = service_for(tmp_path, EchoFactory(), Clock())
    svc.startService()
    log = Logger(namespace="deploy.test", observer=svc.publisher)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("order {order} failed", order="status")
    svc.stopService()
    text = (tmp_path / "error.log").read_text()
    assert "[critical] (deploy.test) order status failed" in text
    assert "Traceback" in text and "ZeroDivisionError" in text


# --------------------------------------------------------------------------- access and audit


def test_access_line_is_the_original_format(tmp_path):
    """`REMOTE_ADDR REMOTE_HOST [YYYY/MM/DD HH:MM:SS] "METHOD URL HTTP/1.1" STATUS SIZE`, the
    peer address as REMOTE_HOST (no reverse lookup), SIZE the body's bytes."""
    factory = EchoFactory()
    svc = service_for(tmp_path, factory, Clock())
    svc.startService()
    proto, _ = connect(factory, "10.1.2.3")
    body = b"options=web"
    proto.dataReceived(b"POST /agent/status HTTP/1.1\r\nContent-Length: 11\r\n\r\n" + body)
    svc.stopService()
    size = len(Response.json({"return": "true"}).body)
    line = (tmp_path / "access.log").read_text()
    assert line == f'10.1.2.3 10.1.2.3 [{when(T0)}] "POST /agent/status HTTP/1.1" 200 {size}\n'
    assert ACCESS_LINE.match(line.rstrip("\n"))


def test_access_line_escapes_quotes_and_marks_a_missing_request(tmp_path):
    """A `"` or `\\` in the URL is backslashed so the line still parses; an answer given
    before any request line (a refused peer, a garbled start) logs `"-"`."""
    factory = EchoFactory()
    svc = service_for(tmp_path, factory, Clock())
    svc.startService()
    proto, transport = connect(factory)
    proto.dataReceived(b'GET /agent/status?x="a\\b" HTTP/1.1\r\n\r\n')
    proto, transport = connect(factory)
    proto.answer(Response.text(403, "127.0.0.1 is not allowed!"))
    svc.stopService()
    first, second = (tmp_path / "access.log").read_text().splitlines()
    assert first.endswith(' "GET /agent/status?x=\\"a\\\\b\\" HTTP/1.1" 200 20')
    assert ACCESS_LINE.match(first).group(4) == 'GET /agent/status?x=\\"a\\\\b\\" HTTP/1.1'
    assert second == f'127.0.0.1 127.0.0.1 [{when(T0)}] "-" 403 25'


def test_audit_record_is_one_json_line_per_answer(tmp_path):
    """The audit log: one JSON object per line with time (UTC), daemon, peer, method, path,
    what the handler noted (order, options), status, bytes and duration."""
    factory = EchoFactory()
    clock = Clock()
    svc = service_for(tmp_path, factory, clock, audit_log_path=str(tmp_path / "audit.log"))
    svc.startService()
    for options in ("web", "service:echo,hi"):
        proto, _ = connect(factory, "192.0.2.7")
        body = f"options={options}".encode()
        proto.dataReceived(
            b"POST /agent/status HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
    svc.stopService()
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [r["options"] for r in records] == ["web", "service:echo,hi"]
    record = records[0]
    assert record["time"] == "2023-11-14T22:13:20.000+00:00"
    assert {k: record[k] for k in ("daemon", "peer", "method", "path", "order", "status")} == {
        "daemon": "agent",
        "peer": "192.0.2.7",
        "method": "POST",
        "path": "/agent/status",
        "order": "status",
        "status": 200,
    }
    assert record["bytes"] == len(Response.json({"return": "true"}).body)
    assert isinstance(record["duration"], float) and 0 <= record["duration"] < 5


def test_log_write_off_writes_no_error_or_access_log_but_the_audit_log_if_named(tmp_path):
    """log_write = false (the default): no error or access file, as the original; an
    audit_log_path is written all the same (it is asked for by name)."""
    factory = EchoFactory()
    svc = service_for(
        tmp_path, factory, Clock(), log_write=False, audit_log_path=str(tmp_path / "audit.log")
    )
    assert svc.error is None and svc.access_path is None
    svc.startService()
    Logger(observer=svc.publisher).error("not for a file")
    proto, _ = connect(factory)
    proto.dataReceived(b"GET /agent/status HTTP/1.1\r\n\r\n")
    svc.stopService()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log"]
    svc = service_for(tmp_path, factory, Clock(), log_write=False)
    assert svc.paths == [] and not factory.observers


def test_log_write_on_without_paths_uses_the_original_defaults():
    """log_write = true and no paths: /var/log/deploy/error.log and access.log, as before."""
    svc = logs.build_log_service(
        log_write=True,
        log_error_level="info",
        log_error_path=None,
        log_access_path=None,
        audit_log_path=None,
        factory=EchoFactory(),
        daemon="agent",
        publisher=LogPublisher(),
    )
    assert svc.paths == ["/var/log/deploy/error.log", "/var/log/deploy/access.log"]


def agent_ini(tmp_path: Path) -> str:
    ini = tmp_path / "agent.ini"
    ini.write_text(
        f"[server]\nstate_path = {tmp_path / 'state'}\n[allow::hosts]\nhost[] = 127.0.0.0/8\n"
    )
    return str(ini)


def test_agent_notes_order_and_options_for_the_audit_even_when_refused(tmp_path):
    """AgentProtocol fills the audit with the order and options it read, before auth: a 401
    still says what was asked."""
    service = AgentService(load_agent_config(agent_ini(tmp_path)), MemoryReactorClock())
    factory = AgentFactory(service)
    svc = service_for(tmp_path, factory, Clock(), audit_log_path=str(tmp_path / "audit.log"))
    svc.startService()
    proto, transport = connect(factory)
    proto.dataReceived(b"POST /agent/rsync HTTP/1.1\r\nContent-Length: 11\r\n\r\noptions=web")
    assert transport.value().startswith(b"HTTP/1.1 401 ")
    svc.stopService()
    (record,) = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    assert (record["order"], record["options"], record["status"]) == ("rsync", "web", 401)


def test_proxy_audit_names_the_api_key_by_id_never_the_key(tmp_path):
    """The proxy's audit record has the key's sha256 prefix and the number of hosts the key
    grants for the order (0 when refused); the key itself appears nowhere in the file."""
    secret = "s3cret-api-key-0123456789"
    api = tmp_path / "api.ini"
    api.write_text(f"[keys]\n{secret}[] = web\n[servers]\nweb[] = 10.0.0.1\nweb[] = 10.0.0.2\n")
    ini = tmp_path / "proxy.ini"
    ini.write_text(f"[allow::hosts]\nhost[] = 127.0.0.0/8\n[api]\npath = {api}\n")
    service = ProxyService(load_proxy_config(str(ini)), MemoryReactorClock())
    factory = ProxyFactory(service)
    svc = service_for(tmp_path, factory, Clock(), audit_log_path=str(tmp_path / "audit.log"))
    svc.startService()
    for args in ("groups:other", "groups:web"):
        proto, _ = connect(factory)
        body = f"options=service:echo,hi&args={args}&api_key={secret}".encode()
        proto.dataReceived(
            b"POST /agent/exec HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
    svc.stopService()
    text = (tmp_path / "audit.log").read_text()
    assert secret not in text
    refused = json.loads(text.splitlines()[0])
    key_id = logs.api_key_id(secret)
    assert key_id == hashlib.sha256(secret.encode()).hexdigest()[:12]
    assert refused["apiKeyId"] == key_id and refused["hosts"] == 0 and refused["status"] == 403
    assert refused["args"] == "groups:other" and refused["options"] == "service:echo,hi"
    request = type("R", (), {"order": "exec", "options": "x", "args": "groups:web"})()
    request.api_key = secret  # type: ignore[attr-defined]
    assert logs.proxy_audit(request, service.granted_hosts)["hosts"] == 2


# --------------------------------------------------------------------------- files and syslog


def test_strftime_path_rolls_to_a_new_file_each_hour(tmp_path):
    """`agent_access.%Y%m%d%H.log`: lines of one hour in one file, the next hour's in the next
    (directories in the pattern are created as needed)."""
    clock = Clock(T0)
    pattern = str(tmp_path / "%Y" / "agent_access.%Y%m%d%H.log")
    out = logs.RollingFile(pattern, now=clock)
    out.write("one\n")
    clock.t += 60
    out.write("two\n")
    clock.t += 3600
    out.write("three\n")
    out.close()
    first = time.strftime(pattern, time.localtime(T0))
    second = time.strftime(pattern, time.localtime(T0 + 3660))
    assert first != second
    assert Path(first).read_text() == "one\ntwo\n"
    assert Path(second).read_text() == "three\n"


def test_a_file_moved_away_by_logrotate_is_reopened_under_its_name(tmp_path):
    """After `mv access.log access.log.1` (logrotate without copytruncate), lines go to a new
    access.log within the check interval; no signal needed."""
    clock = Clock()
    path = tmp_path / "access.log"
    out = logs.RollingFile(str(path), now=clock, check_interval=1.0)
    out.write("before\n")
    path.rename(tmp_path / "access.log.1")
    clock.t += 2
    out.write("after\n")
    out.close()
    assert (tmp_path / "access.log.1").read_text() == "before\n"
    assert path.read_text() == "after\n"


def test_a_log_that_cannot_be_written_is_reported_once_and_never_raises(tmp_path, capfd):
    """A path that cannot be opened is said once on stderr; logging goes on without raising."""
    (tmp_path / "file").write_text("")
    out = logs.RollingFile(str(tmp_path / "file" / "x.log"))
    for _ in range(3):
        out.write("line\n")
    err = capfd.readouterr().err
    assert err.count("cannot write log file") == 1 and "x.log" in err


def test_syslog_gets_each_line_with_its_level_priority(monkeypatch):
    """`syslog` as a path: facility daemon, the daemon's name as ident, priority by level."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: calls.append(("open", *a)))
    monkeypatch.setattr(syslog, "syslog", lambda *a: calls.append(("log", *a)))
    monkeypatch.setattr(logs.SyslogDestination, "_opened_as", None)
    out = logs.open_destination("syslog", "deploy-agent")
    out.write("it broke\n", LogLevel.error)
    out.write('127.0.0.1 127.0.0.1 [x] "GET / HTTP/1.1" 200 0\n', LogLevel.info)
    assert calls == [
        ("open", "deploy-agent", syslog.LOG_PID, syslog.LOG_DAEMON),
        ("log", syslog.LOG_DAEMON | syslog.LOG_ERR, "it broke"),
        (
            "log",
            syslog.LOG_DAEMON | syslog.LOG_INFO,
            '127.0.0.1 127.0.0.1 [x] "GET / HTTP/1.1" 200 0',
        ),
    ]


# --------------------------------------------------------------------------- the real daemons


def test_agent_under_twistd_writes_hourly_error_access_and_audit_files(daemons, site, tmp_path):
    """A real agent with log_write = true and the original's hourly patterns: its error file
    has the start-up lines and the ignored-option warning, its access file one original-format
    line per order, its audit file one JSON line per order."""
    logdir = tmp_path / "logs"
    agent = daemons.agent(
        groups=site.groups(),
        jobs=site.jobs,
        state=tmp_path / "state2",
        allow_paths=[site.targets],
        server={
            "log_write": "true",
            "log_error_level": "info",
            "log_error_path": f"{logdir}/agent_error.%Y%m%d%H.log",
            "log_access_path": f"{logdir}/agent_access.%Y%m%d%H.log",
            "audit_log_path": f"{logdir}/agent_audit.log",
            "max_requests_per_child": 100,
        },
    )
    r = run_client(f"--hosts={agent.address}", "--order=exec", "--options=service:echo,hi")
    assert r.rc == 0, r.stderr
    r = run_client(f"--hosts={agent.address}", "--order=status", "--options=nosuchgroup")
    assert r.rc == 2

    def text_of(pattern: str) -> str:
        # an hour may turn during the test: read every hourly file, oldest first
        return "".join(p.read_text() for p in sorted(logdir.glob(pattern)))

    def access_lines() -> list[str]:
        lines = text_of("agent_access.??????????.log").splitlines()
        return lines if len(lines) >= 2 else []

    lines = wait_until(access_lines, 10, what="two access lines")
    assert [ACCESS_LINE.match(x).group(4, 5) for x in lines] == [
        ("POST /agent/exec HTTP/1.1", "200"),
        ("POST /agent/status HTTP/1.1", "400"),
    ]
    assert all(ACCESS_LINE.match(x).group(1, 2) == ("127.0.0.1", "127.0.0.1") for x in lines)
    error = text_of("agent_error.??????????.log")
    assert "max_requests_per_child = 100 is accepted for compatibility and ignored" in error
    assert "exec 'service:echo,hi' from 127.0.0.1" in error
    records = [json.loads(x) for x in (logdir / "agent_audit.log").read_text().splitlines()]
    assert [(r["order"], r["options"], r["status"]) for r in records] == [
        ("exec", "service:echo,hi", 200),
        ("status", "nosuchgroup", 400),
    ]
    os.kill(agent.pid, 0)  # still serving


def test_proxy_under_twistd_audits_key_id_and_host_count(daemons, site, tmp_path):
    """A real proxy with an audit log: the record of an order through it has the API key's id
    (not the key), the granted host count and the status."""
    secret = "proxy-secret-key-42"
    api = tmp_path / "api.ini"
    api.write_text(f"[keys]\n{secret}[] = web\n[servers]\nweb[] = {site.agent.address}\n")
    port = free_port()
    audit = tmp_path / "proxy-audit.log"
    proxy = daemons.proxy(
        f"[server]\naddr = 127.0.0.1\nport = {port}\naudit_log_path = {audit}\n"
        f"[client]\nport = {site.agent.port}\n[allow::hosts]\nhost[] = 127.0.0.0/8\n"
        f"[api]\npath = {api}\n",
        "127.0.0.1",
        port,
    )
    r = run_client(
        f"--hosts={proxy.address}",
        f"--api-key={secret}",
        "--args=groups:web",
        "--order=exec",
        "--options=service:echo,hi",
    )
    assert r.rc == 0, (r.stdout, r.stderr)
    (record,) = [json.loads(x) for x in wait_until(lambda: audit.read_text().splitlines(), 10)]
    assert record["apiKeyId"] == logs.api_key_id(secret) and secret not in audit.read_text()
    assert (record["daemon"], record["order"], record["hosts"], record["status"]) == (
        "proxy",
        "exec",
        1,
        200,
    )
