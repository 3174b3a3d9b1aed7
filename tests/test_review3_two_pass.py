"""A second outsider's review of the two-pass release sync (deploy.release_sync), after the first
review's mends: reproductions against a real rsync and real trees, each compared with what an
in-place `rsync -a --delete` makes of the same base (tests/test_review_two_pass.py's helpers),
with the live tree's inodes checked after every run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deploy.jobstate import OUTCOME_OK
from deploy.release_argv import eligible
from deploy.release_sync import TwoPass
from tests.test_release_two_pass import run_two_pass, snapshot
from tests.test_review_two_pass import first_release, in_place, pin_dir_times, tree


def test_a_directory_kept_by_excluded_files_does_not_fail_the_sync(tmp_path: Path) -> None:
    """A directory gone from the source whose subdirectory still holds a file the group excludes
    (without --delete-excluded: protected from deletion). An in-place run says "cannot delete
    non-empty directory" and ends ok, both directories kept with that file; its dry run itemizes
    `*deleting gone/sub/` all the same (rsync 3.5.0), and the plan's rmdir (ENOTEMPTY) failed
    the whole sync: every release of such a group failed, where the in-place road succeeds."""
    source, live = first_release(tmp_path, {"app.txt": "a", "gone/sub/run.log": "log"})
    before = snapshot(live)
    (source / "gone/sub/run.log").unlink()
    (source / "gone/sub").rmdir()
    (source / "gone").rmdir()
    (source / "app.txt").write_text("a2")
    pin_dir_times(source)
    options = ("--exclude=*.log",)
    run_two_pass(source, live, tmp_path / "base", *options)
    assert snapshot(live) == before
    expected = tree(in_place(live, source, tmp_path / "in-place", *options))
    assert "gone/sub/run.log" in expected  # rsync keeps it, and the directories above it
    assert tree(tmp_path / "base") == expected


class BusySource:
    """What `TwoPass.top_pass` asks of the supervisor (deploy.supervise): the rsync daemon has no
    connection left the first time, then the run ends ok."""

    kill_requested = False

    def __init__(self) -> None:
        self.runs = 0
        self.waits = 0

    def spawn(self, argv: list[str]) -> str | None:
        self.runs += 1
        return None

    def drain(self, parser: object, progress: list[object]) -> tuple[int, str]:
        if self.runs == 1:
            return 5, "@ERROR: max connections (1) reached -- try again later\n"
        return 0, ""

    def waited_for_source(self, exit_code: int | None, stderr_text: str) -> bool:
        from deploy.source_retry import source_busy

        self.waits += 1
        return source_busy(exit_code, stderr_text)


def test_the_top_pass_waits_for_a_busy_source_like_the_other_runs(tmp_path: Path) -> None:
    """The third run (the top directory's attributes) is a connection of its own: an rsync daemon
    at its `max connections` answers it "try again later" as it may the dry run or the real run.
    Those two wait as `source_retry` says and try again; the top pass failed the sync at once,
    after the whole release had been made."""
    tp = TwoPass(["rsync", "--archive", "--", "h::m/", f"{tmp_path}/"], str(tmp_path))
    tp.start()
    tp.top = True
    sup = BusySource()
    outcome, message = tp.top_pass(sup, OUTCOME_OK, "")
    tp.close()
    assert (outcome, message, sup.runs) == (OUTCOME_OK, "", 2)


def test_a_failure_to_put_the_top_times_back_ends_the_sync_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`restore_top` (a utime on the partial's top directory) runs in the supervisor after the
    real run; its OSError (EPERM for a non-root agent on a top it does not own, EROFS) went up
    through `pump` and ended the supervisor with a traceback: no end recorded for the sync."""
    tp = TwoPass(["rsync", "--archive", "--", "h::m/", f"{tmp_path}/"], str(tmp_path))
    tp.start()

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "utime", refused)
    outcome, message = tp.top_pass(BusySource(), OUTCOME_OK, "")
    tp.close()
    assert outcome == "failed" and "top directory" in message


@pytest.mark.parametrize(
    "options", [["-a", "--filter=!"], ["-a", "--filter", "clear"], ["-af!"], ["-a", "-f", "!"]]
)
def test_a_rule_that_clears_the_filters_cannot_clear_the_top_pass(
    tmp_path: Path, options: list[str]
) -> None:
    """`!` (or `clear`) in the group's filters clears every rule before it: given the group's
    rules, the top pass's own `--exclude=/*` went too, and it sent every top-level entry, none of
    them privatized. The top pass now runs with none of the group's filter rules (a `!` may also
    sit in a filter file or a source's .rsync-filter). Shown with a real rsync."""
    source, dest = tmp_path / "s", tmp_path / "d"
    (source / "sub").mkdir(parents=True)
    (source / "f").write_text("f")
    (source / ".rsync-filter").write_text("!\n")
    dest.mkdir()
    for group in (options, ["-aF"], ["-a", "--exclude-from=/dev/null", "-F"]):
        tp = TwoPass(["rsync", *group, "--", f"{source}/", f"{dest}/"], str(tmp_path))
        subprocess.run(tp.top_argv(), check=True)
        assert os.listdir(dest) == []  # the top directory alone
        assert eligible(group)


def test_a_copy_cut_short_never_reaches_the_tree(tmp_path: Path, monkeypatch: Any) -> None:
    """A private copy is made outside the tree (the partial's scratch directory beside it) and
    renamed over its entry: a kill mid-copy leaves nothing in the tree (it used to leave a
    `.deploy-private-*` copy beside the file, which a group excluding dot files kept in every
    later release). The next sync's plan starts with an empty scratch directory, and `begin`
    dooms a killed sync's."""
    import deploy.release_private as private
    from deploy.release_layout import SCRATCH

    source, live = first_release(tmp_path, {"index.php": "<?php $password = 1;", "d/a": "a"})
    root = tmp_path / "r"
    root.mkdir()
    base = root / ".partial-x"
    subprocess.run(["cp", "-al", "--no-target-directory", str(live), str(base)], check=True)
    os.chmod(source / "index.php", 0o640)
    tp = TwoPass(["rsync", "-a", "--", f"{source}/", f"{base}/"], str(tmp_path))
    tp.start()

    def cut_short(source_fd: int, target_fd: int) -> None:
        os.write(target_fd, b"<?php")
        raise KeyboardInterrupt  # as a kill would stop it, mid-copy

    monkeypatch.setattr(private, "_copy_data", cut_short)
    with pytest.raises(KeyboardInterrupt):
        tp.on_item(b".f...p.....", b"index.php")
    assert sorted(os.listdir(base)) == ["d", "index.php"]
    assert os.lstat(base / "index.php").st_ino == os.lstat(live / "index.php").st_ino
    scratch = root / f"{SCRATCH}.partial-x"
    (scratch / "left").write_text("by a killed plan")
    tp.start()  # planned again: the scratch directory starts empty
    assert os.listdir(scratch) == []
    tp.close()
    assert not scratch.exists()
