"""Replays the original system's captured agent requests (tests/data/wire) against a real agent
configured like the capture's (tests/data/config/peer-agent.ini, with `legacy_auth = true` so the
original client's one-time key is accepted), and compares our answers with the captured ones:
status line, Content-Type, and the JSON keys with their value types (new keys may be added).
Each "do NOT reproduce" row of INDEX.md gets its safe answer instead."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemons
from tests.harness import (
    DATA,
    AgentProcess,
    RsyncDaemon,
    captured_response,
    free_port,
    legacy_request,
    make_tree,
    parse_response,
    raw_request,
    wait_until,
)

PEER_TARGETS = "/srv/peer/targets"
SLOW_BYTES = 64 * 1024 * 1024


@dataclass
class Peer:
    work: Path
    tree: Path
    targets: Path
    rsyncd: RsyncDaemon
    agent: AgentProcess

    def send(self, name: str, options: str | None = None, key: str = "65535") -> bytes:
        """The captured request `name` with a fresh auth_key (made with `key`), the capture's
        target paths moved to ours, and optionally other options."""
        replace = {PEER_TARGETS: str(self.targets)}
        request = legacy_request(name, replace, key=key)
        if options is not None:
            head, _, body = request.partition(b"\r\n\r\n")
            fields = [
                f"options={options}" if f.startswith("options=") else f
                for f in body.decode().split("&")
            ]
            request = legacy_request_from(head, "&".join(fields).encode())
        return raw_request(self.agent.host, self.agent.port, request)

    def answer(self, name: str, options: str | None = None) -> Any:
        status, _, body = parse_response(self.send(name, options))
        assert status == 200, body
        return json.loads(body)

    def pids(self, group: str) -> list[str]:
        content = self.answer("agent-status-in-sync", group)
        return content["process"] if content.get("alreadyRsync") == "true" else []


def legacy_request_from(head: bytes, body: bytes) -> bytes:
    lines = [
        f"Content-Length: {len(body)}".encode()
        if line.lower().startswith(b"content-length:")
        else line
        for line in head.split(b"\r\n")
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def peer_config(work: Path, targets: Path, jobs: Path, rsyncd: RsyncDaemon, port: int) -> str:
    """peer-agent.ini with our ports and directories; webslow reads a big, slowly sent file."""
    text = (DATA / "config" / "peer-agent.ini").read_text()
    for old, new in (
        ("port                    = 3440", f"port                    = {port}"),
        ("/srv/peer/logs", str(work / "logs")),
        ("/srv/peer/conf/deploy_agent_exec.ini", str(jobs)),
        (PEER_TARGETS, str(targets)),
        ("--port=8730", f"--port={rsyncd.port}"),
        ("127.0.0.1:8730", f"127.0.0.1:{rsyncd.port}"),
        (
            f"dest            = 127.0.0.1::DEST/\nsrc             = {targets}/webslow",
            f"dest            = 127.0.0.1::SLOW/\nsrc             = {targets}/webslow",
        ),
        ("--bwlimit=2000", "--bwlimit=100"),
        (
            "[allow::hosts]",
            f"legacy_auth = true\nstate_path = {work / 'state'}\nrkill_grace = 2\n\n[allow::hosts]",
        ),
    ):
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def peer(module_daemons: Daemons) -> Peer:
    daemons = module_daemons
    work = daemons.workdir
    # as many files as the capture: counts above 999 test rsync's thousands separators
    tree = make_tree(work / "tree", files=10_000, size=100, dirs=100)
    slow = work / "slow"
    slow.mkdir()
    with open(slow / "big.bin", "wb") as f:
        f.truncate(SLOW_BYTES)
    targets = work / "targets"
    targets.mkdir()
    (work / "logs").mkdir()
    jobs = work / "deploy_agent_exec.ini"
    shutil.copy(DATA / "config" / "deploy_agent_exec.ini", jobs)
    rsyncd = daemons.rsyncd({"DEST": tree, "SLOW": slow})
    port = free_port()
    daemons.state_dirs.append(work / "state")
    agent = daemons.agent_from_text(
        peer_config(work, targets, jobs, rsyncd, port), "127.0.0.1", port
    )
    return Peer(work, tree, targets, rsyncd, agent)


# --------------------------------------------------------------------------- target states


def empty_web(peer: Peer) -> None:
    shutil.rmtree(peer.targets / "web", ignore_errors=True)


def synced_web(peer: Peer) -> None:
    subprocess.run(
        ["rsync", "-a", "--delete", f"{peer.tree}/", f"{peer.targets / 'web'}/"], check=True
    )


def web_with_deletes(peer: Peer) -> None:
    synced_web(peer)
    extra = peer.targets / "web" / "extra"
    extra.mkdir()
    for i in (1, 2, 3):
        (extra / f"junk{i}.txt").write_text("junk\n")
    (peer.targets / "web" / "d00" / "f00000.dat").write_bytes(b"changed")


def webslow_idle(peer: Peer) -> bool:
    return peer.answer("agent-status-in-sync", "webslow").get("alreadyRsync") == "false"


def webslow_running(peer: Peer) -> None:
    if not peer.pids("webslow"):
        # a sync that was just stopped may still be recording its end: let it finish first
        wait_until(lambda: webslow_idle(peer), 20, 0.2, "webslow to be idle")
        peer.answer("agent-rsync-start", "webslow")
        wait_until(lambda: peer.pids("webslow"), 20, 0.2, "webslow to run")


def nothing(peer: Peer) -> None:
    pass


def web_sync_ended(peer: Peer) -> None:
    """After rsync-start: let the sync finish so later cases see a quiet target."""
    wait_until(
        lambda: peer.answer("agent-status-in-sync").get("alreadyRsync") == "false",
        30,
        0.2,
        "the web sync to end",
    )


def webslow_gone(peer: Peer) -> None:
    wait_until(lambda: webslow_idle(peer), 20, 0.2, "webslow to stop")


# --------------------------------------------------------------------------- comparing


def same_shape(ours: Any, theirs: Any, where: str = "$") -> None:
    """Every key of the captured JSON is in ours with a value of the same type; lists hold the
    same type of items. Keys we add beside them are fine."""
    assert type(ours) is type(theirs), f"{where}: {type(ours).__name__} != {type(theirs).__name__}"
    if isinstance(theirs, dict):
        for key, value in theirs.items():
            assert key in ours, f"{where}: key {key!r} missing (ours: {sorted(ours)})"
            same_shape(ours[key], value, f"{where}.{key}")
    elif isinstance(theirs, list) and theirs and ours:
        same_shape(ours[0], theirs[0], f"{where}[0]")


def status_line(raw: bytes) -> bytes:
    return raw.split(b"\r\n", 1)[0]


KEEP: list[tuple[str, Callable[[Peer], None], Callable[[Peer], None]]] = [
    ("agent-status-empty-target", empty_web, nothing),
    ("agent-rlist-empty-target-10k", empty_web, nothing),
    ("agent-rsync-start", empty_web, web_sync_ended),
    ("agent-status-in-sync", synced_web, nothing),
    ("agent-rlist-with-deletes", web_with_deletes, nothing),
    ("agent-status-inline-target", nothing, nothing),
    ("agent-status-while-running", webslow_running, nothing),
    ("agent-rsync-while-running", webslow_running, nothing),
    ("agent-rkill-running", webslow_running, webslow_gone),
    ("agent-rkill-not-running", nothing, nothing),
    ("agent-exec-ok", nothing, nothing),
    ("agent-exec-nonzero-exit", nothing, nothing),
    ("agent-exec-plus-sign", nothing, nothing),
    ("agent-error-group-path-not-allowed", nothing, nothing),
    ("agent-error-inline-path-not-allowed", nothing, nothing),
    ("agent-error-unknown-group", nothing, nothing),
    ("agent-error-unknown-exec", nothing, nothing),
]


def test_every_keep_row_is_replayed() -> None:
    """The list replayed here covers every agent "keep" row of tests/data/wire/INDEX.md."""
    index = (DATA / "wire" / "INDEX.md").read_text()
    keep_section = index.split("## Behaviour to keep", 1)[1].split("## Bugs of the original", 1)[0]
    rows = {
        line.split("|")[1].strip()
        for line in keep_section.splitlines()
        if line.startswith("| agent-")
    }
    assert rows == {name for name, _, _ in KEEP} | {"agent-error-bad-auth-key"}


@pytest.mark.parametrize(("name", "before", "after"), KEEP, ids=[k[0] for k in KEEP])
def test_keep_row_answers_like_the_original(
    peer: Peer, name: str, before: Callable[[Peer], None], after: Callable[[Peer], None]
) -> None:
    """Same status line, Content-Type, JSON keys and value types (or text body) as the capture."""
    before(peer)
    raw = peer.send(name)
    after(peer)
    theirs_raw = (DATA / "wire" / f"{name}.response").read_bytes()
    assert status_line(raw) == status_line(theirs_raw)
    status, headers, body = parse_response(raw)
    t_status, t_headers, t_body = captured_response(name)
    assert headers["content-type"] == t_headers["content-type"]
    assert headers["connection"] == "close"
    if t_headers["content-type"].startswith("application/json"):
        same_shape(json.loads(body), json.loads(t_body))
    elif name == "agent-error-unknown-group":
        # issue 15: the group is named first; the original's words stay as the suffix
        assert body == b"unknown group 'nosuchgroup': " + t_body
    else:
        assert body == t_body


def test_bad_auth_key_is_401_like_the_original(peer: Peer) -> None:
    """An auth_key made with another key_cipher gets 401 Unauthorized, text/plain."""
    raw = peer.send("agent-error-bad-auth-key", key="not-65535")
    assert status_line(raw) == b"HTTP/1.1 401 Unauthorized"
    assert parse_response(raw)[1]["content-type"] == "text/plain; charset=utf-8"


# --------------------------------------------------------------------------- values that matter


def test_rsync_start_checksum_is_md5_of_dest_and_src(peer: Peer) -> None:
    """The job id of a replayed rsync is md5hex(dest + src) of our group."""
    empty_web(peer)
    content = peer.answer("agent-rsync-start")
    web_sync_ended(peer)
    src = str(peer.targets / "web")
    assert content["checksum"] == hashlib.md5(f"127.0.0.1::DEST/{src}".encode()).hexdigest()


def test_rlist_empty_target_lists_created_directory_then_files(peer: Peer) -> None:
    """The replayed rlist starts with `created directory <src>` and lists no directory."""
    empty_web(peer)
    content = peer.answer("agent-rlist-empty-target-10k")
    new = content["transferNewFiles"]
    assert new[0] == f"created directory {peer.targets / 'web'}"
    assert len(new) == 10_001
    assert not [n for n in new[1:] if n.endswith("/") or not n.endswith(".dat")]
    assert content["transferFilesCount"] == "10000"
    assert content["transferFilesSize"] == "1000000"


def test_rlist_with_deletes_lists_the_extra_files(peer: Peer) -> None:
    """The replayed rlist of a target with extra files lists those files (not dirs) to delete."""
    web_with_deletes(peer)
    content = peer.answer("agent-rlist-with-deletes")
    # as the capture: the files, in rsync's order, and not their directory
    assert content["transferDeleteFiles"] == [
        "extra/junk3.txt",
        "extra/junk2.txt",
        "extra/junk1.txt",
    ]
    assert content["transferNewFiles"] == ["d00/f00000.dat"]


def test_exec_answers_decode_like_the_originals(peer: Peer) -> None:
    """exec ok and `+` answer the same output as the original did (base64 `content`)."""
    for name in ("agent-exec-ok", "agent-exec-plus-sign"):
        ours = peer.answer(name)
        theirs = json.loads(captured_response(name)[2])
        assert ours["content"] == theirs["content"], name
        assert ours["return"] == theirs["return"] == "true"


# --------------------------------------------------------------------------- do NOT reproduce


def test_rkill_unknown_group_answers_400_at_once(peer: Peer) -> None:
    """The original never answered an rkill of an unknown group; we answer 400 at once."""
    assert (DATA / "wire" / "agent-bug-rkill-unknown-group-no-answer.response").read_bytes() == b""
    raw = peer.send("agent-bug-rkill-unknown-group-no-answer")
    assert status_line(raw) == b"HTTP/1.1 400 Bad Request"
    assert parse_response(raw)[2].endswith(b": empty value in options!")


def test_exec_regex_name_is_unknown(peer: Peer) -> None:
    """`options=.*,hi` is an unknown command (400), not a match for every name."""
    raw = peer.send("agent-bug-exec-name-is-regex")
    assert status_line(raw) == b"HTTP/1.1 400 Bad Request"
    assert parse_response(raw)[2] == b"exec[.*] not found!"


def test_exec_newline_injection_is_refused(peer: Peer) -> None:
    """`%0a` in an exec argument is refused with 400; nothing runs, nothing is echoed."""
    raw = peer.send("agent-bug-exec-newline-injection")
    assert status_line(raw) == b"HTTP/1.1 400 Bad Request"
    _, headers, body = parse_response(raw)
    assert headers["content-type"] == "text/plain; charset=utf-8"  # no command output
    assert b"control character" in body


def test_dotdot_in_a_replayed_path_is_refused(peer: Peer) -> None:
    """A replayed inline rlist whose path is `<allowed>/../elsewhere` gets 403."""
    src = f"{peer.targets}/../elsewhere"
    raw = peer.send("agent-error-inline-path-not-allowed", f"127.0.0.1::DEST/,{src}")
    assert status_line(raw) == b"HTTP/1.1 403 Permission Denied"
    assert parse_response(raw)[2] == f"{src} is not allowed!".encode()
    assert not (peer.work / "elsewhere").exists()


def test_agent_still_serves_after_the_replay(peer: Peer) -> None:
    """After every replayed request, good and bad, the agent is up and answers."""
    assert peer.agent.proc.poll() is None
    assert peer.answer("agent-rkill-not-running") == {"return": "true", "process": []}
