"""Two-pass release syncs (deploy.release_sync): which groups may use them, the two command lines,
`privatize`, the plan between the passes run with a real rsync against awkward trees (attribute-only
changes, deletions, type changes, names rsync's --files-from would misread), and, against a real
rsync daemon and a real agent, that a release made from a prepared base never changes an inode of
the live release or of the rollback target."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from deploy.jobstate import read_state
from deploy.release_argv import eligible
from deploy.release_private import privatize
from deploy.release_sync import ReleaseSyncError, TwoPass
from deploy.rsync import RsyncTarget, build_argv
from deploy.rsync_output import RsyncOutputParser, rsync_environment
from tests.conftest import Daemons
from tests.harness import ask, wait_until
from tests.test_releases_agent import Rel, ask_with, set_version


@pytest.mark.parametrize(
    ("options", "ok"),
    [
        (["--archive", "--delete"], True),
        (["-avz", "--delete", "--exclude=*.tmp", "--chmod=D755"], True),
        (["-e", "ssh -H host"], True),  # the value of -e is not an option
        (["-aH"], False),
        (["--hard-links"], False),
        (["-aR"], False),
        (["--inplace"], False),
        (["--info=progress2"], False),
        (["--link-dest=/x"], False),
        (["-q"], False),
        (["--backup-dir=/b"], False),
        (["--files-from=/list"], False),
    ],
)
def test_eligible(options: list[str], ok: bool) -> None:
    assert eligible(options) is ok


def two_pass(options: list[str], spool: Path) -> TwoPass:
    argv = build_argv(
        RsyncTarget(dest="h::M/", src="/r/.partial-x/", options=tuple(options)),
        dry_run=False,
        progress=True,
    )
    return TwoPass(argv, str(spool))


def test_command_lines(tmp_path: Path) -> None:
    tp = two_pass(["--archive", "--delete-after", "--max-delete", "5", "-r"], tmp_path)
    dry = tp.dry_argv()
    assert dry[-3:] == ["--", "h::M/", "/r/.partial-x/"]
    assert "--dry-run" in dry and "--out-format=%i %n" in dry
    assert "--info=progress2" not in dry and "--delete-after" in dry
    tp._names = 0  # as after start()
    real = tp.real_argv()
    assert not any(o.startswith(("--del", "--max-delete")) for o in real)
    assert "5" not in real  # the value of --max-delete went with it
    assert "--info=progress2" in real and "--from0" in real
    assert real.index("--no-recursive") > real.index("-r")  # the later one wins
    assert {"--files-from=-", "--no-implied-dirs"} <= set(real)
    top = tp.top_argv()
    assert not any(o.startswith("--del") for o in top) and "--dirs" in top
    filtered = two_pass(["-avzF", "--exclude=*.tmp", "--filter", "! x", "-f- y", "-C"], tmp_path)
    top = filtered.top_argv()  # its own rule alone: none of the group's could clear it
    assert [o for o in top if "exclude" in o or "filter" in o] == ["--exclude=/*"]
    assert "-avz" in top and "! x" not in top and "-f- y" not in top and "-C" not in top
    newline = two_pass(["--archive", "--exclude-from=/x"], tmp_path)
    newline._names = 0
    assert "--from0" not in newline.real_argv()  # it would make rsync read /x NUL-separated
    with pytest.raises(ReleaseSyncError):
        TwoPass(["rsync", "a", "b"], str(tmp_path))


def test_privatize_breaks_shared_links_and_keeps_attributes(tmp_path: Path) -> None:
    live, base = tmp_path / "live", tmp_path / "base"
    live.mkdir()
    base.mkdir()
    (live / "f").write_bytes(b"data" * 1000)
    os.chmod(live / "f", 0o4751)
    os.utime(live / "f", ns=(1_000_000_123, 2_000_000_456))
    os.symlink("target", live / "l")
    os.mkfifo(live / "p")
    (base / "own").write_text("mine")
    for name in ("f", "l", "p"):
        os.link(live / name, base / name, follow_symlinks=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    sfd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in (b"f", b"l", b"p", b"own"):
            privatize(fd, name, sfd)
    finally:
        os.close(fd)
        os.close(sfd)
    assert os.listdir(scratch) == []
    f, lf = os.lstat(base / "f"), os.lstat(live / "f")
    assert f.st_ino != lf.st_ino and lf.st_nlink == 1 and f.st_nlink == 1
    assert (base / "f").read_bytes() == b"data" * 1000
    assert stat.S_IMODE(f.st_mode) == 0o4751 and f.st_mtime_ns == 2_000_000_456
    assert os.lstat(base / "l").st_ino != os.lstat(live / "l").st_ino
    assert os.readlink(base / "l") == "target"
    assert not os.path.lexists(base / "p")  # rsync makes a special file anew
    assert os.lstat(live / "p").st_nlink == 1
    assert (base / "own").read_text() == "mine"
    assert sorted(os.listdir(base)) == ["f", "l", "own"]  # no temporary left


def run_two_pass(source: Path, live: Path, base: Path, *options: str) -> TwoPass:
    """Both passes with a real rsync from a local source, as the supervisor runs them."""
    subprocess.run(["cp", "-al", "--no-target-directory", str(live), str(base)], check=True)
    opts = ("--archive", "--delete", *options)
    argv = build_argv(RsyncTarget(dest=f"{source}/", src=f"{base}/", options=opts), dry_run=False)
    tp = TwoPass(argv, str(base.parent))
    tp.start()
    parser = RsyncOutputParser(keep_lists=False, on_item=tp.on_item)
    dry = subprocess.run(tp.dry_argv(), capture_output=True, env=rsync_environment())
    assert dry.returncode == 0, dry.stderr
    parser.feed(dry.stdout)
    parser.close()
    assert tp.error is None, tp.error
    tp.finish(parser.stats.files_transferred)
    real = subprocess.run(
        tp.real_argv(), stdin=tp.names_fd(), capture_output=True, env=rsync_environment()
    )
    assert real.returncode == 0, real.stderr
    if tp.top:
        top = subprocess.run(tp.top_argv(), capture_output=True, env=rsync_environment())
        assert top.returncode == 0, top.stderr
    else:
        tp.restore_top()
    tp.close()
    return tp


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """Every entry: inode, mode, mtime, size, and its content or link target."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                what = path.read_bytes().hex()
            else:
                what = ""
            key = str(path.relative_to(root))
            out[key] = (st.st_ino, st.st_mode, st.st_mtime_ns, st.st_size, what)
    return out


def same_tree(a: Path, b: Path) -> None:
    left = {k: v[1:] for k, v in snapshot(a).items()}
    right = {k: v[1:] for k, v in snapshot(b).items()}
    for key in set(left) & set(right):  # mtimes of directories and symlinks aside
        if not stat.S_ISREG(left[key][0]):
            left[key] = (left[key][0], 0, *left[key][2:])
            right[key] = (right[key][0], 0, *right[key][2:])
    assert left == right


@pytest.mark.parametrize("options", [(), ("--exclude-from=/dev/null",)], ids=["from0", "lines"])
def test_the_passes_make_the_source_and_leave_the_live_tree_alone(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    source, live = tmp_path / "source", tmp_path / "live"
    for d in ("keep", "gone/sub", "becomes_file", "old"):
        (source / d).mkdir(parents=True)
    for name in ("keep/a", "keep/b", "gone/sub/x", "gone/y", "becomes_file/z", "becomes_dir"):
        (source / name).write_text(name)
    (source / "#comment").write_text("not a comment")
    (source / ";semi").write_text("nor this")
    os.symlink("keep/a", source / "link")
    subprocess.run(["rsync", "-a", f"{source}/", f"{live}/"], check=True)
    before = snapshot(live)
    # the next release: content, permission-only and time-only changes, deletions, type changes
    (source / "keep/a").write_text("changed content!")
    os.chmod(source / "keep/b", 0o600)
    os.utime(source / "#comment", (5, 5))
    subprocess.run(["rm", "-r", str(source / "gone"), str(source / "becomes_file")], check=True)
    (source / "becomes_file").write_text("now a file")
    (source / "becomes_dir").unlink()
    (source / "becomes_dir").mkdir()
    (source / "becomes_dir/inside").write_text("new")
    (source / "new dir/deep").mkdir(parents=True)
    (source / "new dir/deep/file").write_text("new")
    if not options:
        (source / "line\nbreak").write_text("a name rsync escapes")
    os.unlink(source / "link")
    os.symlink("keep/b", source / "link")
    base = tmp_path / "base"
    tp = run_two_pass(source, live, base, *options)
    same_tree(source, base)
    assert snapshot(live) == before  # not an inode, mode, time or byte of it changed
    assert tp.transfers >= 4 and tp.deletions >= 4


def test_a_name_with_a_line_break_cannot_be_listed_one_per_line(tmp_path: Path) -> None:
    source, live = tmp_path / "source", tmp_path / "live"
    source.mkdir()
    live.mkdir()
    (source / "a\nb").write_text("x")
    with pytest.raises(AssertionError, match="line break"):
        run_two_pass(source, live, tmp_path / "base", "--exclude-from=/dev/null")


def test_the_plan_never_walks_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("x")
    os.link(outside / "victim", outside / "second")  # two links: privatize would copy it
    base = tmp_path / "base"
    base.mkdir()
    os.symlink(outside, base / "dir")
    tp = TwoPass(["rsync", "--", "src/", f"{base}/"], str(tmp_path))
    tp.start()
    tp.on_item(b">f.st......", b"dir/victim")
    tp.on_item(b"*deleting", b"dir/second")
    assert tp.error is None
    tp.finish(1)
    tp.close()
    assert os.lstat(outside / "victim").st_nlink == 2  # neither copied nor unlinked
    assert (outside / "second").exists()
    tp.start()
    tp.on_item(b">f.st......", b"../escape")
    assert tp.error is not None and "unsafe path" in tp.error
    tp.close()


def test_a_dry_run_whose_list_does_not_add_up_is_not_trusted(tmp_path: Path) -> None:
    tp = TwoPass(["rsync", "--", "src/", f"{tmp_path}/"], str(tmp_path))
    tp.start()
    tp.on_item(b">f+++++++++", b"new")
    with pytest.raises(ReleaseSyncError, match="cannot be trusted"):
        tp.finish(2)
    with pytest.raises(ReleaseSyncError):
        tp.finish(None)  # no stats: cannot tell
    tp.close()


@pytest.fixture
def rel(daemons: Daemons, tmp_path: Path) -> Rel:
    return Rel(daemons, tmp_path)


def prepared_base(rel: Rel) -> list[str]:
    root = Path(f"{rel.src}.releases")
    return [n for n in os.listdir(root) if n.startswith(".base-")]


def test_releases_from_a_prepared_base_never_touch_the_live_or_rollback_inodes(rel: Rel) -> None:
    """Against a real rsync daemon and agent: the first sync links into a fresh directory and
    leaves a prepared base behind; the next ones run in two passes from it. A permission-only
    change at the source reaches the new release and not the release before it."""
    rel.sync("v1")
    wait_until(lambda: prepared_base(rel), 30, what="a prepared base")
    first = Path(os.path.realpath(rel.src))
    before = snapshot(first)
    victim = next(p for p in sorted(rel.tree.rglob("*.dat")))
    os.chmod(victim, 0o600)  # permission only: rsync would chmod a shared inode in place
    set_version(rel.tree, "v2")
    (rel.tree / "d00" / "new.txt").write_text("new")
    rel.sync("v2")
    record = read_state(str(rel.state / f"{rel.key()}.json")) or {}
    assert record.get("releaseTwoPass") is True, record
    second = Path(os.path.realpath(rel.src))
    assert second != first and rel.live_version() == "v2"
    assert snapshot(first) == before  # the rollback target: not an inode changed
    same_tree(rel.tree, second)
    relative = victim.relative_to(rel.tree)
    assert stat.S_IMODE(os.lstat(second / relative).st_mode) == 0o600
    unchanged = next(p for p in sorted(rel.tree.rglob("*.dat")) if p != victim)
    shared = unchanged.relative_to(rel.tree)
    assert os.lstat(second / shared).st_ino == os.lstat(first / shared).st_ino  # no disk
    wait_until(lambda: prepared_base(rel) == [f".base-{second.name}"], 30, what="the next base")
    status, body = ask(rel.agent, "rollback", "web")
    assert status == 200, body
    assert rel.live_version() == "v1"
    assert stat.S_IMODE(os.lstat(rel.src / relative).st_mode) != 0o600


def test_random_kills_during_two_passes_never_touch_another_release(
    daemons: Daemons, tmp_path: Path
) -> None:
    """kill -9 of the supervisor or of its rsync (the dry run, the real run) at random moments
    of two-pass syncs that privatize hundreds of files: the live release and the rollback target
    keep every inode, mode, time and byte, `src` resolves, and the next sync, from the partial the
    killed one left, makes the source's tree (TWO_PASS_KILLS rounds, 4 by default)."""
    import random
    import signal
    import time

    from deploy.process import is_same_process

    rel = Rel(daemons, tmp_path, "--bwlimit=100", files=2000)
    rounds = int(os.environ.get("TWO_PASS_KILLS", "4"))
    rng = random.Random(os.environ.get("TWO_PASS_KILL_SEED", "23"))
    record_path = rel.state / f"{rel.key()}.json"
    rel.sync("v0")
    rel.sync("v1")  # two releases: a live one and a rollback target
    files = sorted(rel.tree.rglob("*.dat"))
    for n in range(rounds):
        kept = {p: snapshot(p) for p in Path(f"{rel.src}.releases").iterdir() if p.name[0] != "."}
        for i, path in enumerate(files):  # permission-only changes: each one a private copy
            os.chmod(path, 0o664 if (i + n) % 2 else 0o644)  # the daemon (nobody) reads them
        for path in files[n * 40 : n * 40 + 40]:
            path.write_bytes(os.urandom(2000))  # content: the real run takes a while
        set_version(rel.tree, f"round{n}")
        status, body = ask_with(rel.agent, "rsync", "web", release=f"r{n}")
        assert status == 200, body
        # early moments hit the dry run and the private copies, later ones the real run
        at = time.monotonic() + (rng.uniform(0.0, 0.3) if n % 3 else rng.uniform(0.3, 1.0))
        wait_until(lambda at=at: time.monotonic() >= at, what="the chosen moment")
        record = read_state(str(record_path)) or {}
        victim = ("supervisor", "rsync")[(n // 3) % 2]
        pid, start = record.get(f"{victim}Pid"), record.get(f"{victim}Start")
        if record.get("runId") == body["runId"] and pid and is_same_process(pid, start):
            os.kill(pid, signal.SIGKILL)

        def settled(run: str = body["runId"]) -> bool:
            now = read_state(str(record_path)) or {}
            if now.get("runId") != run:
                return True
            return not is_same_process(now.get("supervisorPid"), now.get("supervisorStart"))

        wait_until(settled, 60, what="the supervisor to be gone")
        for path, before in kept.items():
            if path.exists():  # cleanup may have taken an old one out after a switch
                assert snapshot(path) == before, f"{path.name} changed"
        assert os.path.exists(rel.src / "VERSION"), "src does not resolve"
        wait_until(lambda: ask(rel.agent, "status", "web")[1].get("alreadyRsync") != "true", 60)
    rel.sync("after")  # from what the last killed sync left, when it left something
    assert rel.live_version() == f"round{rounds - 1}"
    same_tree(rel.tree, Path(os.path.realpath(rel.src)))


def test_a_small_tree_links_into_a_fresh_directory(daemons: Daemons, tmp_path: Path) -> None:
    """Below `two_pass_min_files` (the live release's files) no base is prepared: for a small
    tree one --link-dest run into a fresh directory costs as much as two passes, and a rollout
    of small releases pays the extra runs on every host (bench/RESULTS.md)."""
    from deploy.process import is_same_process

    rel = Rel(daemons, tmp_path, two_pass_min_files=1000)  # 30 files
    record_path = rel.state / f"{rel.key()}.json"
    for label in ("v1", "v2"):
        set_version(rel.tree, label)
        rel.sync(label)
        record = read_state(str(record_path)) or {}
        assert "releaseTwoPass" not in record
        linked = any(a.startswith("--link-dest=") for a in record["argv"])
        assert linked == (label == "v2"), record["argv"]  # v1: nothing live to link to
        pid, start = record.get("supervisorPid"), record.get("supervisorStart")
        wait_until(lambda p=pid, s=start: not is_same_process(p, s), 30, what="the exit")
        assert prepared_base(rel) == []
