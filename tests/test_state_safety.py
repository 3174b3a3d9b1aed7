"""The state directory is trusted only when it is safe (issue 12, point 1): state and queue
directories judged like sshd's StrictModes (a private subdirectory in a shared sticky one),
records and job logs never followed through a link, never waited on as a FIFO, never taken from
another user, and a record never enough to make the agent signal a process. Unit tests, then a
real `twistd -n deploy-agent` attacked by a second local user (`nobody`)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import capturedLogs

from deploy.jobs import JobRegistry, target_key
from deploy.jobstate import (
    UntrustedFile,
    create_private,
    last_line,
    read_state,
    write_state,
)
from deploy.process import (
    SYNC_TAG,
    ProcessTable,
    is_our_sync,
    proc_start_ticks,
    trusted_uids,
)
from deploy.rsync import RsyncTarget
from deploy.statedir import UnsafeStateDir, secure_state_dir
from tests.harness import AgentProcess, ask, make_tree, wait_until
from tests.test_jobs import FakeProcessReactor

NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: attacks come from nobody")


def as_nobody(*argv: str) -> None:
    """Run `argv` as the local user nobody (the attacker)."""
    subprocess.run([*AS_NOBODY, *argv], check=True, timeout=30)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A shared sticky directory like /tmp (mode 1777), that nobody can reach."""
    path = Path(tempfile.mkdtemp(prefix="deploy-shared-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--", str(path)], check=False)


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A root process no sync of the agent has anything to do with."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def forged_record(pid: int, **more: Any) -> dict[str, Any]:
    """A `running` record naming `pid` (with its true start time) as supervisor and rsync."""
    ticks = proc_start_ticks(pid)
    return {
        "state": "running",
        "runId": "forged",
        "supervisorPid": pid,
        "supervisorStart": ticks,
        "rsyncPid": pid,
        "rsyncStart": ticks,
        **more,
    }


# --------------------------------------------------------------------------- state directories


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o770])
def test_a_dir_writable_by_group_or_others_is_refused_saying_what_to_change(tmp_path, mode):
    """A state dir other users (or the group) may write, without the sticky bit, is refused
    with one line naming it, its mode and the chmod that fixes it."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(UnsafeStateDir) as refused:
        secure_state_dir(str(state), owners={0}, uid=0)
    text = str(refused.value)
    assert "\n" not in text and str(state) in text and f"{mode:04o}" in text
    assert f"chmod go-w {state}" in text


def test_a_dir_inside_a_dir_others_can_write_is_refused(tmp_path):
    """A safe state dir inside a non-sticky world-writable one could be swapped: refused,
    naming the parent."""
    parent = tmp_path / "open"
    (parent / "state").mkdir(parents=True)
    parent.chmod(0o777)
    with pytest.raises(UnsafeStateDir, match=f"inside {parent}, which is writable"):
        secure_state_dir(str(parent / "state"), owners={0}, uid=0)


@ROOT_ONLY
def test_a_dir_owned_by_another_user_is_refused(tmp_path):
    """A state dir that belongs to another user (who could chmod it) is refused."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(UnsafeStateDir, match=f"{state} belongs to uid {NOBODY}"):
        secure_state_dir(str(state), owners={0}, uid=0)


def test_a_shared_sticky_dir_gets_a_private_subdirectory(shared):
    """In a sticky shared dir (like /tmp) the records go to deploy-agent-UID, made 0700 for
    the agent; a private dir is used as it is."""
    uid = os.geteuid()
    found = secure_state_dir(str(shared), owners=trusted_uids(), uid=uid)
    private = shared / f"deploy-agent-{uid}"
    assert found.private and found.path == str(private)
    info = private.lstat()
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == uid
    assert secure_state_dir(str(shared), owners=trusted_uids(), uid=uid).path == str(private)
    mine = private / "mine"
    mine.mkdir(mode=0o750)
    assert not secure_state_dir(str(mine), owners=trusted_uids(), uid=uid).private


@ROOT_ONLY
def test_the_private_subdirectory_is_made_for_the_user_the_agent_becomes(shared):
    """Started as root to run as nobody, the private dir belongs to nobody."""
    found = secure_state_dir(str(shared), owners=trusted_uids(NOBODY), uid=NOBODY, gid=NOBODY)
    info = os.lstat(found.path)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, NOBODY, 0o700)


@ROOT_ONLY
@pytest.mark.parametrize("plant", ["dir", "symlink", "file"])
def test_a_private_subdirectory_planted_by_another_user_is_refused(shared, tmp_path, plant):
    """deploy-agent-0 made first by another user — a directory of theirs, a symlink to a dir of
    ours, a file — is refused with a line saying to remove it; a link is never followed."""
    private = shared / "deploy-agent-0"
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    if plant == "dir":
        as_nobody("mkdir", "-m", "0700", str(private))
    elif plant == "symlink":
        as_nobody("ln", "-s", str(mine), str(private))
    else:
        as_nobody("touch", str(private))
    with pytest.raises(UnsafeStateDir, match=f"remove it|{private}") as refused:
        secure_state_dir(str(shared), owners={0}, uid=0)
    assert "state_path" in str(refused.value) and "\n" not in str(refused.value)
    assert list(mine.iterdir()) == []


def test_a_private_subdirectory_others_may_read_is_refused(shared):
    """An existing deploy-agent-UID of ours that is not 0700 was not made by the agent."""
    uid = os.geteuid()
    (shared / f"deploy-agent-{uid}").mkdir(mode=0o755)
    with pytest.raises(UnsafeStateDir, match="mode 0755"):
        secure_state_dir(str(shared), owners=trusted_uids(), uid=uid)


# --------------------------------------------------------------------------- records and logs


def test_a_symlinked_record_is_not_followed(tmp_path):
    """A symlink where a record belongs reads as no record, with the reason; the file it
    points to would have been a good record."""
    good = tmp_path / "elsewhere.json"
    write_state(str(good), {"state": "running"})
    (tmp_path / "r.json").symlink_to(good)
    reasons: list[UntrustedFile] = []
    assert read_state(str(tmp_path / "r.json"), refused=reasons.append) is None
    assert "symbolic link" in str(reasons[0])
    assert read_state(str(good)) == {"state": "running"}


def test_a_fifo_where_a_record_or_log_belongs_never_blocks(tmp_path):
    """A FIFO planted at a record or log path is refused at once (no writer would ever come)."""
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    results: list[Any] = []
    reader = threading.Thread(
        target=lambda: results.extend([read_state(str(fifo)), last_line(str(fifo))]), daemon=True
    )
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert results == [None, ""]


def test_a_huge_record_is_refused_without_reading_it(tmp_path):
    """A sparse 64 GiB file where a record belongs is refused by its size, at once."""
    huge = tmp_path / "r.json"
    with open(huge, "wb") as f:
        f.truncate(64 << 30)
    reasons: list[UntrustedFile] = []
    t0 = time.monotonic()
    assert read_state(str(huge), refused=reasons.append) is None
    assert time.monotonic() - t0 < 0.5 and "too big" in str(reasons[0])


@ROOT_ONLY
def test_a_record_of_another_user_or_hard_linked_is_refused(tmp_path):
    """A record owned by another user, or a hard link (to a file of ours elsewhere), is not
    read."""
    theirs = tmp_path / "theirs.json"
    write_state(str(theirs), {"state": "running"})
    os.chown(theirs, NOBODY, NOBODY)
    reasons: list[UntrustedFile] = []
    assert read_state(str(theirs), refused=reasons.append) is None
    assert f"uid {NOBODY}" in str(reasons[0])
    write_state(str(tmp_path / "ours.json"), {"state": "running"})
    os.link(tmp_path / "ours.json", tmp_path / "linked.json")
    assert read_state(str(tmp_path / "linked.json"), refused=reasons.append) is None
    assert "hard links" in str(reasons[1])


def test_a_job_log_is_created_fresh_never_written_through_a_link(tmp_path):
    """A symlink (or a hard link) planted where a job's log goes is replaced by a new private
    file: what it pointed to is left as it was."""
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    (tmp_path / "j.log").symlink_to(precious)
    os.link(precious, tmp_path / "k.log")
    for name in ("j.log", "k.log"):
        fd = create_private(str(tmp_path / name))
        os.write(fd, b"supervisor output\n")
        os.close(fd)
        info = (tmp_path / name).lstat()
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert precious.read_text() == "keep me"


# --------------------------------------------------------------------------- proving a pid ours


def tagged(run_id: str, *prefix: str) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ["PATH"], SYNC_TAG: run_id}
    return subprocess.Popen([*prefix, "sleep", "60"], env=env)


def test_only_a_process_tagged_with_the_run_is_our_sync():
    """is_our_sync needs pid + start time + the run's tag in /proc/PID/environ: a process
    without the tag, with another run's tag, or another start time is not ours."""
    ours, stranger = tagged("run-1"), subprocess.Popen(["sleep", "60"])
    try:
        owners = trusted_uids()
        start = proc_start_ticks(ours.pid)
        assert is_our_sync(ours.pid, start, "run-1", owners)
        assert not is_our_sync(ours.pid, start, "run-2", owners)
        assert not is_our_sync(ours.pid, start + 1, "run-1", owners)
        assert not is_our_sync(ours.pid, start, None, owners)
        assert not is_our_sync(stranger.pid, proc_start_ticks(stranger.pid), "run-1", owners)
    finally:
        for p in (ours, stranger):
            p.kill()
            p.wait()
    assert not is_our_sync(ours.pid, start, "run-1", owners)


@ROOT_ONLY
def test_a_tagged_process_of_another_user_is_not_our_sync():
    """Another local user can put the tag in their own processes' environment: their uid
    still makes them not ours."""
    theirs = tagged("run-1", *AS_NOBODY)
    try:
        wait_until(lambda: Path(f"/proc/{theirs.pid}/status").read_text().count("65534") >= 4)
        start = proc_start_ticks(theirs.pid)
        assert not is_our_sync(theirs.pid, start, "run-1", trusted_uids())
        assert is_our_sync(theirs.pid, start, "run-1", trusted_uids(NOBODY))
    finally:
        theirs.kill()
        theirs.wait()


def test_a_forged_record_never_makes_the_registry_signal(tmp_path, victim):
    """A record naming a live process that is not a sync of ours (right pid, right start
    time, no tag) is found lost at recovery and by status, its process is never signalled,
    and the refusal is logged."""
    state = tmp_path / "state"
    state.mkdir()
    key = "f" * 32
    write_state(str(state / f"{key}.json"), forged_record(victim.pid))
    sent: list[tuple[int, int]] = []
    processes = ProcessTable()
    processes.signal = lambda pid, sig: sent.append((pid, sig))  # type: ignore[method-assign]
    processes.signal_group = lambda pgid, sig: sent.append((pgid, sig))  # type: ignore[method-assign]
    registry = JobRegistry(FakeProcessReactor(), str(state), processes=processes)
    with capturedLogs() as events:
        assert registry.recover() == []
        assert registry.running(key) is None and registry.kill(key) == []
    assert registry.last_result(key)["outcome"] == "lost"
    assert sent == [] and victim.poll() is None
    assert any(
        "not a sync this agent started" in e.get("log_format", "") and e["pid"] == victim.pid
        for e in events
    )


# --------------------------------------------------------------------------- a real agent


def web_group(rsyncd, targets: Path, **more: Any) -> dict[str, Any]:
    return {**rsyncd.group(targets / "web", "--archive"), **more}


def keys(rsyncd, targets: Path) -> tuple[str, str]:
    """The record names of the web group: its key, and the original's checksum."""
    target = RsyncTarget(dest=rsyncd.url("DEST"), src=str(targets / "web"))
    return target_key(target), target.checksum


@pytest.fixture
def release(daemons, tmp_path):
    tree = make_tree(tmp_path / "tree", files=5, size=100)
    rsyncd = daemons.rsyncd({"DEST": tree})
    targets = tmp_path / "targets"
    targets.mkdir()
    return tree, rsyncd, targets


def last_ok(agent: AgentProcess, group: str) -> dict[str, Any]:
    def ended():
        code, body = ask(agent, "status", group)
        assert code == 200, body
        return body.get("lastRsync") if body.get("alreadyRsync") == "false" else None

    return wait_until(ended, 30, 0.1, f"the sync of {group} to end")


@ROOT_ONLY
def test_records_planted_in_a_shared_queue_dir_are_never_read(
    daemons, release, shared, tmp_path, victim
):
    """queue_path = a shared sticky dir (the original's sample uses /tmp/): nobody plants a
    record naming a root process, symlinks to it and to a root file where records and logs go,
    and a FIFO. The agent keeps its records in a private deploy-agent-0 instead: status is not
    fooled, rkill signals nothing, the sync runs and the root file is untouched."""
    tree, rsyncd, targets = release
    key, checksum = keys(rsyncd, targets)
    precious = tmp_path / "precious"
    precious.write_text("root's file")
    bait = shared / "bait.json"
    bait.write_text(json.dumps(forged_record(victim.pid)))
    os.chown(bait, NOBODY, NOBODY)
    for name in (key, checksum):
        as_nobody("ln", "-s", str(bait), str(shared / f"{name}.json"))
        as_nobody("ln", "-s", str(precious), str(shared / f"{name}.log"))
    as_nobody("mkfifo", str(shared / f"{'0' * 32}.json"))
    private = shared / "deploy-agent-0"
    daemons.state_dirs.append(private)
    agent = daemons.agent(
        groups={"web": web_group(rsyncd, targets, queue_path=shared)}, allow_paths=[targets]
    )
    assert f"keeps its records in {private}" in agent.log_text()
    code, body = ask(agent, "status", "web")
    assert code == 200 and body["alreadyRsync"] == "false", body
    assert ask(agent, "rkill", "web") == (200, {"return": "true", "process": []})
    assert ask(agent, "rsync", "web")[1]["return"] == "true"
    assert last_ok(agent, "web")["outcome"] == "ok"
    assert victim.poll() is None and precious.read_text() == "root's file"
    info = private.lstat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o700)
    assert read_state(str(private / f"{key}.json"))["outcome"] == "ok"
    assert (shared / f"{key}.json").is_symlink() and (shared / f"{key}.log").is_symlink()


@ROOT_ONLY
def test_a_private_dir_made_first_by_another_user_stops_the_agent(daemons, release, shared):
    """nobody makes deploy-agent-0 in the shared queue dir before the agent starts: the agent
    refuses to start, in one line saying what to remove."""
    _, rsyncd, targets = release
    as_nobody("mkdir", "-m", "0700", str(shared / "deploy-agent-0"))
    agent = daemons.agent(
        groups={"web": web_group(rsyncd, targets, queue_path=shared)},
        allow_paths=[targets],
        wait=False,
    )
    assert agent.proc.wait(30) != 0
    text = agent.log_text()
    assert f"belongs to uid {NOBODY}" in text and f"rm -r {shared}/deploy-agent-0" in text
    assert "Traceback" not in text


def test_a_state_dir_others_can_write_stops_the_agent_saying_what_to_change(daemons, tmp_path):
    """state_path mode 0777 (not sticky): the agent does not start, and says which chmod fixes
    it, in one line."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    agent = daemons.agent(state=state, wait=False)
    assert agent.proc.wait(30) != 0
    text = agent.log_text()
    assert f"{state} is writable by group or others (mode 0777)" in text
    assert f"chmod go-w {state}" in text and "Traceback" not in text


@ROOT_ONLY
def test_files_planted_where_records_belong_are_ignored_by_a_real_agent(
    daemons, release, tmp_path, victim
):
    """Whatever lies in the state dir where records belong — a FIFO, a symlink to a forged
    record, a 64 GiB sparse file, a forged record of another user, a forged root record naming
    a root process, a symlinked log — the agent starts, answers each target's status at once,
    rkill signals nothing, and a sync writes a new log instead of following the link."""
    _, rsyncd, targets = release
    names = ["fifo", "link", "huge", "theirs", "forged", "web"]
    groups = {name: rsyncd.group(targets / name, "--archive") for name in names}
    state = tmp_path / "state"
    state.mkdir()

    def record(name: str) -> Path:
        g = groups[name]
        return state / f"{target_key(RsyncTarget(dest=g['dest'], src=str(g['src'])))}.json"

    os.mkfifo(record("fifo"))
    bait = tmp_path / "bait.json"
    bait.write_text(json.dumps(forged_record(victim.pid)))
    record("link").symlink_to(bait)
    with open(record("huge"), "wb") as f:
        f.truncate(64 << 30)
    record("theirs").write_text(json.dumps(forged_record(victim.pid)))
    os.chown(record("theirs"), NOBODY, NOBODY)
    record("forged").write_text(json.dumps(forged_record(victim.pid)))
    precious = tmp_path / "precious"
    precious.write_text("root's file")
    record("web").with_suffix(".log").symlink_to(precious)
    agent = daemons.agent(groups=groups, state=state, allow_paths=[targets])
    for name in names:
        t0 = time.monotonic()
        code, body = ask(agent, "status", name)
        assert code == 200 and body["alreadyRsync"] == "false", (name, body)
        assert time.monotonic() - t0 < 5, name
        assert ask(agent, "rkill", name) == (200, {"return": "true", "process": []}), name
    assert ask(agent, "rsync", "web")[1]["return"] == "true"
    assert last_ok(agent, "web")["outcome"] == "ok"
    assert victim.poll() is None and precious.read_text() == "root's file"
    assert not record("web").with_suffix(".log").is_symlink()
    text = agent.log_text()
    for why in ("symbolic link", "not a regular file", "too big", f"belongs to uid {NOBODY}"):
        assert why in text, why
    assert f"names pid {victim.pid}, which is not a sync this agent started" in text
