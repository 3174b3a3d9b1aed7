"""One sync per local target, however the target is spelled (issue 12, point 6): the lock and the
record are keyed by the realpath of the local directory, not by the raw `dest + src` string;
answers keep the original's `checksum`. Unit tests on the registry, then a real agent."""

from __future__ import annotations

import pytest

from deploy.jobs import JobError, JobRegistry, target_key
from deploy.jobstate import read_state
from deploy.rsync import RsyncTarget
from tests.harness import ask, make_tree, wait_until
from tests.test_jobs import (
    FakeProcesses,
    FakeProcessReactor,
    ended,
    fake_registry,
    supervisor_records_end,
)

GROUP = RsyncTarget(dest="h::M/BIG/", src="/srv/www/big")
SPELLINGS = [
    RsyncTarget(dest="h::M/BIG/", src="/srv/www/big/"),
    RsyncTarget(dest="h::M/BIG//", src="/srv/www/big"),
    RsyncTarget(dest="h::M/BIG/", src="/srv/www//big"),
    RsyncTarget(dest="rsync://h/M/BIG", src="/srv/www/./big"),
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_spellings_of_one_local_target_have_one_key(spelling):
    """Trailing or doubled slashes, `.` components and another source spelling are one key;
    the original's checksum (md5 of dest + src) still tells them apart."""
    assert target_key(spelling) == target_key(GROUP)
    assert spelling.checksum != GROUP.checksum
    assert target_key(RsyncTarget(dest="h::M/BIG/", src="/srv/www/big2")) != target_key(GROUP)


def test_a_symlink_to_the_target_is_the_same_target(tmp_path):
    """A local path reached through a symlink is the directory it resolves to."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert target_key(RsyncTarget("h::M/", str(tmp_path / "link"))) == target_key(
        RsyncTarget("h::M/", str(real))
    )


@pytest.fixture
def registry(tmp_path) -> tuple[JobRegistry, FakeProcessReactor, FakeProcesses]:
    return fake_registry(tmp_path)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_second_spelling_is_refused_while_the_first_runs(registry, tmp_path, spelling):
    """The group's sync (records in its queue_path) runs: another spelling, with its records
    in the default state dir, finds that same job and may not start a second rsync; the job
    keeps the checksum it was started with."""
    registry, reactor, procs = registry
    queue = str(tmp_path / "queue")
    registry.start(GROUP, state_dir=queue)
    job = reactor.spawned[-1].proto.job
    assert registry.running(target_key(spelling)) is job
    with pytest.raises(JobError, match="already running"):
        registry.start(spelling)
    assert len(reactor.spawned) == 1 and job.checksum == GROUP.checksum
    assert read_state(job.state_file)["target"] == "/srv/www/big"


def test_the_last_result_is_found_whatever_the_spelling(registry, tmp_path):
    """Once the group's sync has ended, its lastRsync is found by another spelling whose
    records live in another directory, with the original checksum it was started with."""
    registry, reactor, procs = registry
    registry.start(GROUP, state_dir=str(tmp_path / "queue"))
    spawned = reactor.spawned[-1]
    supervisor_records_end(spawned.proto.job, procs)
    ended(spawned.proto)
    last = registry.last_result(target_key(SPELLINGS[0]))
    assert last["outcome"] == "ok" and last["checksum"] == GROUP.checksum


def test_every_spelling_of_a_running_target_answers_already_rsync(daemons, tmp_path):
    """A real agent syncing group `big` (dest HOST::BIG/, src .../big): rsync and status of
    `HOST::BIG/,.../big/`, `HOST::BIG//,.../big` and `HOST::BIG/,...//big` answer alreadyRsync
    with the running sync's pids and checksum; rkill through one of them stops it."""
    tree = make_tree(tmp_path / "tree", files=24, size=100_000)
    rsyncd = daemons.rsyncd({"BIG": tree})
    www = tmp_path / "www"
    www.mkdir()
    big = rsyncd.group(www / "big", "--archive", "--bwlimit=300", module="BIG")
    agent = daemons.agent(
        groups={"big": {**big, "queue_path": tmp_path / "queue"}},
        allow_paths=[www],
        server={"rkill_grace": 2},
    )
    daemons.state_dirs.append(tmp_path / "queue")
    code, started = ask(agent, "rsync", "big")
    checksum = RsyncTarget(dest=big["dest"], src=str(big["src"])).checksum
    assert code == 200 and started.pop("runId")  # this run's id (issue 15)
    assert started == {"checksum": checksum, "return": "true"}

    def running() -> list[str]:
        body = ask(agent, "status", "big")[1]
        return body["process"] if body.get("alreadyRsync") == "true" and body["process"] else []

    pids = wait_until(running, 20, 0.1, "the sync of big to run")
    url = rsyncd.url("BIG")
    for options in (f"{url},{www}/big/", f"{url}/,{www}/big", f"{url},{www}//big"):
        for order in ("rsync", "status"):
            code, body = ask(agent, order, options)
            assert code == 200 and body["alreadyRsync"] == "true", (order, options, body)
            assert body["process"] == pids and body["checksum"] == checksum, (order, options)
    assert ask(agent, "rkill", f"{url},{www}//big/")[1]["process"] == pids

    def stopped() -> dict | None:
        body = ask(agent, "status", "big")[1]
        return body.get("lastRsync") if body["alreadyRsync"] == "false" else None

    assert wait_until(stopped, 20, 0.1, "the sync to stop")["outcome"] == "killed"
