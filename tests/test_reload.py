"""Reload on SIGHUP, agent and proxy: a group, a job and a key added while a sync runs, the sync
carrying on; a broken config refused with its --check-config lines, the old one kept; the log
files reopened; what changed, logged."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from deploy import logs
from deploy.config import load_agent_config, load_proxy_config
from deploy.reload import agent_changes, proxy_changes
from tests.conftest import JOBS
from tests.harness import ask, free_port, make_tree, run_client, wait_until


def test_sighup_adds_a_group_job_and_key_while_a_sync_runs(daemons, tmp_path):
    """An agent syncing a slow group gets SIGHUP with a new group and job in its files: the
    new group and job answer at once, the running sync keeps its pid and ends ok, the log names
    the change. A proxy gets SIGHUP with a new key: the key works. A broken agent config on
    the next SIGHUP is refused with its --check-config line and the agent still serves."""
    tree = make_tree(tmp_path / "tree", files=40, size=2000)
    rsyncd = daemons.rsyncd({"DEST": tree})
    targets = tmp_path / "targets"
    targets.mkdir()
    jobs = tmp_path / "jobs.ini"
    jobs.write_text(JOBS)
    groups = {"slow": rsyncd.group(targets / "slow", "--archive", "--bwlimit=4")}
    log_path = tmp_path / "logs" / "error.log"
    server = {"log_write": "true", "log_error_path": log_path, "rkill_grace": 2}
    agent = daemons.agent(groups=groups, jobs=jobs, allow_paths=[targets], server=server)
    status, body = ask(agent, "rsync", "slow")
    assert status == 200, body

    def running() -> dict:
        code, answer = ask(agent, "status", "slow")
        assert code == 200, answer
        return answer if answer.get("alreadyRsync") == "true" and answer["process"] else {}

    pids = wait_until(running, 20, what="the slow sync to run")["process"]
    groups["fast"] = rsyncd.group(targets / "fast", "--archive")
    agent.ini.write_text(agent.ini.read_text() + _group_text("fast", groups["fast"]))
    jobs.write_text(JOBS + "app:hello = /bin/echo hello %s\n")
    log_path.rename(tmp_path / "logs" / "error.log.1")  # logrotate, without copytruncate
    os.kill(agent.pid, signal.SIGHUP)
    wait_until(lambda: "groups added: fast" in agent.log_text(), 10, what="the reload's log")
    assert "jobs added: app:hello" in agent.log_text()
    code, answer = ask(agent, "status", "fast")
    assert code == 200 and answer["transferFilesCount"] == "40", answer
    code, answer = ask(agent, "exec", "app:hello")
    assert code == 200 and answer["return"] == "true", answer
    assert running()["process"] == pids
    wait_until(lambda: log_path.exists() and "reloaded" in log_path.read_text(), 10)

    agent.ini.write_text(agent.ini.read_text() + "[allow::hosts]\nhost[] = 10.0.0.0/99\n")
    os.kill(agent.pid, signal.SIGHUP)
    wait_until(lambda: "refused, keeping the running config" in agent.log_text(), 10)
    assert "is not a valid network" in agent.log_text()
    assert ask(agent, "status", "fast")[0] == 200
    assert running()["process"] == pids
    code, answer = ask(agent, "rkill", "slow")
    assert code == 200

    api = tmp_path / "api.ini"
    api.write_text("[keys]\nk1[] = g\n[servers]\ng[] = 127.0.0.1\n")
    pport = free_port()
    proxy = daemons.proxy(
        f"[server]\naddr = 127.0.0.1\nport = {pport}\n[client]\nport = {agent.port}\n"
        f"[allow::hosts]\nhost[] = 127.0.0.0/8\n[api]\npath = {api}\n",
        "127.0.0.1",
        pport,
    )
    order = ["--args=groups:g", "--order=exec", "--options=service:echo,hi"]
    assert run_client(f"--hosts=127.0.0.1:{pport}", "--api-key=k2", *order).rc != 0
    api.write_text("[keys]\nk1[] = g\nk2[] = g\n[servers]\ng[] = 127.0.0.1\n")
    os.kill(proxy.pid, signal.SIGHUP)
    wait_until(lambda: "keys added: " in proxy.log_text(), 10, what="the proxy's reload")
    assert "k2" not in proxy.log_text().split("keys added: ")[1].splitlines()[0]
    r = run_client(f"--hosts=127.0.0.1:{pport}", "--api-key=k2", *order)
    assert r.rc == 0, r.stdout + r.stderr


def _group_text(name: str, keys: dict) -> str:
    out = [f"\n[rsync::group::{name}]"]
    for key, value in keys.items():
        values = value if isinstance(value, list) else [value]
        out += [f"{key}[] = {v}" if isinstance(value, list) else f"{key} = {v}" for v in values]
    return "\n".join(out) + "\n"


def test_changes_are_described_without_secrets(tmp_path):
    """Groups and jobs added, removed and changed by name; keys by their sha256 prefix only;
    settings a running daemon cannot take said to wait for a restart."""
    jobs = tmp_path / "jobs.ini"
    jobs.write_text("a = /bin/true\nb = /bin/true\n")
    path = tmp_path / "a.ini"
    path.write_text(
        f"[server]\nport = 1\n[rsync::group::x]\ndest = h::M/\nsrc = /t/x\n[jobs]\npath = {jobs}\n"
    )
    old = load_agent_config(str(path))
    jobs.write_text("a = /bin/false\nc = /bin/true\n")
    path.write_text(
        f"[server]\nport = 2\nmax_prefork = 3\n[rsync::group::y]\ndest = h::M/\nsrc = /t/y\n"
        f"[jobs]\npath = {jobs}\n"
    )
    new = load_agent_config(str(path))
    assert agent_changes(old, new) == [
        "groups added: y",
        "groups removed: x",
        "jobs added: c",
        "jobs removed: b",
        "jobs changed: a",
        "[server] max_prefork changed",
        "[server] port changed but take effect at the next restart",
    ]
    api = tmp_path / "api.ini"
    api.write_text("[keys]\nsecret1[] = g\n[servers]\ng[] = h1\n")
    proxy = tmp_path / "p.ini"
    proxy.write_text(f"[api]\npath = {api}\n")
    before = load_proxy_config(str(proxy))
    api.write_text("[keys]\nsecret2[] = g\n[servers]\ng[] = h2\n")
    after = load_proxy_config(str(proxy))
    described = proxy_changes(before, after)
    assert described == [
        f"keys added: {logs.api_key_id('secret2')}",
        f"keys removed: {logs.api_key_id('secret1')}",
        "groups changed: g",
    ]


def test_log_files_reopen_under_their_name(tmp_path):
    """LogService.reopen: the next line goes to a new file under the old name, not to the
    file logrotate moved away."""
    access = tmp_path / "access.log"
    factory = type("F", (), {"observers": []})()
    service = logs.build_log_service(
        log_write=True,
        log_error_level="info",
        log_error_path=str(tmp_path / "error.log"),
        log_access_path=str(access),
        audit_log_path=None,
        factory=factory,
        daemon="agent",
    )
    service.startService()
    try:
        assert service._access is not None
        service._access.destination.write("one\n")
        access.rename(tmp_path / "access.log.1")
        service.reopen()
        service._access.destination.write("two\n")
        assert access.read_text() == "two\n"
        assert Path(tmp_path / "access.log.1").read_text() == "one\n"
    finally:
        service.stopService()
