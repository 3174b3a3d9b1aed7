"""Running the daemons as an operator does: dropping to --user/--group after binding (and still
serving and writing state and logs), TCP_DEFER_ACCEPT, the listen backlog, the process title,
the old process-model options logged as ignored; the systemd units (systemd-analyze, their
ExecStart lines really starting each daemon, hardening that keeps the agent's paths writable)
and the logrotate file."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs
from twisted.python import usage

from deploy import daemon, logs, privileges
from deploy.client import ClientOptions, Order, build_request
from deploy.config import ServerSettings
from tests.conftest import JOBS
from tests.harness import (
    ChildProcess,
    agent_ini,
    can_connect,
    free_port,
    make_tree,
    parse_response,
    run_client,
    tool,
    wait_until,
)

REPO = Path(__file__).parent.parent
UNITS = REPO / "etc" / "systemd"
NOBODY = 65534


# --------------------------------------------------------------------------- privileges


@pytest.fixture
def open_dir(daemons):
    """A directory every user can traverse (pytest's tmp_path is root's, mode 0700), removed
    once the daemons that write there have stopped."""
    path = Path(tempfile.mkdtemp(prefix="deploy-ops-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        daemons.stop_all()
        shutil.rmtree(path, ignore_errors=True)


def proc_ids(pid: int) -> dict[str, list[int]]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {
        key: [int(x) for x in re.search(rf"^{key}:[ \t]*(.*)$", text, re.M).group(1).split()]
        for key in ("Uid", "Gid", "Groups")
    }


def free_privileged_port(host: str = "127.0.0.1") -> int:
    """A free port below 1024: only root may bind it (ip_unprivileged_port_start is 1024)."""
    assert int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) >= 1024
    for port in random.sample(range(600, 1024), 200):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


def test_agent_started_as_root_drops_to_nobody_and_keeps_working(daemons, open_dir):
    """user = nobody, group = nogroup on a port below 1024: the agent binds it as root, then
    every uid and gid is nobody's and no root group is left; it still answers status (a dry
    run) and exec, records a sync in its state directory (handed over to nobody, with the
    records a previous root agent left) and writes its logs."""
    assert os.geteuid() == 0, "this test starts the agent as root"
    tree = make_tree(open_dir / "tree", files=5, size=100)
    rsyncd = daemons.rsyncd({"DEST": tree})
    targets = open_dir / "targets"
    targets.mkdir()
    os.chown(targets, NOBODY, NOBODY)
    jobs = open_dir / "jobs.ini"
    jobs.write_text(JOBS)
    # A previous agent, run as root, left a state directory with a sync it thought running:
    # start-up records it as lost (rewriting it as root) before the drop.
    state = open_dir / "state"
    state.mkdir()
    stale = state / ("0" * 32 + ".json")
    stale.write_text(json.dumps({"checksum": "0" * 32, "state": "running", "supervisorPid": 1}))
    stale.chmod(0o600)
    logdir = open_dir / "logs"
    agent = daemons.agent(
        port=free_privileged_port(),
        groups={"web": rsyncd.group(targets / "web", "--archive")},
        jobs=jobs,
        state=state,
        allow_paths=[targets],
        server={
            "user": "nobody",
            "group": "nogroup",
            "log_write": "true",
            "log_access_path": f"{logdir}/access.log",
            "log_error_path": f"{logdir}/error.log",
        },
    )
    # The port takes connections (into its backlog) as soon as it is bound, before the drop:
    # listening says nothing about the ids yet. The agent logs the drop once it is done.
    wait_until(
        lambda: "running as nobody:nogroup (uid 65534, gid 65534)" in agent.log_text(),
        20,
        what="the agent to log that it dropped to nobody",
    )
    ids = proc_ids(agent.pid)
    assert ids["Uid"] == [NOBODY] * 4 and ids["Gid"] == [NOBODY] * 4
    assert 0 not in ids["Groups"]
    r = run_client(f"--hosts={agent.address}", "--order=status", "--options=web")
    assert r.rc == 0, r.stdout + r.stderr
    assert r.content(agent.address, "status")["transferFilesCount"] == "5"
    r = run_client(f"--hosts={agent.address}", "--order=exec", "--options=service:echo,hi")
    assert r.content(agent.address, "exec")["content"] == "aGkK"
    # The sync itself may not start here (the supervisor's interpreter may be out of nobody's
    # reach on a test machine): what matters is that the agent, as nobody, records it.
    r = run_client(f"--hosts={agent.address}", "--order=rsync", "--options=web")
    assert r.json[agent.address]["rsync"]["serverStatus"] == 1
    # Not write_state's temporary files (.tmp-*.json), which come and go while the sync runs.
    (record,) = set(state.glob("[!.]*.json")) - {stale}
    assert json.loads(record.read_text())["src"] == str(targets / "web")
    assert json.loads(stale.read_text())["outcome"] == "lost"
    for path in (state, record, stale, logdir, logdir / "access.log", logdir / "error.log"):
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY, NOBODY), path
    assert "/agent/rsync HTTP/1.1" in (logdir / "access.log").read_text()


def test_a_request_waiting_when_the_port_opens_is_answered_as_nobody(daemons, open_dir):
    """A request sent the moment the port listens (the agent, still root, has not dropped yet)
    is answered once the agent runs as nobody: nothing is served before the drop."""
    jobs = open_dir / "jobs.ini"
    jobs.write_text("[service]\nservice:uid = /usr/bin/id -u %s\n")
    agent = daemons.agent(
        port=free_privileged_port(),
        wait=False,
        jobs=jobs,
        state=open_dir / "state",
        allow_paths=[open_dir],
        server={"user": "nobody", "group": "nogroup"},
    )
    request = build_request(Order("exec", "service:uid"), ClientOptions(), agent.host, time.time())

    def connected() -> socket.socket | None:
        assert agent.proc.poll() is None, agent.log_text()
        try:
            return socket.create_connection((agent.host, agent.port), timeout=30)
        except OSError:
            return None

    with wait_until(connected, 30, 0.001, "the agent's port to listen") as sock:
        sock.sendall(request)
        raw = b"".join(iter(lambda: sock.recv(65536), b""))
    status, _, body = parse_response(raw)
    assert status == 200, raw
    assert base64.b64decode(json.loads(body)["content"]) == f"{NOBODY}\n".encode()


def test_agent_that_could_not_write_its_logs_as_the_user_stops_at_start(daemons, open_dir):
    """A log directory that exists, root's and closed to nobody: the agent does not chown it
    (it may be /var/log); it drops, finds it cannot write there, and exits saying so."""
    logdir = open_dir / "logs"
    logdir.mkdir(mode=0o755)
    port = free_port()
    agent = daemons.agent(
        port=port,
        wait=False,
        state=open_dir / "state",
        server={"log_write": "true", "log_error_path": f"{logdir}/e.log"},
        extra=["--user=nobody"],  # the command line's way; no group: nobody's own
    )
    wait_until(lambda: agent.proc.poll() is not None, 20, what="the agent to exit")
    assert agent.proc.returncode != 0
    assert f"cannot write {logdir}" in agent.log_text()
    assert "chown them to nobody:nogroup" in agent.log_text()
    assert logdir.stat().st_uid == 0


def test_state_directory_is_handed_over_but_a_shared_one_is_not(tmp_path):
    """The agent's own state directory (and the state files in it) go to the user; a sticky
    world-writable directory such as /tmp, or a directory made missing, is never chowned."""
    identity = privileges.Identity(NOBODY, NOBODY, "nobody")
    state = tmp_path / "state"
    state.mkdir()
    (state / "abc.json").write_text("{}")
    (state / "link").symlink_to("/etc/passwd")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    new = tmp_path / "a" / "b"
    privileges.prepare_directories(identity, own=[str(state), str(shared)], create=[str(new)])
    assert state.stat().st_uid == NOBODY and (state / "abc.json").stat().st_uid == NOBODY
    assert os.lstat(state / "link").st_uid == 0 and Path("/etc/passwd").stat().st_uid == 0
    assert shared.stat().st_uid == 0
    assert (tmp_path / "a").stat().st_uid == NOBODY and new.stat().st_uid == NOBODY
    assert tmp_path.stat().st_uid == 0


def test_user_and_group_are_resolved_or_refused():
    """Names and numbers resolve (a user alone takes its primary group); an unknown one stops
    the daemon at start with a usage error naming it."""
    assert privileges.resolve_identity(None, None) is None
    assert privileges.resolve_identity("nobody", None) == privileges.Identity(
        NOBODY, NOBODY, "nobody"
    )
    assert privileges.resolve_identity(str(NOBODY), "nogroup").gid == NOBODY
    assert privileges.resolve_identity(None, "nogroup") == privileges.Identity(0, NOBODY, "root")
    with pytest.raises(privileges.PrivilegeError, match="unknown user 'no-such-user-x'"):
        privileges.resolve_identity("no-such-user-x", None)
    settings = ServerSettings(group="no-such-group-x")
    service = logs.build_log_service(
        log_write=False,
        log_error_level="info",
        log_error_path=None,
        log_access_path=None,
        audit_log_path=None,
        factory=None,
        daemon="agent",
    )
    with pytest.raises(usage.UsageError, match="unknown group 'no-such-group-x'"):
        daemon.run_as(settings, service)


# --------------------------------------------------------------------------- the listening socket


@pytest_twisted.ensureDeferred
async def test_socket_accept_filter_sets_tcp_defer_accept_on_the_listening_socket():
    """socket_accept_filter = true: the bound listening socket has TCP_DEFER_ACCEPT (at least
    the socket timeout); false leaves it off."""
    seen = {}
    for flag in (True, False):
        server = ServerSettings(
            addr="127.0.0.1", port=free_port(), socket_accept_filter=flag, socket_timeout=3
        )
        svc = daemon.listening_service(reactor, server, Factory())
        svc.privilegedStartService()
        port = await svc._waitingForPort
        try:
            seen[flag] = port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
        finally:
            await port.stopListening()
    assert seen[True] >= 3 and seen[False] == 0


def test_backlog_reaches_the_listen_call():
    """backlog = N: the listen call of the TCP (IPv4 and IPv6) endpoint gets N."""
    for addr in ("127.0.0.1", "::1"):
        fake = MemoryReactor()
        server = ServerSettings(addr=addr, port=3440, backlog=17)
        daemon.listening_service(fake, server, Factory()).privilegedStartService()
        (port, _factory, backlog, interface) = fake.tcpServers[0]
        assert (port, backlog, interface) == (3440, 17, addr)


def test_process_title_without_setproctitle_is_a_warning(monkeypatch):
    """process_name without the optional setproctitle package: a warning naming the extra,
    the title left alone."""

    def missing(name: str) -> Any:
        raise ImportError(name)

    monkeypatch.setattr(daemon.importlib, "import_module", missing)
    with capturedLogs() as events:
        assert daemon.set_process_title(ServerSettings(process_name="deploy::agent:")) is None
    assert any("deploy[proctitle]" in e["log_format"] for e in events)
    assert daemon.set_process_title(ServerSettings()) is None


def test_agent_title_backlog_and_ignored_options_under_twistd(daemons, tmp_path):
    """A real agent: process_name sets the title the original showed; the kernel's listen
    queue has the configured backlog (ss); max_requests_per_child, worker_method and ipc_path
    from the ini and the command line are accepted and each logged as ignored."""
    agent = daemons.agent(
        server={
            "process_name": "deploy::agent:",
            "backlog": 17,
            "socket_accept_filter": "on",
            "max_requests_per_child": 10,
            "worker_method": "fork",
        },
        extra=["--ipc-path=memory", "--worker-method=thread"],
    )

    def title() -> str:
        return Path(f"/proc/{agent.pid}/cmdline").read_bytes().rstrip(b"\0").decode()

    assert wait_until(lambda: title() == "deploy::agent: master process" or None, 10)
    def listening() -> list[str]:
        return subprocess.run(
            ["ss", "-Hltn", f"sport = :{agent.port}"], capture_output=True, text=True, check=True
        ).stdout.split()

    # The title is set before the reactor's first turn: the connection that saw the port
    # listen may still wait in the accept queue (Recv-Q 1) for a moment.
    wait_until(lambda: listening()[:2] == ["LISTEN", "0"], 10, what="an empty accept queue")
    assert listening()[:3] == ["LISTEN", "0", "17"], listening()
    text = agent.log_text()
    for name, value in (
        ("max_requests_per_child", "10"),
        ("worker_method", "thread"),
        ("ipc_path", "memory"),
    ):
        assert f"{name} = {value} is accepted for compatibility and ignored" in text, text


# --------------------------------------------------------------------------- systemd units


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as systemd reads it: sections of (key, value), repeats kept, `\\` joins."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    values = [v for k, v in unit.get(section, []) if k == key]
    return values[-1] if values else None


def exec_start(name: str) -> list[str]:
    return shlex.split(unit_value(read_unit(UNITS / name), "Service", "ExecStart") or "")


@pytest.mark.parametrize("name", ["deploy-agent.service", "deploy-proxy.service"])
def test_unit_passes_systemd_analyze_verify(name, tmp_path):
    """systemd-analyze verify finds no error and no unknown key (ExecStart pointed at this
    machine's twistd, which the unit expects in /opt/deploy)."""
    text = (UNITS / name).read_text()
    assert "ExecStart=/opt/deploy/bin/twistd " in text
    (tmp_path / name).write_text(text.replace("/opt/deploy/bin/twistd", tool("twistd")))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert name not in done.stderr, done.stderr


@pytest.mark.parametrize("name", ["deploy-agent.service", "deploy-proxy.service"])
def test_unit_runs_twistd_in_the_foreground_and_restarts_on_failure(name):
    """twistd -n (no fork, no pid file, its log on stdout for the journal), Type=notify with a
    watchdog, reload by SIGHUP, Restart=on-failure; the agent's unit stops only twistd so
    background syncs survive a restart."""
    unit = read_unit(UNITS / name)
    argv = exec_start(name)
    assert argv[1:4] == ["--nodaemon", "--pidfile=", "--logfile=-"]
    assert argv[4] == name.removesuffix(".service")
    assert unit_value(unit, "Service", "Type") == "notify"
    assert unit_value(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit_value(unit, "Service", "WatchdogSec") == "30s"
    assert unit_value(unit, "Service", "Restart") == "on-failure"
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"
    want = "process" if name == "deploy-agent.service" else None
    assert unit_value(unit, "Service", "KillMode") == want


def test_agent_unit_hardening_leaves_its_paths_writable():
    """Under the agent unit's sandbox the original sample's allowed paths (/tmp, /home), the
    usual deploy targets, the state and log directories stay writable and shared with the
    host (no private /tmp or /home), while /usr and /etc are read-only."""
    unit = read_unit(UNITS / "deploy-agent.service")
    service = dict(unit["Service"])
    read_only = {
        "yes": ["/usr", "/boot", "/efi"],
        "full": ["/usr", "/boot", "/efi", "/etc"],
        "strict": ["/"],
    }.get(service.get("ProtectSystem", "no"), [])
    read_only += service.get("ReadOnlyPaths", "").split()
    hidden = service.get("InaccessiblePaths", "").split()
    if service.get("ProtectHome", "no") != "no":
        hidden += ["/home", "/root", "/run/user"]
    if service.get("PrivateTmp", "no") != "no":
        hidden += ["/tmp", "/var/tmp"]
    writable_again = service.get("ReadWritePaths", "").split()

    def under(path: str, roots: list[str]) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    sample = (REPO / "tests" / "data" / "config" / "original-deploy_agent.ini").read_text()
    allowed = re.findall(r"^path\[\]\s*=\s*(\S+)", sample, re.M)
    assert allowed == ["/tmp", "/home"]
    for path in [
        *allowed,
        "/srv/www",
        "/var/www",
        "/opt/app",
        "/var/lib/deploy",
        "/var/log/deploy",
    ]:
        assert not under(path, hidden), path
        assert not under(path, read_only) or under(path, writable_again), path
    assert under("/usr/bin", read_only) and under("/etc/deploy", read_only)


def test_unit_exec_start_lines_start_both_daemons(daemons, tmp_path):
    """Each unit's ExecStart, word for word but for twistd's location and the config path,
    starts its daemon: the agent answers exec, the proxy relays an order to it."""
    jobs = tmp_path / "jobs.ini"
    jobs.write_text(JOBS)
    aport, pport = free_port(), free_port()
    agent_conf = tmp_path / "deploy_agent.ini"
    agent_conf.write_text(
        agent_ini(
            host="127.0.0.1",
            port=aport,
            state=tmp_path / "state",
            allow_paths=[tmp_path],
            jobs=jobs,
        )
    )
    api = tmp_path / "api.ini"
    api.write_text("[keys]\nk1[] = g\n[servers]\ng[] = 127.0.0.1\n")
    proxy_conf = tmp_path / "deploy_proxy.ini"
    proxy_conf.write_text(
        f"[server]\naddr = 127.0.0.1\nport = {pport}\n[client]\nport = {aport}\n"
        f"[allow::hosts]\nhost[] = 127.0.0.0/8\n[api]\npath = {api}\n"
    )
    started = []
    for name, conf, port in (
        ("deploy-agent.service", agent_conf, aport),
        ("deploy-proxy.service", proxy_conf, pport),
    ):
        argv = exec_start(name)
        assert argv[-1].startswith("--path=/etc/deploy/")
        argv = [tool("twistd"), *argv[1:-1], f"--path={conf}"]
        d = ChildProcess(argv, tmp_path / f"{name}.out", cwd=tmp_path, name=name)
        daemons.started.append(d)
        started.append((d, port))
    for d, port in started:
        d.wait_listening("127.0.0.1", port)
    r = run_client(f"--hosts=127.0.0.1:{aport}", "--order=exec", "--options=service:echo,hi")
    assert r.rc == 0 and r.content(f"127.0.0.1:{aport}", "exec")["content"] == "aGkK"
    r = run_client(
        f"--hosts=127.0.0.1:{pport}",
        "--api-key=k1",
        "--args=groups:g",
        "--order=exec",
        "--options=service:echo,hi",
    )
    assert r.rc == 0, r.stdout + r.stderr
    inner = r.content(f"127.0.0.1:{pport}", "exec")["127.0.0.1"]["exec"]
    assert inner["content"]["content"] == "aGkK"
    for d, port in started:
        d.stop()
        assert not can_connect("127.0.0.1", port)


# --------------------------------------------------------------------------- logrotate


def test_logrotate_covers_the_fixed_log_names_and_not_the_hourly_ones():
    """etc/logrotate.d/deploy rotates the original's default logs, the sample configs' names
    and the audit logs, but no strftime-patterned file (one per period already); it lets the
    daemon recreate the file (nocreate, no copytruncate, no signal: the daemon reopens)."""
    text = (REPO / "etc" / "logrotate.d" / "deploy").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    brace = lines.index("{")
    globs = lines[:brace]
    directives = {line.split()[0] for line in lines[brace + 1 : lines.index("}")]}

    def rotated(path: str) -> bool:
        return any(fnmatch.fnmatch(path, g) for g in globs)

    for path in (
        logs.DEFAULT_ERROR_PATH,
        logs.DEFAULT_ACCESS_PATH,
        "/var/log/deploy/agent_error.log",
        "/var/log/deploy/proxy_access.log",
        "/var/log/deploy/agent_audit.log",
    ):
        assert rotated(path), path
    hourly = time.strftime("/var/log/deploy/agent_access.%Y%m%d%H.log")
    assert not rotated(hourly) and not rotated("/var/log/deploy/access.log.1")
    assert {"nocreate", "missingok", "delaycompress"} <= directives
    assert not directives & {"copytruncate", "postrotate", "create"}


def test_start_up_errors_are_one_line_not_a_traceback(tmp_path):
    """An unusable state directory and a port already in use each stop twistd with exit 1 and
    one line saying what is wrong, no traceback."""
    import socket as socket_module

    from tests.harness import agent_ini, free_port, tool

    busy = socket_module.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cases = {
            "state": agent_ini(
                host="127.0.0.1", port=free_port(), state=Path("/proc/nope"), allow_paths=[tmp_path]
            ),
            "port": agent_ini(
                host="127.0.0.1", port=port, state=tmp_path / "state", allow_paths=[tmp_path]
            ),
        }
        for name, text in cases.items():
            ini = tmp_path / f"{name}.ini"
            ini.write_text(text)
            out = subprocess.run(
                [
                    tool("twistd"),
                    "-n",
                    "--pidfile=",
                    "--logfile=-",
                    "deploy-agent",
                    "--path",
                    str(ini),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            both = out.stdout + out.stderr
            assert out.returncode == 1, both
            assert "Traceback" not in both, both
            expected = (
                "cannot prepare state directory /proc/nope"
                if name == "state"
                else (f"cannot listen on 127.0.0.1:{port}")
            )
            assert expected in both, both
    finally:
        busy.close()
