"""End to end, every order and every error case of the agent slice: a real rsync daemon, a real
`twistd -n deploy-agent` and the real `deploy-client` (or raw bytes where the client cannot
say what the test needs). One agent serves the whole module; each test uses its own group and
target directory, so no test depends on another's leftovers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import deploy
from deploy.auth import sign_request
from tests.conftest import JOBS, Daemons
from tests.harness import (
    AgentClient,
    AgentProcess,
    ClientRun,
    RsyncDaemon,
    agent_ini,
    can_connect,
    comm,
    free_port,
    jail,
    legacy_request,
    make_tree,
    parse_response,
    raw_request,
    refused_at_start,
    run_client,
    tool,
    wait_until,
)

TOUCH = shutil.which("touch") or "/usr/bin/touch"
SLOW_BYTES = 64 * 1024 * 1024  # at --bwlimit=100 (KiB/s) a sync takes minutes: time to look at it
ODD_NAMES = [
    b'q"uote',
    b"back\\slash",
    b"new\nline",
    b"bin\xffname",
    b"with space",
    b"sub dir/in 'x'",
]
ODD_SHOWN = ['q"uote', "back\\slash", "new\nline", "bin\\#377name", "with space", "sub dir/in 'x'"]


@dataclass
class Env(AgentClient):
    daemons: Daemons
    work: Path
    tree: Path
    targets: Path
    outside: Path
    rsyncd: RsyncDaemon
    agent: AgentProcess
    down_port: int

    def order(self, order: str, options: str, *args: str) -> tuple[ClientRun, Any, float]:
        """Run one order through deploy-client: (run, the agent's answer, seconds it took)."""
        started = time.monotonic()
        run = self.client(f"--order={order}", f"--options={options}", *args)
        elapsed = time.monotonic() - started
        return run, run.content(self.agent.address, order), elapsed

    def web_agent(self, host: str, allow_hosts: tuple[str, ...]) -> AgentProcess:
        """Another agent, on `host`, with only the `web` group, serving `allow_hosts`."""
        return self.daemons.agent(
            host,
            state=self.work / f"state-{host}",
            allow_paths=[self.targets],
            groups={"web": {"dest": self.rsyncd.url("DEST"), "src": self.targets / "web"}},
            allow_hosts=allow_hosts,
        )

    def raw(self, data: bytes, host: str | None = None, port: int | None = None) -> bytes:
        return raw_request(host or self.agent.host, port or self.agent.port, data)

    def src(self, group: str) -> str:
        return str(self.targets / group)

    def checksum(self, group: str, dest: str | None = None) -> str:
        dest = dest or self.rsyncd.url("DEST")
        return hashlib.md5((dest + self.src(group)).encode()).hexdigest()


def signed_request(method: str, target: str, body: bytes = b"", key: str = "65535") -> bytes:
    """A request signed as deploy-client signs, for what the client cannot send (GET, `+`)."""
    head = [f"{method} {target} HTTP/1.1", "Connection: close"]
    if method == "POST":
        head.append(f"Content-Length: {len(body)}")
    head.append("Authorization: " + sign_request(key, method, target, body, now=time.time()))
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def answer_of(raw: bytes) -> tuple[int, str, bytes]:
    status, headers, body = parse_response(raw)
    return status, headers.get("content-type", ""), body


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def odd_tree(root: Path) -> Path:
    for name in ODD_NAMES:
        path = os.path.join(os.fsencode(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"odd\n")
    return root


def slow_tree(root: Path) -> Path:
    root.mkdir(parents=True)
    with open(root / "big.bin", "wb") as f:
        f.truncate(SLOW_BYTES)  # sparse: costs nothing to make, rsync still sends every byte
    return root


@pytest.fixture(scope="module")
def env(module_daemons: Daemons) -> Env:
    daemons = module_daemons
    work = daemons.workdir
    tree = make_tree(work / "tree", files=40, size=2000)
    odd = odd_tree(work / "odd")
    slow = slow_tree(work / "slow")
    targets, outside = jail(work)
    # a target holding 3 files the source does not have and one that differs
    deletes = targets / "deletes"
    subprocess.run(["rsync", "-a", f"{tree}/", f"{deletes}/"], check=True)
    (deletes / "extra").mkdir()
    for i in (1, 2, 3):
        (deletes / "extra" / f"junk{i}.txt").write_text("junk\n")
    (deletes / "d00" / "f00000.dat").write_bytes(b"changed")
    jobs = work / "deploy_agent_exec.ini"
    jobs.write_text(JOBS + f"service:touch           =   {TOUCH} %s\n")
    rsyncd = daemons.rsyncd({"DEST": tree, "ODD": odd, "SLOW": slow})
    base = ["--archive", "--delete", "--force"]
    down_port = free_port()
    dest = rsyncd.url("DEST")

    def group(src: str, module: str = "DEST", *extra: str) -> dict[str, Any]:
        return rsyncd.group(targets / src, *base, *extra, module=module)

    groups = {
        "web": group("web"),
        "websync": group("websync"),
        "deletes": group("deletes"),
        "odd": group("odd", "ODD"),
        "webslow": group("webslow", "SLOW", "--bwlimit=100"),
        "webkill": group("webkill", "SLOW", "--bwlimit=100"),
        "weburl": {
            "dest": f"rsync://{rsyncd.host}:{rsyncd.port}/DEST/",
            "src": targets / "weburl",
        },
        "down": {
            "dest": dest,
            "src": targets / "down",
            "option": [f"--port={down_port}", *base],
        },
        "badpath": rsyncd.group(outside / "web"),
    }
    agent = daemons.agent(
        groups=groups,
        jobs=jobs,
        state=work / "state",
        allow_paths=[targets],
        server={"rkill_grace": 2},
    )
    return Env(daemons, work, tree, targets, outside, rsyncd, agent, down_port)


@pytest.fixture(autouse=True)
def agent_survives(env: Env) -> Iterator[None]:
    """Whatever a test sends, the agent is still running afterwards."""
    yield
    assert env.agent.proc.poll() is None, f"the agent died:\n{env.agent.log_text()}"


# --------------------------------------------------------------------------- status / rlist


def test_status_counts_match_the_tree(env: Env) -> None:
    """status of a never-synced target: what a sync would move, numbers as strings."""
    run, content, _ = env.order("status", "web")
    assert run.rc == 0, run.stdout + run.stderr
    assert content == {
        "return": "true",
        "alreadyRsync": "false",
        "transferFilesCount": "40",
        "transferFilesSize": "80000",
        "transferDeleteCount": "0",
        "agentVersion": deploy.__version__,
    }


def test_status_following_a_run_skips_the_dry_run(env: Env) -> None:
    """status naming a run (`run=ID`, what deploy sends while it follows its sync) only says
    whether a sync runs and how the last one ended: no dry run, so no transfer counts."""
    raw = env.raw(signed_request("POST", "/agent/status", b"options=web&run=r-1"))
    status, _, body = answer_of(raw)
    assert status == 200
    content = json.loads(body)
    assert content["return"] == "true" and content["alreadyRsync"] == "false"
    assert "transferFilesCount" not in content


def test_rlist_lists_files_created_directory_first(env: Env) -> None:
    """rlist: `created directory SRC` first, then every file and no directory; no deletes."""
    run, content, _ = env.order("rlist", "web")
    assert run.rc == 0
    new = content["transferNewFiles"]
    assert new[0] == f"created directory {env.src('web')}"
    expected = {str(p.relative_to(env.tree)) for p in env.tree.rglob("*") if p.is_file()}
    assert len(expected) == 40
    assert sorted(new[1:]) == sorted(expected)
    assert content["transferDeleteFiles"] == []
    assert (content["transferFilesCount"], content["transferFilesSize"]) == ("40", "80000")
    assert content["return"] == "true"


def test_rlist_lists_files_to_delete(env: Env) -> None:
    """rlist lists extra files (not their directory) to delete and the changed file as new."""
    _, content, _ = env.order("rlist", "deletes")
    assert content["transferNewFiles"] == ["d00/f00000.dat"]
    assert content["transferDeleteFiles"] == [
        "extra/junk3.txt",
        "extra/junk2.txt",
        "extra/junk1.txt",
    ]
    assert content["transferFilesCount"] == "1"
    assert (env.targets / "deletes" / "extra" / "junk1.txt").exists()  # a dry run only


def test_rlist_awkward_names_are_valid_json(env: Env) -> None:
    """Names with `"`, `\\`, newline, non-UTF-8 byte and spaces come back as valid JSON."""
    run, content, _ = env.order("rlist", "odd")
    assert run.rc == 0, run.stdout + run.stderr
    files = content["transferNewFiles"][1:]
    assert sorted(files) == sorted(ODD_SHOWN)
    assert content["transferFilesCount"] == str(len(ODD_NAMES))


def test_status_with_rsync_url_dest(env: Env) -> None:
    """A group dest `rsync://host:port/module/` reaches the daemon (the old agent squashed `//`)."""
    run, content, _ = env.order("status", "weburl")
    assert run.rc == 0, run.stdout
    assert (content["return"], content["transferFilesCount"]) == ("true", "40")


def test_inline_rsync_url_target(env: Env) -> None:
    """An inline `rsync://host:port/MODULE/,/path` target works like a group."""
    source = f"rsync://{env.rsyncd.host}:{env.rsyncd.port}/DEST/"
    _, content, _ = env.order("status", f"{source},{env.src('inline')}")
    assert (content["return"], content["transferFilesCount"]) == ("true", "40")


def test_inline_host_module_target(env: Env) -> None:
    """Inline `HOST::MODULE/,/path` goes to rsync as a daemon source (port 873: refused here)."""
    assert not can_connect("127.0.0.1", 873), "this test needs nothing on 127.0.0.1:873"
    run, content, elapsed = env.order("status", f"127.0.0.1::DEST/,{env.src('adhoc')}")
    assert run.entry(env.agent.address, "status")["returnCode"] == "200"
    assert content["return"] == "false"
    assert "failed to connect to 127.0.0.1" in base64.b64decode(content["content"]).decode()
    assert elapsed < 10


# --------------------------------------------------------------------------- rsync / rkill


def test_rsync_starts_in_background_and_completes(env: Env) -> None:
    """rsync answers checksum = md5hex(dest+src); the sync ends ok and status shows lastRsync."""
    run, content, _ = env.order("rsync", "websync")
    assert run.rc == 0
    # every run has its own id (issue 13): what --wait and deploy follow
    run_id = content.get("runId")
    assert isinstance(run_id, str) and len(run_id) == 32
    assert content == {"checksum": env.checksum("websync"), "return": "true", "runId": run_id}

    def finished() -> Any:
        c = env.order("status", "websync")[1]
        return c if c.get("lastRsync") else None

    status = wait_until(finished, 30, 0.2, "the sync to end")
    assert status["lastRsync"]["outcome"] == "ok"
    assert status["lastRsync"]["checksum"] == env.checksum("websync")
    assert status["lastRsync"]["runId"] == run_id
    assert status["transferFilesCount"] == "0"
    copied = sorted(
        p.relative_to(env.targets / "websync") for p in (env.targets / "websync").rglob("*.dat")
    )
    assert copied == sorted(p.relative_to(env.tree) for p in env.tree.rglob("*.dat"))


@pytest.fixture(scope="module")
def slow_sync(env: Env) -> tuple[Any, float]:
    """A sync of `webslow` that keeps running for minutes (bwlimit), started once."""
    _, content, elapsed = env.order("rsync", "webslow")
    return content, elapsed


def test_rsync_answers_at_once(env: Env, slow_sync: tuple[Any, float]) -> None:
    """rsync of a minutes-long sync answers at once with its checksum (the old agent blocked)."""
    content, elapsed = slow_sync
    assert content == {
        "checksum": env.checksum("webslow", env.rsyncd.url("SLOW")),
        "return": "true",
        "runId": content["runId"],  # every run has its own id (issue 13)
    }
    assert elapsed < 8


def running_pids(env: Env, group: str) -> list[int]:
    content = env.order("status", group)[1]
    if content.get("alreadyRsync") != "true":
        return []
    return [int(p) for p in content["process"]]


def test_rsync_while_running_answers_already(env: Env, slow_sync: tuple[Any, float]) -> None:
    """A second rsync of a running target starts nothing: alreadyRsync "true" and its pids."""
    wait_until(lambda: running_pids(env, "webslow"), 20, 0.2, "rsync pids")
    run, content, elapsed = env.order("rsync", "webslow")
    assert run.rc == 0
    assert content["alreadyRsync"] == "true" and content["return"] == "true"
    pids = [int(p) for p in content["process"]]
    assert pids and all(isinstance(p, str) for p in content["process"])
    assert all(comm(p) == "rsync" for p in pids), [comm(p) for p in pids]
    assert elapsed < 8


def test_status_while_running(env: Env, slow_sync: tuple[Any, float]) -> None:
    """status of a running target: alreadyRsync "true" with the rsync pids, no dry run."""
    pids = wait_until(lambda: running_pids(env, "webslow"), 20, 0.2, "rsync pids")
    assert all(alive(p) and comm(p) == "rsync" for p in pids)
    content = env.order("status", "webslow")[1]
    assert content["return"] == "true"
    assert sorted(int(p) for p in content["process"]) == sorted(pids)


def test_rkill_stops_every_rsync_process(env: Env) -> None:
    """rkill answers the running pids, which are then gone; the sync is recorded as killed."""
    env.order("rsync", "webkill")
    pids = wait_until(lambda: running_pids(env, "webkill"), 20, 0.2, "rsync pids")
    run, content, elapsed = env.order("rkill", "webkill")
    assert run.rc == 0 and elapsed < 8
    assert content["return"] == "true"
    assert sorted(int(p) for p in content["process"]) == sorted(pids)
    wait_until(lambda: not any(alive(p) for p in pids), 15, 0.1, "the rsync processes to go")
    status = wait_until(lambda: env.order("status", "webkill")[1].get("lastRsync"), 15, 0.2)
    assert status["outcome"] == "killed"
    assert env.order("rkill", "webkill")[1] == {"return": "true", "process": []}


def test_rkill_with_nothing_running(env: Env) -> None:
    """rkill of an idle target answers an empty process list."""
    run, content, _ = env.order("rkill", "web")
    assert run.rc == 0
    assert content == {"return": "true", "process": []}


def test_rkill_unknown_group_is_400_at_once(env: Env) -> None:
    """rkill of an unknown group answers 400 at once (the old agent never answered)."""
    run, content, elapsed = env.order("rkill", "nosuchgroup")
    assert run.entry(env.agent.address, "rkill")["returnCode"] == "400"
    assert content == "unknown group 'nosuchgroup': empty value in options!"
    assert run.rc == 2
    assert elapsed < 8


@pytest.mark.parametrize("order", ["status", "rlist", "rsync"])
def test_rsync_daemon_down_answers_false_with_rsyncs_message(env: Env, order: str) -> None:
    """With rsyncd down, status/rlist/rsync answer at once: return "false" + rsync's message."""
    run, content, elapsed = env.order(order, "down")
    assert run.entry(env.agent.address, order)["returnCode"] == "200"
    assert content["return"] == "false"
    assert "Connection refused" in content["message"]
    assert "Connection refused" in base64.b64decode(content["content"]).decode()
    assert run.rc == 2
    assert elapsed < 10


# --------------------------------------------------------------------------- allow::paths


@pytest.mark.parametrize("order", ["status", "rlist", "rsync"])
def test_dotdot_out_of_allowed_paths_is_403(env: Env, order: str) -> None:
    """`/allowed/../elsewhere` is refused with 403 `<src> is not allowed!`."""
    src = f"{env.targets}/../outside/web"
    run, content, _ = env.order(order, f"{env.rsyncd.url('DEST')},{src}")
    assert run.entry(env.agent.address, order)["returnCode"] == "403"
    assert run.entry(env.agent.address, order)["returnString"] == "Permission Denied"
    assert content == f"{src} is not allowed!"
    assert not (env.outside / "web").exists()


def test_symlink_out_of_allowed_paths_is_403(env: Env) -> None:
    """A path that leaves allow::paths through a symlink is refused with 403."""
    src = f"{env.targets}/link/web"
    run, content, _ = env.order("rsync", f"{env.rsyncd.url('DEST')},{src}")
    assert run.entry(env.agent.address, "rsync")["returnCode"] == "403"
    assert content == f"{src} is not allowed!"
    assert not (env.outside / "web").exists()


def test_group_outside_allowed_paths_is_403(env: Env) -> None:
    """A group whose src is outside allow::paths is refused like an inline one."""
    run, content, _ = env.order("status", "badpath")
    assert run.entry(env.agent.address, "status")["returnCode"] == "403"
    assert content == f"{env.outside}/web is not allowed!"


# --------------------------------------------------------------------------- allow::hosts


def test_allow_hosts_refuses_the_clients_address(env: Env) -> None:
    """Only 127.0.0.2 allowed: deploy-client (source 127.0.0.1) gets 403, 127.0.0.2 is served."""
    agent = env.web_agent("127.0.0.2", allow_hosts=("127.0.0.2",))
    run = run_client(f"--hosts={agent.address}", "--order=rkill", "--options=web")
    entry = run.entry(agent.address, "rkill")
    assert entry["returnCode"] == "403"
    assert entry["content"] == "127.0.0.1 is not allowed!"
    assert run.rc == 2
    with socket.create_connection((agent.host, agent.port), source_address=("127.0.0.2", 0)) as s:
        s.sendall(signed_request("POST", "/agent/rkill", b"options=web"))
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert answer_of(raw)[0] == 200
    agent.stop()


def test_ipv6_agent_and_allow_list(env: Env) -> None:
    """An agent listening on ::1 with `host[] = ::1` serves deploy-client over IPv6."""
    agent = env.web_agent("::1", allow_hosts=("::1",))
    address = f"[::1]:{agent.port}"
    run = run_client(f"--hosts={address}", "--order=rkill", "--options=web")
    assert run.content(address, "rkill") == {"return": "true", "process": []}
    agent.stop()


# --------------------------------------------------------------------------- exec


def test_exec_ok(env: Env) -> None:
    """exec runs the jobs-file command: content and command base64, return "true"."""
    run, content, _ = env.order("exec", "service:echo,hello")
    assert run.rc == 0
    assert content["return"] == "true"
    assert base64.b64decode(content["content"]) == b"hello\n"
    assert base64.b64decode(content["command"]).decode() == "/bin/echo hello"


def test_exec_nonzero_exit(env: Env) -> None:
    """A command exiting non-zero answers return "false" (and the client exits 2)."""
    run, content, _ = env.order("exec", "service:false,x")
    assert content["return"] == "false"
    assert content["exitCode"] == 1
    assert run.rc == 2


def test_exec_plus_sign_is_a_space(env: Env) -> None:
    """A `+` in the form body decodes to a space: `1+1` runs `echo '1 1'`."""
    raw = env.raw(signed_request("POST", "/agent/exec", b"options=service:echo,1+1&args="))
    status, ctype, body = answer_of(raw)
    assert (status, ctype) == (200, "application/json; charset=utf-8")
    assert base64.b64decode(json.loads(body)["content"]) == b"1 1\n"


@pytest.mark.parametrize("name", [".*", "service:.*", "service:ech"])
def test_exec_name_is_not_a_pattern(env: Env, name: str) -> None:
    """`options=.*,hi` is an unknown name (400), not every command (the old agent ran one)."""
    run, content, _ = env.order("exec", f"{name},hi")
    assert run.entry(env.agent.address, "exec")["returnCode"] == "400"
    assert content == f"exec[{name}] not found!"


def test_exec_newline_injection_is_refused_and_nothing_runs(env: Env) -> None:
    """`%0a` in an argument is refused with 400 and no command runs at all."""
    marker = env.work / "injected-a"
    second = env.work / "injected-b"
    body = f"options=service:touch,{marker}%0a{second}&args=".encode()
    status, _, text = answer_of(env.raw(signed_request("POST", "/agent/exec", body)))
    assert status == 400
    assert b"control character" in text
    assert not marker.exists() and not second.exists()
    assert not list(env.work.glob("injected*"))


def test_exec_leading_dash_is_refused_and_nothing_runs(env: Env) -> None:
    """An argument starting with `-` is refused with 400 before anything runs."""
    marker = env.work / "dash-marker"
    run, content, _ = env.order("exec", f"service:touch,{marker},-a")
    assert run.entry(env.agent.address, "exec")["returnCode"] == "400"
    assert "may not start with '-'" in content
    assert not marker.exists()
    run, content, _ = env.order("exec", f"service:touch,{marker}")  # the same, valid: it runs
    assert content["return"] == "true" and marker.exists()


# --------------------------------------------------------------------------- auth


def test_wrong_key_is_401(env: Env) -> None:
    """A client with another key gets 401 Unauthorized."""
    run, _, _ = env.order("status", "web", "--key-cipher=not-the-key")
    entry = run.entry(env.agent.address, "status")
    assert (entry["returnCode"], entry["returnString"]) == ("401", "Unauthorized")
    assert run.rc == 2


def capture_client_request(*args: str) -> bytes:
    """The exact bytes deploy-client sends, caught by a listener that then answers `{}`."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(30)
    caught: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += conn.recv(65536)
            caught.append(head + b"\r\n\r\n" + body)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        run_client(f"--hosts=127.0.0.1:{server.getsockname()[1]}", *args)
        thread.join(30)
    finally:
        server.close()
    assert caught, "deploy-client sent nothing"
    return caught[0]


def test_replayed_signed_request_is_401(env: Env) -> None:
    """deploy-client's signed request sent a second time is refused as a replay."""
    raw = capture_client_request("--order=rkill", "--options=web")
    assert b"Authorization: Deploy-HMAC-SHA256" in raw
    first = answer_of(env.raw(raw))
    assert first[0] == 200, first
    status, _, body = answer_of(env.raw(raw))
    assert status == 401
    assert b"nonce" in body.lower() or b"replay" in body.lower()


def test_legacy_auth_key_refused_by_default(env: Env) -> None:
    """The original's one-time auth_key is refused unless the agent sets legacy_auth."""
    run, content, _ = env.order("rkill", "web", "--legacy-auth")
    assert run.entry(env.agent.address, "rkill")["returnCode"] == "401"
    assert "legacy_auth" in content
    status, _, _ = answer_of(env.raw(legacy_request("agent-rkill-not-running")))
    assert status == 401


# --------------------------------------------------------------------------- wire, end to end


def test_get_with_a_query_string(env: Env) -> None:
    """A signed GET with the fields in its query string is served like a POST."""
    status, ctype, body = answer_of(env.raw(signed_request("GET", "/agent/rkill?options=web")))
    assert (status, ctype) == (200, "application/json; charset=utf-8")
    assert b'"process"' in body


def test_content_length_zero_answers_at_once(env: Env) -> None:
    """`Content-Length: 0` is answered at once, not after socket_timeout (the old agent stalled)."""
    started = time.monotonic()
    raw = env.raw(b"POST /agent/status HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert answer_of(raw)[0] == 401
    assert time.monotonic() - started < 2


def test_agent_keeps_serving_after_bad_requests(env: Env) -> None:
    """Garbage, oversized and cut requests each get their 4xx and the agent keeps serving."""
    bad = [
        (b"HELLO\r\n\r\n", 405),
        (b"PUT /agent/status HTTP/1.1\r\n\r\n", 405),
        (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 400),
        (b"POST /agent/status HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", 431),
        (b"POST /agent/status HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
        (b"POST /agent/status HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST /agent/status HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
        (b"POST /agent/status HTTP/1.1\r\n\r\n", 411),
        (b"POST /agent/status HTTP/1.1\r\nContent-Length: 9\r\n\r\noptions=\xff", 400),
        (b"POST /agent/nosuch HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 404),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n", 405),
    ]
    for data, expected in bad:
        status = answer_of(env.raw(data))[0]
        assert status == expected, (data[:60], status)
    for cut in (b"POST /agent/status HTTP/1.1\r\nContent-Le", b""):
        with socket.create_connection((env.agent.host, env.agent.port)) as s:
            s.sendall(cut)  # then hang up mid-request
    run, content, _ = env.order("rkill", "web")
    assert content == {"return": "true", "process": []}


# --------------------------------------------------------------------------- daemon


@pytest.fixture(scope="module")
def cmdline_agent(env: Env) -> tuple[AgentProcess, int]:
    """An agent whose config says one thing and whose command line says another."""
    config_port = free_port()
    cli_port = free_port()
    text = agent_ini(
        host="127.0.0.1",
        port=config_port,
        state=env.work / "state-cli",
        allow_paths=[env.targets],
        groups={"web": {"dest": env.rsyncd.url("DEST"), "src": env.targets / "web"}},
        jobs=env.work / "deploy_agent_exec.ini",
        server={"max_process_timeout": 60, "legacy_auth": "false"},
    )
    agent = env.daemons.agent_from_text(
        text,
        "127.0.0.1",
        cli_port,
        extra=[f"--port={cli_port}", "--max-process-timeout=1", "--legacy-auth"],
    )
    return agent, config_port


def test_command_line_beats_config(cmdline_agent: tuple[AgentProcess, int]) -> None:
    """--port on the command line wins over the file's port; --legacy-auth over its false."""
    agent, config_port = cmdline_agent
    assert can_connect(agent.host, agent.port)
    assert not can_connect(agent.host, config_port)
    run = run_client(f"--hosts={agent.address}", "--order=rkill", "--options=web", "--legacy-auth")
    assert run.content(agent.address, "rkill") == {"return": "true", "process": []}


def test_max_process_timeout_stops_exec(cmdline_agent: tuple[AgentProcess, int]) -> None:
    """`service:sleep,30` under max_process_timeout = 1 is stopped quickly with return "false"."""
    agent, _ = cmdline_agent
    started = time.monotonic()
    run = run_client(f"--hosts={agent.address}", "--order=exec", "--options=service:sleep,30")
    elapsed = time.monotonic() - started
    content = run.content(agent.address, "exec")
    assert content["return"] == "false"
    assert content["message"] == "Process Timeout(1)!"
    assert run.rc == 2
    assert 1 <= elapsed < 10


def test_config_error_stops_twistd_before_listening(env: Env) -> None:
    """A config error names file:line and twistd exits non-zero without listening."""
    port = free_port()
    ini = env.work / "broken.ini"
    ini.write_text(f"[server]\naddr = 127.0.0.1\nport = {port}\nsocket_timeout = soon\n")
    output = refused_at_start(ini, env.work, port)
    assert f"{ini}:4" in output, output
    assert "socket_timeout" in output


def test_missing_config_file_is_an_error(env: Env) -> None:
    """A --path that does not exist is named in the error and twistd exits non-zero."""
    missing = env.work / "missing.ini"
    proc = subprocess.run(
        [tool("twistd"), "-n", "--pidfile=", "deploy-agent", "--path", str(missing)],
        capture_output=True,
        timeout=60,
        cwd=env.work,
    )
    assert proc.returncode != 0
    assert str(missing) in (proc.stdout + proc.stderr).decode()


def test_twistd_help_lists_deploy_agent() -> None:
    """`twistd --help` lists the deploy-agent plugin, and its own --help the original options."""
    out = subprocess.run([tool("twistd"), "--help"], capture_output=True, timeout=60).stdout
    assert b"deploy-agent" in out
    out = subprocess.run(
        [tool("twistd"), "deploy-agent", "--help"], capture_output=True, timeout=60
    ).stdout.decode()
    for option in (
        "--path",
        "--user",
        "--group",
        "--addr",
        "--port",
        "--backlog",
        "--max-prefork",
        "--max-requests-per-child",
        "--max-process-timeout",
        "--socket-timeout",
        "--socket-accept-filter",
        "--log-write",
        "--log-error-level",
        "--log-error-path",
        "--log-access-path",
        "--key-cipher",
        "--ssl-private-key",
        "--debug",
    ):
        assert option in out, option
