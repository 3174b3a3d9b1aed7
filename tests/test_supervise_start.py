"""How the agent starts a sync's supervisor cheaply: its command line (both ends, in
deploy.supervise_argv), its interpreter flags and what it imports; and the empty-source guard's
answer from a finished sync's own stats (deploy.source_listing)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.jobstart import child_env
from deploy.rsync_output import RsyncOutputParser
from deploy.source_listing import refusal, synced_nothing
from deploy.supervise import Supervisor, main
from deploy.supervise_argv import (
    UsageError,
    bootstrap,
    package_root,
    parse_args,
    supervisor_command,
)

RSYNC = ["rsync", "--archive", "--delete", "--", "h::M/", "/t"]


def test_the_command_the_agent_builds_is_the_one_the_supervisor_reads() -> None:
    """supervisor_command and parse_args agree on every option, with and without the optional
    ones; the interpreter runs with -S (no site processing), -P (not the working directory
    first on sys.path) and a program that appends deploy's root to sys.path."""
    cmd = supervisor_command("/py", "/s/j.json", "run-1", 2.5, True, 30.0, RSYNC)
    assert cmd[:5] == ["/py", "-S", "-P", "-c", bootstrap(package_root())]
    options, argv = parse_args(cmd[5:])
    assert argv == RSYNC
    assert options == {
        "state_path": "/s/j.json",
        "run_id": "run-1",
        "grace": 2.5,
        "refuse_empty": True,
        "source_retry": 30.0,
    }
    options, argv = parse_args(supervisor_command("/py", "/s", "r", 5, False, None, RSYNC)[5:])
    assert argv == RSYNC and not options["refuse_empty"] and options["source_retry"] == 0.0
    options, argv = parse_args(["--state=/s", "--grace=1", *RSYNC])
    assert options["state_path"] == "/s" and options["grace"] == 1.0 and argv == RSYNC
    assert sorted(options) == sorted(inspect.signature(Supervisor).parameters.keys() - {"argv"})


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--", *RSYNC], "--state is required"),
        (["--state", "/s", "--", "rsync", "x"], "need an rsync command line"),
        (["--state", "/s", "--bogus", "--", *RSYNC], "unknown option --bogus"),
        (["--state", "/s", "--grace", "soon", "--", *RSYNC], "--grace: not a valid value"),
        (["--state"], "--state needs a value"),
        (["--state", "/s", "--refuse-empty=yes", "--", *RSYNC], "unknown option"),
    ],
)
def test_a_command_line_the_supervisor_cannot_run(
    argv: list[str], says: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A wrong command line is a UsageError naming the fault; main() prints the usage and it,
    and exits 2 without touching anything."""
    with pytest.raises(UsageError, match=says):
        parse_args(argv)
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert err.startswith("usage: python -m deploy.supervise") and says in err


def test_the_supervisor_imports_little() -> None:
    """Started as the agent starts it (-S -P, deploy's root appended), the supervisor and its
    release steps load no site processing, no argparse, no dataclasses (nor the inspect they
    import), no ctypes, no secrets and no Twisted: each would be paid again by every sync."""
    code = (
        "import sys\n"
        "import deploy.supervise, deploy.release_steps\n"
        "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    code = f"import sys; sys.path.append({package_root()!r})\n" + code
    out = subprocess.run(
        [sys.executable, "-S", "-P", "-c", code], env=child_env(), capture_output=True, check=True
    )
    loaded = set(out.stdout.decode().split())
    assert {"deploy", "subprocess", "json"} <= loaded
    unwanted = {"site", "argparse", "dataclasses", "inspect", "ctypes", "secrets", "twisted"}
    assert not loaded & unwanted


def test_synced_nothing_reads_the_stats_as_the_listing_would() -> None:
    """A sync whose file list held its top directory alone listed nothing; a lone file, or
    more than one entry, is something; without any count, or with a lone entry and no breakdown
    by kind (rsync < 3.1), the stats cannot tell (None)."""
    assert synced_nothing(1, {"dir": 1}) is True
    assert synced_nothing(1, {"reg": 1}) is False
    assert synced_nothing(2, {"dir": 2}) is False
    assert synced_nothing(201, {"reg": 200, "dir": 1}) is False
    assert synced_nothing(5, None) is False and synced_nothing(0, None) is True
    assert synced_nothing(1, None) is None and synced_nothing(None, None) is None
    # --relative adds the source path's implied directories to the file list (an empty source
    # shows `3 (dir: 3)`), --files-from lists other names: the listing decides
    for option in ("--relative", "-aR", "--files-from=/tmp/list", "--files-from"):
        argv = ["rsync", "--archive", option, "--", "h::M/", "/t/"]
        assert synced_nothing(3, {"dir": 3}, argv) is None
    assert synced_nothing(3, {"dir": 3}, ["rsync", "-av", "--", "h::M/", "/t/"]) is False


def test_the_release_guard_lists_the_source_only_when_the_stats_cannot_tell(tmp_path: Path) -> None:
    """A finished release sync is judged by its stats, with no listing; when they cannot tell
    (the group's options silenced them, e.g. --quiet) the listing decides, after the sync and
    before the release can go live. In-place syncs and outcomes that are not ok are not judged."""
    listing = tmp_path / "listing"
    fake = tmp_path / "rsync"
    fake.write_text(f"#!{sys.executable}\nprint(open({str(listing)!r}).read(), end='')\n")
    fake.chmod(0o755)
    argv = [str(fake), "--archive", "--quiet", "--", "h::M/", "/t/"]
    supervisor = Supervisor(str(tmp_path / "j.json"), argv, 1.0, refuse_empty=True)
    supervisor.state = {"release": {}, "releaseId": "r"}
    quiet = RsyncOutputParser(keep_lists=False)
    listing.write_text("drwxr-xr-x 4,096 2024/01/01 00:00:00 .\n")
    assert supervisor.empty_release("ok", quiet) and supervisor.empty_release("warning", quiet)
    assert not supervisor.empty_release("failed", quiet)
    stats = RsyncOutputParser(keep_lists=False)
    stats.feed(b"Number of files: 3 (reg: 2, dir: 1)\n")
    assert not supervisor.empty_release("ok", stats)  # the stats say files: the listing unasked
    listing.write_text(".\n-rw-r--r-- 2 2024/01/01 00:00:00 a\n")
    assert not supervisor.empty_release("ok", quiet)
    empty = RsyncOutputParser(keep_lists=False)
    empty.feed(b"Number of files: 1 (dir: 1)\n")
    assert supervisor.empty_release("ok", empty)  # the stats say nothing: the listing unasked
    supervisor.state = {}
    assert not supervisor.empty_release("ok", empty)


def test_a_release_the_guard_cannot_check_is_not_activated(tmp_path: Path) -> None:
    """After a release sync whose stats cannot tell, a listing that fails (a busy or unreachable
    source, a timeout) must not let the release go live: the guard answers None (the run then
    ends `failed`, saying why), never False."""
    fake = tmp_path / "rsync"
    fake.write_text("#!/bin/sh\nexit 5\n")  # @ERROR: max connections
    fake.chmod(0o755)
    argv = [str(fake), "--archive", "--quiet", "--", "h::M/", "/t/"]
    supervisor = Supervisor(str(tmp_path / "j.json"), argv, 1.0, refuse_empty=True)
    supervisor.state = {"release": {}, "releaseId": "r"}
    assert supervisor.empty_release("ok", RsyncOutputParser(keep_lists=False)) is None
    assert supervisor.source_is_empty() is None


def test_the_refusal_says_why_and_how_to_allow_it() -> None:
    """Both refusals name the source, say it lists no files and name allow_empty_source."""
    for release in (False, True):
        text = refusal("h::M/", release)
        assert "source h::M/ lists no files" in text and "allow_empty_source = true" in text
    assert "--delete" in refusal("h::M/", False) and "release" in refusal("h::M/", True)


def test_the_supervisor_finds_deploy_after_the_standard_library(tmp_path: Path) -> None:
    """Started as the agent starts it, from a working directory holding a module named like a
    standard one, with deploy's root (a site-packages, say) holding another: the supervisor
    imports neither (-P; the root appended after the standard library) and still finds deploy;
    the environment it gets (and rsync and the release hooks with it) is the agent's."""
    (tmp_path / "selectors.py").write_text("raise SystemExit(7)\n")
    root = tmp_path / "site-packages"
    root.mkdir()
    (root / "deploy").symlink_to(Path(package_root()) / "deploy")
    (root / "json.py").write_text("raise SystemExit(8)\n")
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    assert child_env().get("PYTHONPATH") == os.environ.get("PYTHONPATH")  # nothing added
    cmd = supervisor_command(sys.executable, str(tmp_path / "j.json"), "r", 1, False, None, RSYNC)
    assert cmd[4] == bootstrap(package_root())
    code = bootstrap(str(root)).replace(
        "exit_now(main())", "import json, selectors; print(main(['--state']))"
    )
    out = subprocess.run(
        [*cmd[:4], code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.decode().strip() == "2", out
