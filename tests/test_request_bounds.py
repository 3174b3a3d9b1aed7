"""What a request may make a real `twistd -n deploy-agent` start, and for how long (issue 12):
exec commands that leave children holding their output (point 2), dry runs against a source
that never answers (7), `%s` inside a shell string (11), inline sources the config does not
allow, directly and through a real `deploy-proxy` (12), exec arguments holding C1 controls, bidi
overrides or line separators (14). Each test sends the attack as an outsider would."""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.client import ClientOptions, Order, build_request
from deploy.process import all_processes, read_stat, signal_pid
from tests.conftest import Daemons
from tests.harness import (
    AgentProcess,
    ProxyProcess,
    RsyncDaemon,
    agent_ini,
    ask,
    comm,
    free_port,
    jail,
    make_tree,
    parsed_answer,
    raw_request,
    refused_at_start,
    wait_until,
)

TOUCH = "/usr/bin/touch" if os.path.exists("/usr/bin/touch") else "/bin/touch"
EXEC_TIMEOUT = 3  # agent A's max_process_timeout
DRY_RUN_TIMEOUT = 2  # agent C's dry_run_timeout (its max_process_timeout is 0)
API_KEY = "bounds-api-key-0000000000000000001"
JOBS = f"""\
[service]
service:touch = {TOUCH} %s
[background]
; exits at once; the sleep it started keeps its stdout
bg:left = /bin/sh -c 'sleep 60 & echo $!'
; still running at the timeout, with a child that holds its stdout too
bg:hold = /bin/sh -c 'sleep 60 & echo $!; sleep 60'
[shell]
; the safe form of `sh -c 'echo hello %s'`
shell:greet = /bin/sh -c 'echo hello "$1"' sh %s
[application]
app:true = /bin/true
"""
FAKE_SSH = """#!/bin/sh
# Stands in for ssh: records that it was called and with what, then runs the remote command
# here, as sshd would on the far side.
echo "$@" >> {log}
shift
exec /bin/sh -c "$*"
"""


@dataclass
class World:
    daemons: Daemons
    work: Path
    targets: Path
    release: Path
    rsyncd: RsyncDaemon
    hole: socket.socket  # accepts (in its backlog) and never answers
    exec_agent: AgentProcess  # A: max_process_timeout = EXEC_TIMEOUT, max_prefork = 1
    plain_agent: AgentProcess  # B: the defaults (no timeouts, no remote shell)
    sources_agent: AgentProcess  # C: dry_run_timeout, remote shell on, [allow::sources]
    proxy: ProxyProcess  # in front of B
    ssh_calls: dict[str, Path]  # agent name -> what its fake ssh recorded
    started_ticks: int

    @property
    def hole_port(self) -> int:
        port: int = self.hole.getsockname()[1]
        return port


def fake_ssh(work: Path, name: str) -> tuple[Path, Path]:
    log = work / f"ssh-calls-{name}"
    script = work / f"fake-ssh-{name}"
    script.write_text(FAKE_SSH.format(log=log))
    script.chmod(0o755)
    return script, log


@pytest.fixture(scope="module")
def world(module_daemons: Daemons) -> Iterator[World]:
    daemons = module_daemons
    work = daemons.workdir
    me = read_stat(os.getpid())
    assert me is not None
    targets, _ = jail(work)
    release = make_tree(work / "release", files=6, size=100)
    jobs = work / "jobs.ini"
    jobs.write_text(JOBS)
    rsyncd = daemons.rsyncd({"DEST": release})
    hole = socket.create_server(("127.0.0.1", 0), backlog=64)
    hole_group = {
        "dest": "127.0.0.1::DEST/",
        "src": targets / "hole",
        "option": [f"--port={hole.getsockname()[1]}", "--archive"],
    }
    calls = {}
    try:
        a = daemons.agent(
            state=work / "state-a",
            allow_paths=[targets],
            jobs=jobs,
            server={"max_process_timeout": EXEC_TIMEOUT, "max_prefork": 1},
            wait=False,
        )
        with pytest.MonkeyPatch.context() as mp:
            script, calls["plain"] = fake_ssh(work, "plain")
            mp.setenv("RSYNC_RSH", str(script))
            b = daemons.agent(
                state=work / "state-b",
                allow_paths=[targets],
                jobs=jobs,
                groups={"hole": hole_group},
                wait=False,
            )
            script, calls["sources"] = fake_ssh(work, "sources")
            mp.setenv("RSYNC_RSH", str(script))
            sources_ini = (
                agent_ini(
                    host="127.0.0.1",
                    port=free_port(),
                    state=work / "state-c",
                    allow_paths=[targets],
                    groups={"hole": hole_group},
                    server={
                        "dry_run_timeout": DRY_RUN_TIMEOUT,
                        "allow_inline_remote_shell": "true",
                    },
                )
                + "\n[allow::sources]\nsource[] = 127.0.0.1::DEST\nsource[] = localhost\n"
            )
            c_port = int(sources_ini.split("port = ")[1].split("\n")[0])
            c = daemons.agent_from_text(sources_ini, "127.0.0.1", c_port, wait=False)
        api = work / "api.ini"
        api.write_text(f"[keys]\n{API_KEY}[] = plain\n[servers]\nplain[] = 127.0.0.1\n")
        proxy_port = free_port()
        proxy_text = (
            f"[server]\naddr = 127.0.0.1\nport = {proxy_port}\n"
            f"[client]\nport = {b.port}\nthread_timeout = 30\n"
            f"[allow::hosts]\nhost[] = 127.0.0.0/8\n[api]\npath = {api}\n"
        )
        proxy = daemons.proxy(proxy_text, "127.0.0.1", proxy_port)
        for agent in (a, b, c):
            agent.wait_listening(agent.host, agent.port)
        yield World(
            daemons, work, targets, release, rsyncd, hole, a, b, c, proxy, calls, me.start_ticks
        )
    finally:
        hole.close()


def exec_content(answer: Any) -> str:
    return base64.b64decode(answer["content"]).decode()


def alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat.alive


def stop_leftover(world: World, pid: int) -> None:
    """Stop a sleep one of our exec commands left running, once proven to be that one: the pid
    it printed, a `sleep`, started after this module did."""
    stat = read_stat(pid)
    if stat is not None and stat.start_ticks >= world.started_ticks and comm(pid) == "sleep":
        signal_pid(pid, 9)


def rsync_children(agent: AgentProcess) -> list[int]:
    """The rsync processes the agent runs (dry runs: it starts them itself)."""
    return [
        s.pid for s in all_processes() if s.ppid == agent.pid and s.alive and comm(s.pid) == "rsync"
    ]


# --------------------------------------------------------------------------- point 2


def test_exec_still_running_at_the_timeout_is_stopped_with_its_children(world: World) -> None:
    """`sh -c 'sleep 60 & echo $!; sleep 60'`: answered `Process Timeout(N)!` at
    max_process_timeout; the sleep it backgrounded (holding its output) is gone too; the
    max_prefork slot (1 here) is free again at once."""
    agent = world.exec_agent
    started = time.monotonic()
    status, answer = ask(agent, "exec", "bg:hold", timeout=60)
    elapsed = time.monotonic() - started
    assert status == 200, answer
    pid = int(exec_content(answer).split()[0])
    try:
        assert answer["return"] == "false"
        assert answer["message"] == f"Process Timeout({EXEC_TIMEOUT})!"
        assert EXEC_TIMEOUT - 0.5 <= elapsed < EXEC_TIMEOUT + 15, elapsed
        wait_until(lambda: not alive(pid), 15, 0.05, "the backgrounded sleep to be stopped")
        assert ask(agent, "exec", "app:true")[1]["return"] == "true"  # not a 503
    finally:
        stop_leftover(world, pid)


def test_exec_that_exits_while_its_child_holds_the_output_is_answered_when_it_exits(
    world: World,
) -> None:
    """`sh -c 'sleep 60 & echo $!'` is answered when sh exits (before the timeout, with its
    exit status and output), its slot free at once; the sleep that kept the output is stopped
    when max_process_timeout comes."""
    agent = world.exec_agent
    status, answer = ask(agent, "exec", "bg:left", timeout=60)
    assert status == 200, answer
    pid = int(exec_content(answer).split()[0])
    try:
        assert answer["return"] == "true" and answer["exitCode"] == 0
        assert "message" not in answer  # answered before the timeout
        assert ask(agent, "exec", "app:true")[1]["return"] == "true"  # the slot is free
        wait_until(lambda: not alive(pid), EXEC_TIMEOUT + 15, 0.05, "the leftover to stop")
    finally:
        stop_leftover(world, pid)


def test_without_a_timeout_the_answer_still_comes_when_the_command_exits(world: World) -> None:
    """With max_process_timeout = 0 (the default) the same command was never answered until
    its child ended (60 s here, for ever for a daemon); now it is answered when it exits."""
    started = time.monotonic()
    status, answer = ask(world.plain_agent, "exec", "bg:left", timeout=60)
    elapsed = time.monotonic() - started
    pid = int(exec_content(answer).split()[0])
    try:
        assert status == 200 and answer["return"] == "true"
        assert elapsed < 15, elapsed
        assert alive(pid)  # no timeout: not the agent's to stop
    finally:
        stop_leftover(world, pid)


# --------------------------------------------------------------------------- point 7


def test_dry_runs_of_clients_that_hung_up_do_not_outlive_them(world: World) -> None:
    """20 status orders against a source that never answers, their clients gone: every rsync
    they started is stopped within seconds (dry_run_timeout is 300 s, max_process_timeout 0),
    and the agent serves on."""
    agent = world.plain_agent
    assert rsync_children(agent) == []
    clients = []
    for _ in range(20):
        request = build_request(Order("status", "hole"), ClientOptions(), agent.host, time.time())
        s = socket.create_connection((agent.host, agent.port), timeout=10)
        s.sendall(request)
        clients.append(s)
    try:
        wait_until(lambda: len(rsync_children(agent)) == 20, 30, 0.05, "20 dry runs")
    finally:
        for s in clients:
            s.close()
    hung_up = time.monotonic()
    wait_until(lambda: not rsync_children(agent), 20, 0.05, "the dry runs to be stopped")
    assert time.monotonic() - hung_up < 20
    status, answer = ask(agent, "exec", "app:true")
    assert status == 200 and answer["return"] == "true"


def test_dry_run_against_a_source_that_never_answers_is_bounded(world: World) -> None:
    """With max_process_timeout = 0, a status against a source that never answers is answered
    `Process Timeout(N)!` at dry_run_timeout, and its rsync is gone."""
    agent = world.sources_agent
    started = time.monotonic()
    status, answer = ask(agent, "status", "hole", timeout=60)
    elapsed = time.monotonic() - started
    assert status == 200, answer
    assert answer["return"] == "false"
    assert answer["message"] == f"Process Timeout({DRY_RUN_TIMEOUT})!"
    assert DRY_RUN_TIMEOUT - 0.5 <= elapsed < DRY_RUN_TIMEOUT + 15, elapsed
    wait_until(lambda: not rsync_children(agent), 15, 0.05, "the dry run to be gone")


# --------------------------------------------------------------------------- point 11


def test_percent_s_inside_a_shell_string_stops_twistd_naming_file_line_and_safe_form(
    world: World,
) -> None:
    """A jobs file with `/bin/sh -c 'echo hello %s'` (where `x /etc/host* ~` was globbed and
    ~-expanded) stops deploy-agent before it listens, naming the file, the line and the safe
    form."""
    jobs = world.work / "shell-jobs.ini"
    jobs.write_text("[service]\nservice:echo = /bin/echo %s\ngreet = /bin/sh -c 'echo hello %s'\n")
    port = free_port()
    ini = world.work / "shell-agent.ini"
    ini.write_text(
        agent_ini(
            host="127.0.0.1",
            port=port,
            state=world.work / "state-shell",
            allow_paths=[world.targets],
            jobs=jobs,
        )
    )
    output = refused_at_start(ini, world.work, port)
    assert f"{jobs}:3" in output, output
    assert "sh -c 'echo hello \"$1\"' sh %s" in output


def test_the_safe_form_passes_an_argument_as_one_word(world: World) -> None:
    """Through `sh -c 'echo hello "$1"' sh %s`, `x /etc/host* ~` reaches echo as it was sent:
    not split, globbed or ~-expanded."""
    status, answer = ask(world.exec_agent, "exec", "shell:greet,x /etc/host* ~")
    assert status == 200 and answer["return"] == "true", answer
    assert exec_content(answer) == "hello x /etc/host* ~\n"


# --------------------------------------------------------------------------- point 12


def test_inline_remote_shell_source_is_refused_by_default(world: World) -> None:
    """`localhost:/etc/,DIR` (rsync would run ssh as root) is 403 by default, for every order
    that resolves a target; ssh never runs and nothing is copied."""
    for source in ("localhost:/etc/", "root@localhost:/etc/", f"127.0.0.1:{world.release}/"):
        for order in ("status", "rlist", "rsync", "rkill"):
            status, body = ask(world.plain_agent, order, f"{source},{world.targets}/etc")
            assert status == 403, (order, source, body)
            assert body.startswith(f"{source} is not allowed! (")
            assert "allow_inline_remote_shell = true" in body
    assert not world.ssh_calls["plain"].exists()
    assert not (world.targets / "etc").exists()


def test_inline_remote_shell_source_is_refused_through_the_proxy(world: World) -> None:
    """The same request through deploy-proxy: the agent's 403 is that host's answer, ssh never
    runs."""
    options = f"localhost:/etc/,{world.targets}/etc"
    order = Order("status", options, args="groups:plain", api_key=API_KEY, target="api")
    request = build_request(order, ClientOptions(), world.proxy.host, time.time())
    status, answer = parsed_answer(
        raw_request(world.proxy.host, world.proxy.port, request, timeout=60)
    )
    assert status == 200, answer
    entry = answer["127.0.0.1"]["status"]
    assert str(entry["returnCode"]) == "403", entry
    assert "localhost:/etc/ is not allowed!" in entry["content"]
    assert not world.ssh_calls["plain"].exists()
    assert not (world.targets / "etc").exists()


def test_allow_sources_limits_inline_sources(world: World) -> None:
    """With [allow::sources] `127.0.0.1::DEST` and `localhost`: that module (any spelling) and
    that host pass, another module or host is 403 before rsync or ssh runs."""
    agent, rsyncd = world.sources_agent, world.rsyncd
    web = f"{world.targets}/sources-web"
    status, answer = ask(agent, "status", f"rsync://127.0.0.1:{rsyncd.port}/DEST/,{web}")
    assert status == 200 and answer["return"] == "true", answer
    assert answer["transferFilesCount"] == "6"
    for source in (
        f"rsync://127.0.0.1:{rsyncd.port}/OTHER/",
        f"rsync://127.0.0.2:{rsyncd.port}/DEST/",
        "127.0.0.3::DEST/",
        "127.0.0.2:/etc/",
    ):
        status, body = ask(agent, "status", f"{source},{web}")
        assert (status, body) == (403, f"{source} is not allowed! (it is not in [allow::sources])")
    assert not world.ssh_calls["sources"].exists()
    status, answer = ask(agent, "status", f"localhost:{world.release}/,{web}")
    assert status == 200 and answer["return"] == "true", answer
    assert world.ssh_calls["sources"].read_text().count("\n") == 1  # the switch and rule let it


def test_the_host_after_user_at_gets_the_same_checks(world: World) -> None:
    """`x@-oProxyCommand=...:path` would hand ssh an option as its host: 400 before ssh runs,
    even where remote-shell sources are allowed."""
    before = world.ssh_calls["sources"].read_text() if world.ssh_calls["sources"].exists() else ""
    for source in ("x@-oProxyCommand=touch:/etc/", "-x@localhost:/etc/", "@localhost:/etc/"):
        status, body = ask(world.sources_agent, "status", f"{source},{world.targets}/x")
        assert status == 400 and body.startswith(f"bad remote source {source!r}"), body
    after = world.ssh_calls["sources"].read_text() if world.ssh_calls["sources"].exists() else ""
    assert after == before


# --------------------------------------------------------------------------- point 14


@pytest.mark.parametrize(
    "char", ["\x85", "\x9b", "\u202a", "\u202e", "\u2066", "\u2069", "\u2028", "\u2029"]
)
def test_exec_argument_with_c1_bidi_or_line_separator_is_400_and_nothing_runs(
    world: World, char: str
) -> None:
    """C1 controls, bidi overrides/isolates and U+2028/U+2029 in an exec argument: 400 like
    other control characters, and the command never runs."""
    marker = world.work / f"marker-{ord(char):04x}"
    status, body = ask(world.exec_agent, "exec", f"service:touch,{marker}{char}x")
    assert status == 400, body
    assert f"control character (U+{ord(char):04X})" in body
    assert not list(world.work.glob(f"marker-{ord(char):04x}*"))
