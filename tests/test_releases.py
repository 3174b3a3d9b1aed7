"""The release rules and layout without a reactor: ids, cleanup over runs of failed deploys, the
rollback target, reconcile after a process killed mid-switch or mid-rename, and the conversion of
a live directory (including one interrupted between its exchanges), and the recovery of the
steps a dead supervisor left (a fake runner for the hooks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from deploy.release_layout import ReleaseLayout, exchange, is_release_id, new_release_id
from deploy.release_steps import _claim, _record_step, due_steps, recover
from deploy.releases import (
    ReleaseConflict,
    ReleaseHistory,
    ReleaseSpec,
    cleanup_plan,
    previous_good,
)


def rec(i: int, state: str, activated: float | None = None) -> dict[str, Any]:
    return {"id": f"2026{i:02d}", "state": state, "activated": activated}


def test_ids_are_sortable_and_unique() -> None:
    """Ids sort by time and differ within the same microsecond."""
    a, b = new_release_id(1000.0), new_release_id(1000.0)
    assert a != b and is_release_id(a) and new_release_id(999.0) < a < new_release_id(1001.0)


def test_cleanup_keeps_n_good_never_live_or_rollback_target_and_newest_bad() -> None:
    """Bad releases never count toward N, the newest bad one is kept, the live and the
    rollback target survive even when they are the oldest."""
    records = [rec(1, "good", 1), rec(2, "good", 5), rec(3, "bad"), rec(4, "bad")]
    records += [rec(5, "good", 2), rec(6, "good", 3), rec(7, "good", 4)]
    # live is 202601 (rolled back to the oldest); 202602 was activated last before it
    assert previous_good(records, "202601") == "202602"
    assert cleanup_plan(records, "202601", 2) == ["202603", "202605"]
    # the live 202607 counts toward N; 202602, activated last before it, is the rollback target
    assert cleanup_plan(records, "202607", 3) == ["202601", "202603"]


def test_cleanup_after_many_failed_deploys_deletes_no_good_release() -> None:
    """Twenty bad releases in a row: all good ones stay, only the newest bad one is kept."""
    records = [rec(1, "good", 1), rec(2, "good", 2)] + [rec(i, "bad") for i in range(3, 23)]
    doomed = cleanup_plan(records, "202602", 2)
    assert "202601" not in doomed and "202602" not in doomed and "202622" not in doomed
    assert len(doomed) == 19


def spec(tmp_path: Path, **kw: Any) -> ReleaseSpec:
    return ReleaseSpec(
        src=str(tmp_path / "web"),
        releases_path=str(tmp_path / "web.releases"),
        history=str(tmp_path / "state" / "h.json"),
        keep=2,
        **kw,
    )


def stage(history: ReleaseHistory, now: float, text: str) -> str:
    with history.locked() as data:
        release_id = history.begin(data, now, "run", "src")
    Path(history.layout.partial(release_id), "VERSION").write_text(text)
    with history.locked() as data:
        history.complete(data, release_id, "ok", 1, 3, now)
    return release_id


def test_conversion_keeps_the_old_tree_as_first_release(tmp_path: Path) -> None:
    """A live directory becomes release 1 behind the symlink, with the same inode."""
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "VERSION").write_text("old")
    inode = os.stat(tmp_path / "web").st_ino
    history = ReleaseHistory(spec(tmp_path))
    new = stage(history, 1000.0, "new")
    assert (tmp_path / "web" / "VERSION").read_text() == "new"
    with history.locked() as data:
        assert [r["state"] for r in history.listing(data)] == ["live", "good"]
        old = history.rollback(data, None, 1001.0)
    assert os.stat(history.layout.path(old)).st_ino == inode
    assert (tmp_path / "web" / "VERSION").read_text() == "old"
    with history.locked() as data, pytest.raises(ReleaseConflict):
        history.rollback(data, None, 1002.0)
    assert new not in history.layout.partials()


def test_interrupted_conversion_is_completed_with_src_resolving(tmp_path: Path) -> None:
    """Killed between the two exchanges: src already resolves (through the forwarding link),
    and the next reconcile moves the tree under releases_path."""
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "VERSION").write_text("old")
    layout = ReleaseLayout(str(tmp_path / "web"), str(tmp_path / "web.releases"))
    release_id = new_release_id(1000.0)
    layout.ensure_root()
    hold = tmp_path / f".web.convert-{release_id}"
    os.symlink(hold, layout.path(release_id))
    os.symlink(layout.path(release_id), hold)
    exchange(layout.src, str(hold))  # step 2 done, then "killed"
    assert (tmp_path / "web" / "VERSION").read_text() == "old"
    layout.clear_switch_leftovers()
    assert layout.exists(release_id) and layout.live_id() == release_id
    assert not os.path.lexists(hold)
    assert (tmp_path / "web" / "VERSION").read_text() == "old"


def test_reconcile_finishes_a_switch_and_a_rename_a_dead_process_left(tmp_path: Path) -> None:
    """A switch whose intent was written and whose rename happened is recorded; a partial
    renamed after rsync ended ok is staged; a switch that never happened is dropped."""
    history = ReleaseHistory(spec(tmp_path, activate="manual"))
    first = stage(history, 1000.0, "1")
    with history.locked() as data:
        data["pending"] = {"to": first, "from": None, "at": 5.0, "markBad": None}
        history.save(data)
    history.layout.switch(first)  # then "killed" before recording
    with history.locked() as data:
        record = history.record(data, first)
        assert record is not None and record["activated"] == 5.0 and data["pending"] is None
        second = history.begin(data, 1001.0, "run2", "src")
    history.layout.stage_to_release(second)  # then "killed" before recording
    with history.locked() as data:
        data["pending"] = {"to": second, "from": first, "at": 6.0, "markBad": None}
        history.save(data)  # then "killed" before the rename
    with history.locked() as data:
        states = {r["id"]: r["state"] for r in history.listing(data)}
        assert states == {first: "live", second: "staged"} and data["pending"] is None


def test_a_leftover_partial_is_reused_and_a_spare_recycled(tmp_path: Path) -> None:
    """Without link_dest (private trees) the next sync resumes into a leftover partial; cleanup
    keeps a removed release as the spare the next sync starts from (its files are there)."""
    history = ReleaseHistory(spec(tmp_path, link_dest=False))
    ids = [stage(history, 1000.0 + n, f"v{n}") for n in range(3)]
    assert history.layout.spares() == [ids[0]]
    with history.locked() as data:
        partial = history.begin(data, 2000.0, "run", "src")
    assert Path(history.layout.partial(partial), "VERSION").read_text() == "v0"
    with history.locked() as data:
        history.complete(data, partial, "failed", None, None, 2000.0)
        again = history.begin(data, 2001.0, "run", "src")
    assert history.layout.partials() == [again]
    assert Path(history.layout.partial(again), "VERSION").read_text() == "v0"


class FakeRunner:
    """Stands in for run_hook: records each argv, answers `ok` (or False for `fail`)."""

    def __init__(self, fail: str = "") -> None:
        self.ran: list[str] = []
        self.fail = fail

    def __call__(self, argv: list[str], timeout: float) -> tuple[bool, str]:
        self.ran.append(argv[0])
        return argv[0] != self.fail, "said"


def hooked(tmp_path: Path) -> ReleaseHistory:
    return ReleaseHistory(spec(tmp_path, after_activate=["reload"], check=["probe"]))


def steps_of(history: ReleaseHistory, release_id: str) -> dict[str, Any]:
    with history.locked() as data:
        record = history.record(data, release_id)
        assert record is not None
        return dict(record.get("steps") or {})


DEAD = [0, 0]  # no process: the supervisor that owned the steps is gone


def test_recovery_switches_a_staged_auto_release_and_runs_its_steps_once(tmp_path: Path) -> None:
    """The supervisor died after `.partial-<id>` → `<id>`, before the switch: recovery
    switches (activate = auto), then runs after_activate and check, each once."""
    history = hooked(tmp_path)
    first = stage(history, 1000.0, "1")
    with history.locked() as data:
        second = history.begin(data, 1001.0, "run2", "src")
    Path(history.layout.partial(second), "VERSION").write_text("2")
    with history.locked() as data:
        history.record(data, second)["outcome"] = "ok"  # type: ignore[index]
        history.save(data)
    history.layout.stage_to_release(second)  # then "killed"
    runner = FakeRunner()
    assert recover(history, runner) == (second, "ok", "")
    assert history.layout.live_id() == second and runner.ran == ["reload", "probe"]
    assert steps_of(history, second)["after_activate"] == "done"
    assert steps_of(history, second)["check"] == "done"
    assert recover(history, runner) is None and runner.ran == ["reload", "probe"]
    with history.locked() as data:
        assert history.record(data, first)["state"] == "good"  # type: ignore[index]


def test_recovery_of_a_manual_group_leaves_the_staged_release(tmp_path: Path) -> None:
    """With activate = manual a staged release waits for `activate`: recovery switches nothing."""
    history = ReleaseHistory(spec(tmp_path, activate="manual", check=["probe"]))
    first = stage(history, 1000.0, "1")
    history.layout.switch(first)
    second = stage(history, 1001.0, "2")
    runner = FakeRunner()
    assert recover(history, runner) is None
    assert history.layout.live_id() == first and runner.ran == []
    with history.locked() as data:
        assert history.record(data, second)["state"] == "staged"  # type: ignore[index]


def switched_by_dead_supervisor(history: ReleaseHistory) -> tuple[str, str]:
    """Two releases, the second switched to by a supervisor that died before its steps."""
    first = stage(history, 1000.0, "1")
    for name in ("after_activate", "check"):
        _record_step(history, first, name, "done")
    with history.locked() as data:
        second = history.begin(data, 1001.0, "run2", "src")
    Path(history.layout.partial(second), "VERSION").write_text("2")
    with history.locked() as data:
        steps = due_steps(history.spec, DEAD)
        history.complete(data, second, "ok", 1, 1, 1001.0, steps=steps)  # then "killed"
    return first, second


def test_recovery_runs_the_steps_a_dead_supervisor_left_after_its_switch(tmp_path: Path) -> None:
    """Switched, steps due, owner dead: recovery runs both; an owner still alive keeps them."""
    history = hooked(tmp_path)
    first, second = switched_by_dead_supervisor(history)
    runner = FakeRunner()
    assert recover(history, runner, alive=lambda pid, ticks: True) is None
    assert runner.ran == []
    assert recover(history, runner) == (second, "ok", "")
    assert runner.ran == ["reload", "probe"] and history.layout.live_id() == second
    assert recover(history, runner) is None and runner.ran == ["reload", "probe"]
    assert steps_of(history, second)["previous"] == first


def test_recovery_never_runs_an_interrupted_after_activate_again(tmp_path: Path) -> None:
    """The supervisor died while after_activate ran: it is marked interrupted, not run twice;
    the check (no effects) gets its verdict."""
    history = hooked(tmp_path)
    _, second = switched_by_dead_supervisor(history)
    assert _claim(history, second, "after_activate")  # running, then "killed"
    runner = FakeRunner()
    assert recover(history, runner) == (second, "ok", "")
    assert runner.ran == ["probe"]
    assert steps_of(history, second)["after_activate"] == "interrupted"


def test_a_check_failing_at_recovery_switches_back(tmp_path: Path) -> None:
    """The check recovery runs fails: back to the release live before, the new one bad."""
    history = hooked(tmp_path)
    first, second = switched_by_dead_supervisor(history)
    release, outcome, message = recover(history, FakeRunner(fail="probe")) or ("", "", "")
    assert (release, outcome) == (second, "check_failed") and "switched back" in message
    assert history.layout.live_id() == first
    with history.locked() as data:
        assert history.record(data, second)["state"] == "bad"  # type: ignore[index]


def test_a_group_that_drops_link_dest_never_reuses_a_shared_tree(tmp_path: Path) -> None:
    """Releases made with --link-dest share inodes with the live one: after the group changes to
    link_dest = false, neither such a release (as a spare) nor such a leftover partial becomes
    the base rsync brings up to date; the first private release after the change can."""
    linked = ReleaseHistory(spec(tmp_path))
    for n in range(3):
        stage(linked, 1000.0 + n, f"v{n}")
    with linked.locked() as data:
        leftover = linked.begin(data, 1100.0, "run", "src")
        assert data["releases"][-1]["private"] is False
    Path(linked.layout.partial(leftover), "VERSION").write_text("shares inodes")
    private = ReleaseHistory(spec(tmp_path, link_dest=False))
    with private.locked() as data:
        fresh = private.begin(data, 1200.0, "run", "src")
        assert data["releases"][-1]["private"] is True
    assert os.listdir(private.layout.partial(fresh)) == []
    assert private.layout.partials() == [fresh]
    Path(private.layout.partial(fresh), "VERSION").write_text("v3")
    with private.locked() as data:
        private.complete(data, fresh, "ok", 1, 2, 1200.0)
    # cleanup took out a release made with --link-dest: not kept as a spare
    assert private.layout.spares() == []
    for n in range(4, 6):
        stage(private, 1300.0 + n, f"v{n}")
    assert private.layout.spares() == [fresh]  # private: kept, and recycled next
    with private.locked() as data:
        again = private.begin(data, 1400.0, "run", "src")
    assert Path(private.layout.partial(again), "VERSION").read_text() == "v3"


def test_a_release_another_links_to_is_no_longer_private(tmp_path: Path) -> None:
    """The first release (or a converted directory) is private until a sync with --link-dest
    links to it: then it shares inodes with the new release and must never become a spare."""
    linked = ReleaseHistory(spec(tmp_path))
    first = stage(linked, 1000.0, "v0")
    with linked.locked() as data:
        assert linked.record(data, first)["private"] is True  # type: ignore[index]
    second = stage(linked, 1001.0, "v1")
    private = ReleaseHistory(spec(tmp_path, link_dest=False))
    with private.locked() as data:
        assert private.record(data, first)["private"] is False  # type: ignore[index]
        assert private.record(data, second)["private"] is False  # type: ignore[index]
    stage(private, 1002.0, "v2")  # cleanup takes `first` out: shared, so not a spare
    assert private.layout.spares() == []


def test_with_link_dest_no_base_shares_an_inode_with_the_live_release(tmp_path: Path) -> None:
    """rsync chmods an up-to-date file in place, so with link_dest (releases share inodes) no
    spare is kept and a leftover partial is removed: each sync starts from an empty partial."""
    history = ReleaseHistory(spec(tmp_path))
    for n in range(3):
        stage(history, 1000.0 + n, f"v{n}")
    assert history.layout.spares() == []
    with history.locked() as data:
        partial = history.begin(data, 2000.0, "run", "src")
        assert history.rsync_extras(data, partial) == [
            f"--link-dest={history.layout.path(history.layout.live_id() or '')}"
        ]
    assert os.listdir(history.layout.partial(partial)) == []
    Path(history.layout.partial(partial), "VERSION").write_text("leftover")
    with history.locked() as data:
        history.complete(data, partial, "failed", None, None, 2000.0)
        again = history.begin(data, 2001.0, "run", "src")
    assert os.listdir(history.layout.partial(again)) == []
    assert history.layout.partials() == [again]
