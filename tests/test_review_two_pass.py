"""An outsider's review of the two-pass release sync (deploy.release_sync): reproductions of what
it got wrong, each against a real rsync and real trees, compared with what an in-place
`rsync -a --delete` makes of the same base (directory times included), and with the live tree's
inodes checked after every run."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deploy.release_argv import eligible
from deploy.release_steps import prepare_base
from deploy.releases import ReleaseHistory, ReleaseSpec
from tests.test_release_two_pass import run_two_pass, snapshot

# Fixed times for every directory of a tree, so a time left wrong shows (the kernel's file times
# are coarse: two changes in a row often get the same one).
DIR_TIME = 1_000_000_000


def pin_dir_times(root: Path) -> None:
    for dirpath, dirs, _ in os.walk(root, topdown=False):
        for name in dirs:
            os.utime(Path(dirpath, name), (DIR_TIME, DIR_TIME))
    os.utime(root, (DIR_TIME, DIR_TIME))


def tree(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every entry and the top directory: mode, owner, mtime (not a symlink's), content."""
    out: dict[str, tuple[int, int, int, bytes]] = {}
    for key, (_, mode, mtime, _, what) in snapshot(root).items():
        data = what.encode("utf-8", "surrogateescape") if isinstance(what, str) else b""
        if stat.S_ISREG(mode):
            data = bytes.fromhex(what)
        out[key] = (mode, os.lstat(root / key).st_uid, 0 if stat.S_ISLNK(mode) else mtime, data)
    top = os.lstat(root)
    out["."] = (top.st_mode, top.st_uid, top.st_mtime_ns, b"")
    return out


def in_place(live: Path, source: Path, where: Path, *options: str) -> Path:
    """What the old road makes of the same base: a copy of the live tree, rsync'd in place."""
    subprocess.run(["cp", "-a", "--no-target-directory", str(live), str(where)], check=True)
    argv = ["rsync", "--archive", "--delete", *options, f"{source}/", f"{where}/"]
    subprocess.run(argv, check=True, capture_output=True)
    return where


def first_release(tmp_path: Path, files: dict[str, str]) -> tuple[Path, Path]:
    source, live = tmp_path / "source", tmp_path / "live"
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    pin_dir_times(source)
    subprocess.run(["rsync", "-a", f"{source}/", f"{live}/"], check=True)
    pin_dir_times(live)  # rsync leaves the time of a top directory it creates
    assert tree(source) == tree(live)
    return source, live


def test_directories_keep_their_times_around_what_the_passes_change(tmp_path: Path) -> None:
    """The real run names only what the dry run itemized, so a directory whose own attributes
    did not change is not in its list: the private copy renamed into it, the temporary file
    rsync renames over a changed file, and our own deletions all move its mtime, and nothing
    sets it back (an in-place run does: every directory is in its file list). The commonest
    release (one file's content changed) left its parent directories with the sync's time."""
    source, live = first_release(
        tmp_path, {"top.txt": "t", "c/f": "v1", "g/deep/h": "h", "e/x.log": "old log"}
    )
    before = snapshot(live)
    (source / "c/f").write_text("v2, longer")  # content: the directory's time does not change
    os.chmod(source / "g/deep/h", 0o600)  # attributes only: privatized, then chmod'ed
    os.chmod(source / "top.txt", 0o600)  # the same in the top directory
    pin_dir_times(source)
    # a pattern the group now excludes and deletes (the source's directory never changed)
    options = ("--exclude=*.log", "--delete-excluded")
    tp = run_two_pass(source, live, tmp_path / "base", *options)
    assert snapshot(live) == before
    expected = tree(in_place(live, source, tmp_path / "in-place", *options))
    assert tree(tmp_path / "base") == expected
    assert tp.transfers == 1 and tp.deletions == 1


def test_prune_empty_dirs_does_not_drop_a_listed_directory(tmp_path: Path) -> None:
    """With -m the real run, given a directory without its (unchanged) files, prunes it as
    empty: the directory's new mode never reached the release."""
    source, live = first_release(tmp_path, {"d/f": "f", "g/h": "h"})
    os.chmod(source / "d", 0o700)
    os.utime(source / "g", (5, 5))
    run_two_pass(source, live, tmp_path / "base", "-m")
    assert tree(tmp_path / "base") == tree(in_place(live, source, tmp_path / "in-place", "-m"))


@pytest.mark.parametrize("verbose", ["-i", "-vv"])
def test_itemizing_unchanged_entries_does_not_copy_them(tmp_path: Path, verbose: str) -> None:
    """The sync already passes --itemize-changes: a group's own -i (or -vv) makes rsync itemize
    every unchanged entry too, and each was privatized and listed: a full copy of the release
    on every sync instead of links (the cost the two passes exist to avoid)."""
    source, live = first_release(tmp_path, {f"d/f{i}": str(i) for i in range(5)})
    (source / "d/f0").write_text("changed")
    tp = run_two_pass(source, live, tmp_path / "base", verbose)
    base = tmp_path / "base"
    assert [os.lstat(base / f"d/f{i}").st_nlink for i in range(1, 5)] == [2, 2, 2, 2]
    assert tp.listed == 2  # d/f0 and the directory above it
    assert tree(base) == tree(in_place(live, source, tmp_path / "in-place"))


@pytest.mark.parametrize("option", ["--stderr=all", "--msgs2stderr"])
def test_output_sent_to_stderr_is_not_eligible(tmp_path: Path, option: str) -> None:
    """rsync then writes the dry run's itemized list and its --stats to stderr: the plan sees
    nothing, the count check fails, and every sync of the group failed (the old road works)."""
    assert not eligible(["--archive", option])


def test_a_base_never_exists_while_its_release_is_recorded_private(tmp_path: Path) -> None:
    """prepare_base used to rename `.base-<id>` into place, then save `private: false` for <id>.
    A save that fails (a full disk: purge_after_sync swallows the OSError) or a kill -9 between
    the two leaves a base whose inodes <id> shares while the history calls <id> private. The
    next release is made from that base (sharing the inodes); if the group later turns
    link_dest off, cleanup keeps <id> as a private spare and rsync brings it up to date in
    place: chmod/utime on inodes the newer (maybe live) release holds."""
    spec = ReleaseSpec(
        src=str(tmp_path / "web"),
        releases_path=str(tmp_path / "web.releases"),
        history=str(tmp_path / "state" / "h.json"),
        keep=2,
        two_pass=True,
        two_pass_min_files=0,
    )
    history = ReleaseHistory(spec)
    with history.locked() as data:
        first = history.begin(data, 1000.0, "run", "src")
    Path(history.layout.partial(first), "f").write_text("x")
    with history.locked() as data:
        history.complete(data, first, "ok", 1, 1, 1000.0)
        assert (history.record(data, first) or {}).get("private") is True  # nothing links to it

    saves = 0

    def failing_save(data: dict[str, Any]) -> None:
        nonlocal saves
        saves += 1
        raise OSError(28, "No space left on device")

    real_save, history.save = history.save, failing_save  # type: ignore[method-assign]
    with pytest.raises(OSError):
        prepare_base(history)
    history.save = real_save  # type: ignore[method-assign]
    assert saves == 1
    with history.locked() as data:
        private = (history.record(data, first) or {}).get("private")
    base = Path(spec.releases_path, f".base-{first}")
    assert not (base.exists() and private is True), "a base shares the inodes of a private release"
    shutil.rmtree(tmp_path / "web.releases")
