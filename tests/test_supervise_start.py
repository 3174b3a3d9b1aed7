"""How the agent starts a sync's supervisor cheaply: its command line (both ends, in
deploy.supervise_argv), its interpreter flags and what it imports; and the empty-source guard's
answer from a finished sync's own stats (deploy.source_listing)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from deploy.jobstart import child_env
from deploy.source_listing import refusal, synced_nothing
from deploy.supervise import Supervisor, main
from deploy.supervise_argv import UsageError, parse_args, supervisor_command

RSYNC = ["rsync", "--archive", "--delete", "--", "h::M/", "/t"]


def test_the_command_the_agent_builds_is_the_one_the_supervisor_reads() -> None:
    """supervisor_command and parse_args agree on every option, with and without the optional
    ones; the interpreter runs with -S (no site processing) and the module by name."""
    cmd = supervisor_command("/py", "/s/j.json", "run-1", 2.5, True, 30.0, RSYNC)
    assert cmd[:4] == ["/py", "-S", "-m", "deploy.supervise"]
    options, argv = parse_args(cmd[4:])
    assert argv == RSYNC
    assert options == {
        "state_path": "/s/j.json",
        "run_id": "run-1",
        "grace": 2.5,
        "refuse_empty": True,
        "source_retry": 30.0,
    }
    options, argv = parse_args(supervisor_command("/py", "/s", "r", 5, False, None, RSYNC)[4:])
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
    """Started as the agent starts it (-S, child_env), the supervisor and its release steps
    load no site processing, no argparse, no dataclasses (nor the inspect they import), no
    ctypes, no secrets and no Twisted: each would be paid again by every sync."""
    code = (
        "import sys\n"
        "import deploy.supervise, deploy.release_steps\n"
        "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], env=child_env(), capture_output=True, check=True
    )
    loaded = set(out.stdout.decode().split())
    assert {"deploy", "subprocess", "json"} <= loaded
    unwanted = {"site", "argparse", "dataclasses", "inspect", "ctypes", "secrets", "twisted"}
    assert not loaded & unwanted


def test_synced_nothing_reads_the_stats_as_the_listing_would() -> None:
    """A sync whose file list held its top directory alone listed nothing; a lone file, or
    more than one entry, is something; without a breakdown (rsync < 3.1) or without any count a
    lone entry is taken for nothing (the safe side)."""
    assert synced_nothing(1, {"dir": 1})
    assert not synced_nothing(1, {"reg": 1})
    assert not synced_nothing(2, {"dir": 2})
    assert not synced_nothing(201, {"reg": 200, "dir": 1})
    assert synced_nothing(1, None) and synced_nothing(None, None) and synced_nothing(0, None)
    assert not synced_nothing(5, None)


def test_the_refusal_says_why_and_how_to_allow_it() -> None:
    """Both refusals name the source, say it lists no files and name allow_empty_source."""
    for release in (False, True):
        text = refusal("h::M/", release)
        assert "source h::M/ lists no files" in text and "allow_empty_source = true" in text
    assert "--delete" in refusal("h::M/", False) and "release" in refusal("h::M/", True)
