"""Release mode against a real rsync daemon and a real `twistd -n deploy-agent`: conversion of a
live directory, staging and the atomic switch, rollback, activate, history, status.release,
cleanup over runs of failed deploys, after_activate and check, and the client's orders directly
and through a real deploy-proxy."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from deploy.jobs import target_key
from deploy.jobstate import read_state
from deploy.release_argv import eligible
from deploy.rsync import RsyncTarget
from tests.conftest import Daemons
from tests.harness import AgentProcess, ask, make_tree, run_client, wait_until

JOBS = """\
[release]
reload = /bin/sh -c 'echo reloaded >> "$1"' sh %s
check:ok = /bin/true
check:fail = /bin/false
"""


class Rel:
    """An rsync daemon serving `tree`, an agent whose group `web` is in release mode."""

    def __init__(
        self,
        daemons: Daemons,
        work: Path,
        *options: str,
        files: int = 30,
        delete: bool = True,
        **group: Any,
    ) -> None:
        self.work = work
        self.tree = make_tree(work / "tree", files=files, size=500)
        (self.tree / "VERSION").write_text("v1\n")
        self.targets = work / "targets"
        self.targets.mkdir(exist_ok=True)
        self.src = self.targets / "web"
        self.state = work / "state"
        self.rsyncd = daemons.rsyncd({"DEST": self.tree})
        jobs = work / "jobs.ini"
        jobs.write_text(JOBS)
        deleting = ("--delete",) if delete else ()
        keys = self.rsyncd.group(self.src, "--archive", *deleting, *options)
        keys.update({"releases": 3, "two_pass_min_files": 0, **group})  # two passes, small tree
        # a two-pass group prepares the next base after each sync (deploy.release_sync)
        self.two_pass = group.get("link_dest", "true") == "true" and eligible(options)
        self.two_pass = self.two_pass and not group.get("two_pass_min_files")
        self.agent = daemons.agent(
            groups={"web": keys}, jobs=jobs, state=self.state, allow_paths=[self.targets]
        )

    def checksum(self) -> str:
        return hashlib.md5((self.rsyncd.url("DEST") + str(self.src)).encode()).hexdigest()

    def key(self) -> str:
        """The name of the group's sync record and history (deploy.jobs.target_key)."""
        return target_key(RsyncTarget(dest="", src=str(self.src)), release_mode=True)

    def sync(self, label: str = "", expect: str = "ok") -> dict[str, Any]:
        """One release sync, waited for to its end; answers the rsync answer."""
        status, body = ask_with(self.agent, "rsync", "web", release=label)
        assert status == 200 and body["runId"], body
        assert body["return"] == ("true" if expect != "failed" else body["return"]), body
        run = body["runId"]

        def ended() -> dict[str, Any] | None:
            record = read_state(str(self.state / f"{self.key()}.json")) or {}
            ok = record.get("runId") == run and record.get("state") == "ended"
            return record if ok else None

        record = wait_until(ended, 60, what="the release sync to end")
        assert record["outcome"] == expect, record
        if self.two_pass and expect == "ok":  # the next sync's base, made after the end
            wait_until(self.base_ready, 30, what="the prepared base")
        return body

    def base_ready(self) -> bool:
        if not os.path.islink(self.src):
            return True  # nothing live (activate = manual): nothing to copy
        live = os.path.basename(os.path.realpath(self.src))
        return os.path.isdir(f"{self.src}.releases/.base-{live}")

    def releases(self) -> list[dict[str, Any]]:
        status, body = ask(self.agent, "releases", "web")
        assert status == 200, body
        return list(body["releases"])

    def live_version(self) -> str:
        return (self.src / "VERSION").read_text().strip()


_stamp = [1_000_000_000]


def set_version(tree: Path, text: str) -> None:
    """VERSION with a fresh mtime: rsync's quick check must not take it for the old one."""
    _stamp[0] += 10
    (tree / "VERSION").write_text(text + "\n")
    os.utime(tree / "VERSION", (_stamp[0], _stamp[0]))


def ask_with(agent: AgentProcess, order: str, options: str, **extra: str) -> tuple[int, Any]:
    """`ask`, with extra form fields (release=LABEL)."""
    import time

    from deploy.client import ClientOptions, Order, build_request
    from tests.harness import parsed_answer, raw_request

    o = Order(order, options)
    o.extra = {k: v for k, v in extra.items() if v}
    request = build_request(o, ClientOptions(), agent.host, time.time())
    return parsed_answer(raw_request(agent.host, agent.port, request))


@pytest.fixture
def rel(daemons: Daemons, tmp_path: Path) -> Rel:
    return Rel(daemons, tmp_path)


def test_first_sync_converts_the_live_directory_and_rollback_returns_to_it(rel: Rel) -> None:
    """A live directory becomes the first release; the sync's release goes live; rollback
    brings the old tree back and marks the left release bad; no earlier good release is 409."""
    rel.src.mkdir()
    set_version(rel.src, "v0")
    body = rel.sync("v1-sha")
    assert rel.src.is_symlink() and rel.live_version() == "v1"
    listing = rel.releases()
    assert [r["state"] for r in listing] == ["live", "good"]
    assert listing[0]["id"] == body["release"] and listing[0]["label"] == "v1-sha"
    assert listing[0]["files"] and listing[0]["activated"]
    status, answer = ask(rel.agent, "status", "web")
    assert answer["release"]["id"] == body["release"] and answer["release"]["label"] == "v1-sha"
    status, answer = ask(rel.agent, "rollback", "web")
    assert status == 200 and answer["return"] == "true", answer
    assert rel.live_version() == "v0"
    assert [r["state"] for r in rel.releases()] == ["bad", "live"]
    status, answer = ask(rel.agent, "rollback", "web")
    assert status == 409 and "no earlier good release" in answer
    # history lives in the agent's state dir, not in the served tree
    assert (rel.state / f"releases-{rel.key()}.json").exists()
    assert not any("releases-" in p.name for p in Path(os.path.realpath(rel.src)).iterdir())


@pytest.mark.parametrize("delete", [True, False], ids=["delete", "no-delete"])
def test_an_empty_source_never_goes_live_and_costs_no_listing(
    daemons: Daemons, tmp_path: Path, delete: bool
) -> None:
    """Release mode's empty-source guard: a source that lists no files is refused before its
    release can go live (the live one stays), decided from the sync's own file list (in two
    passes, the dry run's, before the real run): one connection to the source, no listing
    first. A source with files syncs again (dry run, real run, maybe the top directory's run).
    Also without --delete: a new release starts empty, so an empty source is an empty release."""
    rel = Rel(daemons, tmp_path, delete=delete)
    first = rel.sync("v1")["release"]
    connections = rel.rsyncd.log.parent / "rsyncd.log"

    def connected() -> int:
        return connections.read_text().count("connect from")

    before = connected()
    for path in rel.tree.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    status, body = ask_with(rel.agent, "rsync", "web", release="empty")
    assert status == 200 and body["runId"], body
    record = wait_until(lambda: _ended(rel, body["runId"]), 60, what="the empty sync to end")
    assert record["outcome"] == "refused", record
    assert "lists no files" in record["message"] and "allow_empty_source" in record["message"]
    assert connected() == before + 1
    assert rel.live_version() == "v1"
    assert [r["id"] for r in rel.releases() if r["state"] == "live"] == [first]
    set_version(rel.tree, "v2")
    rel.sync("v2")
    assert rel.live_version() == "v2"
    assert connected() - (before + 1) in (2, 3)  # the third when the top directory changed


def _ended(rel: Rel, run: str) -> dict[str, Any] | None:
    record = read_state(str(rel.state / f"{rel.key()}.json")) or {}
    return record if record.get("runId") == run and record.get("state") == "ended" else None


def test_manual_activation_stages_then_activate_switches(daemons: Daemons, tmp_path: Path) -> None:
    """activate = manual: a sync stages without switching; activate switches to the newest
    staged; activate GROUP,ID goes back to an earlier good release."""
    rel = Rel(daemons, tmp_path, activate="manual")
    first = rel.sync("one")["release"]
    assert not os.path.lexists(rel.src)
    assert [r["state"] for r in rel.releases()] == ["staged"]
    status, answer = ask(rel.agent, "activate", "web")
    assert status == 200 and answer["release"]["id"] == first, answer
    set_version(rel.tree, "v2")
    second = rel.sync("two")["release"]
    assert rel.live_version() == "v1"
    ask(rel.agent, "activate", "web")
    assert rel.live_version() == "v2"
    status, answer = ask(rel.agent, "activate", f"web,{first}")
    assert status == 200 and answer["previous"] == second
    assert rel.live_version() == "v1"
    status, answer = ask(rel.agent, "activate", "web")
    assert status == 409 and "no staged release" in answer


def test_failed_syncs_never_switch_and_cleanup_keeps_the_good_ones(rel: Rel) -> None:
    """Runs of failed deploys (rsync daemon gone) leave the live release and its rollback
    target alone, never count toward N; cleanup keeps N good releases."""
    ids = []
    for n in range(4):
        set_version(rel.tree, f"v{n}")
        ids.append(rel.sync(f"r{n}")["release"])
    states = {r["id"]: r["state"] for r in rel.releases()}
    assert states == {ids[3]: "live", ids[2]: "good", ids[1]: "good"}, states
    rel.rsyncd.stop()
    for _ in range(3):
        rel.sync("broken", expect="failed")
    assert rel.live_version() == "v3"
    listing = rel.releases()
    assert [r["state"] for r in listing if r["state"] != "partial"] == ["live", "good", "good"]
    assert len([r for r in listing if r["state"] == "partial"]) == 1  # one leftover, reused
    status, answer = ask(rel.agent, "rollback", "web")
    assert status == 200 and rel.live_version() == "v2"


def test_a_failed_check_switches_back(daemons: Daemons, tmp_path: Path) -> None:
    """after_activate runs after the switch; a failing check sends the host back at once and
    the sync's outcome is check_failed."""
    marker = tmp_path / "reloads"
    rel = Rel(daemons, tmp_path, after_activate=f"reload,{marker}", check="check:ok")
    rel.sync("good")
    assert marker.read_text().count("reloaded") == 1
    rel2 = Rel(daemons, tmp_path / "b", check="check:fail")
    set_version(rel2.tree, "v1")
    rel2.src.mkdir()
    set_version(rel2.src, "old")
    rel2.sync("bad", expect="check_failed")
    assert rel2.live_version() == "old"
    assert [r["state"] for r in rel2.releases()] == ["bad", "live"]


def test_client_orders_and_table(rel: Rel, home: Path) -> None:
    """deploy-client --order=rsync --release=LABEL, --order=releases and --format table
    (RELEASE column), --order=rollback."""
    env = {**os.environ, "HOME": str(home)}
    host = f"--hosts={rel.agent.address}"
    out = run_client(host, "--order=rsync", "--options=web", "--release=abc123", "--wait", env=env)
    assert out.rc == 0, out.stderr
    out = run_client(host, "--order=releases", "--options=web", env=env)
    assert out.rc == 0 and out.content(rel.agent.address, "releases")["releases"][0]["label"] == (
        "abc123"
    )
    out = run_client(host, "--order=status", "--options=web", "--format=table", env=env)
    assert "RELEASE" in out.stdout and "abc123" in out.stdout, out.stdout


READER = """
import os, sys, time
src, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
reads = errors = 0
while not os.path.exists(stop):
    try:
        with open(os.path.join(src, "VERSION")) as f:
            f.read()
        root = os.path.realpath(src)
        with open(os.path.join(root, "VERSION")) as f, open(os.path.join(root, "MARK")) as g:
            if f.read() != g.read():
                errors += 1  # a mix of two releases' files
        reads += 1
    except OSError as e:
        errors += 1
        print("error", e, flush=True)
open(out, "w").write(f"{reads} {errors}")
"""


def test_readers_see_no_gap_and_no_mix_during_many_switches(rel: Rel, tmp_path: Path) -> None:
    """While `src` is switched RELEASE_SWITCHES (1,000) times between two releases by
    `activate`, a reader opening src/VERSION in a loop never gets ENOENT, and the files of the
    release it resolved always belong together."""
    import subprocess
    import sys

    ids = []
    for version in ("A", "B"):
        set_version(rel.tree, version)
        (rel.tree / "MARK").write_text(version + "\n")
        os.utime(rel.tree / "MARK", (_stamp[0], _stamp[0]))
        ids.append(rel.sync(version)["release"])
    out, stop = tmp_path / "reader.out", tmp_path / "reader.stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(rel.src), str(out), str(stop)])
    try:
        for n in range(int(os.environ.get("RELEASE_SWITCHES", "1000"))):
            status, answer = ask(rel.agent, "activate", f"web,{ids[n % 2]}")
            assert status == 200, answer
    finally:
        stop.touch()
        reader.wait(30)
    reads, errors = map(int, out.read_text().split())
    assert reads > 0 and errors == 0
    assert [r["state"] for r in rel.releases()].count("live") == 1


def _history_says_live(rel: Rel) -> None:
    """The raw history names the live release (activated), or a switch to it under way."""
    history = read_state(str(rel.state / f"releases-{rel.key()}.json")) or {}
    live = os.path.basename(os.readlink(rel.src))
    record = next((r for r in history.get("releases", []) if r["id"] == live), None)
    pending = history.get("pending") or {}
    assert (record is not None and record.get("activated")) or pending.get("to") == live, history


def test_random_kills_never_leave_src_dangling_partial_or_unrecorded(
    daemons: Daemons, tmp_path: Path
) -> None:
    """kill -9 of the agent, the supervisor or rsync at random moments of release syncs
    (RELEASE_KILLS rounds, 6 by default): `src` always resolves to a complete release, the
    history says which, and the next sync recovers (reusing or removing the partial)."""
    import random
    import signal
    import time

    from deploy.process import is_same_process

    rel = Rel(daemons, tmp_path, "--bwlimit=300", files=300)
    rounds = int(os.environ.get("RELEASE_KILLS", "6"))
    rng = random.Random(os.environ.get("RELEASE_KILL_SEED", "17"))
    ini = rel.agent.ini.read_text()
    record_path = rel.state / f"{rel.key()}.json"
    rel.sync("base")
    for n in range(rounds):
        set_version(rel.tree, f"round{n}")
        status, body = ask_with(rel.agent, "rsync", "web", release=f"r{n}")
        assert status == 200, body
        victim = ("agent", "supervisor", "rsync")[n % 3]
        at = time.monotonic() + rng.uniform(0, 0.8)
        wait_until(lambda at=at: time.monotonic() >= at, what="the chosen moment")
        record = read_state(str(record_path)) or {}
        if victim == "agent":
            rel.agent.kill()
        else:
            pid, start = record.get(f"{victim}Pid"), record.get(f"{victim}Start")
            if pid and is_same_process(pid, start):  # ours: recorded by our agent
                os.kill(pid, signal.SIGKILL)

        def settled(run: str = body["runId"]) -> bool:
            now = read_state(str(record_path)) or {}
            if now.get("runId") != run or now.get("state") == "ended":
                return True
            return not is_same_process(now.get("supervisorPid"), now.get("supervisorStart"))

        wait_until(settled, 60, what="the supervisor to be gone")
        assert os.path.exists(rel.src / "VERSION"), "src does not resolve"
        target = os.readlink(rel.src)
        assert "/.partial-" not in target and os.path.dirname(target) == str(rel.src) + ".releases"
        _history_says_live(rel)
        if victim == "agent":
            rel.agent = daemons.agent_from_text(ini, rel.agent.host, rel.agent.port)
        wait_until(lambda: ask(rel.agent, "status", "web")[1].get("alreadyRsync") != "true", 60)
    rel.sync("after")  # a leftover partial is reused or removed
    assert rel.live_version() == f"round{rounds - 1}"
    listing = rel.releases()
    assert [r["state"] for r in listing].count("live") == 1
    assert not [r for r in listing if r["state"] == "partial"]


def test_release_orders_through_a_real_proxy(daemons: Daemons, tmp_path: Path, home: Path) -> None:
    """deploy-client through a real deploy-proxy: rsync --release=LABEL, releases, rollback
    and status.release reach the agent with the proxy's grants."""
    from tests.harness import free_port

    rel = Rel(daemons, tmp_path)
    set_version(rel.tree, "v1")
    rel.sync("first")
    api = tmp_path / "api.ini"
    api.write_text("[keys]\nk1 = grp\n[servers]\ngrp[] = 127.0.0.1\n")
    pport = free_port()
    proxy_text = (
        f"[server]\naddr = 127.0.0.1\nport = {pport}\n[client]\nport = {rel.agent.port}\n"
        f"[allow::hosts]\nhost[] = 127.0.0.0/8\n[api]\npath = {api}\n"
    )
    daemons.proxy(proxy_text, "127.0.0.1", pport)
    env = {**os.environ, "HOME": str(home)}
    via = [f"--hosts=127.0.0.1:{pport}", "--api-key=k1", "--args=groups:grp", "--options=web"]
    set_version(rel.tree, "v2")
    out = run_client(*via, "--order=rsync", "--release=proxied", env=env)
    assert out.rc == 0, out.stdout + out.stderr
    wait_until(lambda: rel.live_version() == "v2", 60, what="the proxied release to go live")
    wait_until(
        lambda: ask(rel.agent, "status", "web")[1].get("alreadyRsync") != "true", 60
    )
    out = run_client(*via, "--order=releases", env=env)
    agent_entry = out.json[f"127.0.0.1:{pport}"]["releases"]["content"]["127.0.0.1"]["releases"]
    assert agent_entry["content"]["releases"][0]["label"] == "proxied"
    out = run_client(*via, "--order=rollback", env=env)
    assert out.rc == 0, out.stdout
    assert rel.live_version() == "v1"
    out = run_client(*via, "--order=status", "--format=table", env=env)
    assert "RELEASE" in out.stdout and "(first)" in out.stdout, out.stdout
