"""A second outsider's review of the two-pass release sync (deploy.release_sync), after the first
review's mends: reproductions against a real rsync and real trees, each compared with what an
in-place `rsync -a --delete` makes of the same base (tests/test_review_two_pass.py's helpers),
with the live tree's inodes checked after every run."""

from __future__ import annotations

import os
from pathlib import Path

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
