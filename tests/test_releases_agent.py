"""Release mode against a real rsync daemon and a real `twistd -n deploy-agent`: conversion of a
live directory, staging and the atomic switch, rollback, activate, history, status.release,
cleanup over runs of failed deploys, after_activate and check, and the client's orders directly
and through a real deploy-proxy."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from deploy.jobstate import read_state
from tests.conftest import Daemons
from tests.harness import AgentProcess, ask, make_tree, run_client, wait_until

JOBS = """\
[release]
reload = /bin/sh -c "echo reloaded >> %s"
check:ok = /bin/true
check:fail = /bin/false
"""


class Rel:
    """An rsync daemon serving `tree`, an agent whose group `web` is in release mode."""

    def __init__(self, daemons: Daemons, work: Path, **group: Any) -> None:
        self.work = work
        self.tree = make_tree(work / "tree", files=30, size=500)
        (self.tree / "VERSION").write_text("v1\n")
        self.targets = work / "targets"
        self.targets.mkdir(exist_ok=True)
        self.src = self.targets / "web"
        self.state = work / "state"
        self.rsyncd = daemons.rsyncd({"DEST": self.tree})
        jobs = work / "jobs.ini"
        jobs.write_text(JOBS)
        keys = self.rsyncd.group(self.src, "--archive", "--delete")
        keys.update(releases=3, **group)
        self.agent = daemons.agent(
            groups={"web": keys}, jobs=jobs, state=self.state, allow_paths=[self.targets]
        )

    def checksum(self) -> str:
        return hashlib.md5((self.rsyncd.url("DEST") + str(self.src)).encode()).hexdigest()

    def sync(self, label: str = "", expect: str = "ok") -> dict[str, Any]:
        """One release sync, waited for to its end; answers the rsync answer."""
        status, body = ask_with(self.agent, "rsync", "web", release=label)
        assert status == 200 and body["runId"], body
        assert body["return"] == ("true" if expect != "failed" else body["return"]), body
        run = body["runId"]

        def ended() -> dict[str, Any] | None:
            record = read_state(str(self.state / f"{self.checksum()}.json")) or {}
            ok = record.get("runId") == run and record.get("state") == "ended"
            return record if ok else None

        record = wait_until(ended, 60, what="the release sync to end")
        assert record["outcome"] == expect, record
        return body

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
    assert (rel.state / f"releases-{rel.checksum()}.json").exists()
    assert not any("releases-" in p.name for p in Path(os.path.realpath(rel.src)).iterdir())


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
