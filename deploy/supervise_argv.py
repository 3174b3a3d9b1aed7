"""The sync supervisor's command line, both ends of it: the one the agent spawns
(`supervisor_command`) and how the supervisor reads it back (`parse_args`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

# The supervisor starts with every sync: `-S` spares it the site processing (every .pth file of
# the environment, e.g. setuptools' distutils hack), which it does not need: it imports only the
# standard library and `deploy`. `-P`: the working directory it inherits from the agent is not on
# sys.path (a module there would run as root). `deploy` is found by appending its package root to
# sys.path (`bootstrap`): after the standard library, where PYTHONPATH would put it before (and
# with it any stdlib-named backport of that directory), and without changing the environment
# rsync and the release hooks get.
PYTHON_FLAGS = ("-S", "-P")
MODULE = "deploy.supervise"
USAGE = (
    f"usage: python -m {MODULE} --state FILE [--run ID] [--grace S] [--refuse-empty] "
    "[--source-retry S] -- RSYNC ARGV..."
)
# option: the Supervisor's parameter it sets, and its type
_VALUES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "--state": ("state_path", str),
    "--run": ("run_id", str),  # the run id the starting record must hold
    "--grace": ("grace", float),
    "--source-retry": ("source_retry", float),
}


class UsageError(ValueError):
    """A command line the supervisor cannot run (it is the agent's, never a user's)."""


def supervisor_command(
    python: str,
    state: str,
    run_id: str,
    grace: float,
    refuse_empty: bool,
    source_retry: float | None,
    rsync_argv: Sequence[str],
) -> list[str]:
    """The argv that runs the supervisor of one sync with `python`."""
    cmd = [python, *PYTHON_FLAGS, "-c", bootstrap(package_root()), "--state", state]
    cmd += ["--run", run_id]
    cmd += ["--grace", str(grace)]
    if refuse_empty:
        cmd.append("--refuse-empty")
    if source_retry is not None:  # a source at max connections: retry for this long
        cmd += ["--source-retry", f"{source_retry:g}"]
    return [*cmd, "--", *rsync_argv]


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The options (`--name value` or `--name=value`), as the Supervisor's keyword arguments, and
    the rsync command line after `--` or the first word that is not an option. By hand: argparse
    would cost every sync its import."""
    options: dict[str, Any] = {"run_id": None, "grace": 5.0, "source_retry": 0.0}
    options["refuse_empty"] = False
    rest = list(argv)
    while rest and rest[0].startswith("--") and rest[0] != "--":
        name, eq, value = rest.pop(0).partition("=")
        if name == "--refuse-empty" and not eq:
            options["refuse_empty"] = True
            continue
        if name not in _VALUES:
            raise UsageError(f"unknown option {name}")
        if not eq:
            if not rest:
                raise UsageError(f"{name} needs a value")
            value = rest.pop(0)
        key, kind = _VALUES[name]
        try:
            options[key] = kind(value)
        except ValueError:
            raise UsageError(f"{name}: not a valid value: {value!r}") from None
    rsync_argv = rest[1:] if rest[:1] == ["--"] else rest
    if "state_path" not in options:
        raise UsageError("--state is required")
    if len(rsync_argv) < 3:
        raise UsageError("need an rsync command line after --")
    return options, rsync_argv


def package_root() -> str:
    """The directory `deploy` is imported from (installed or a checkout)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bootstrap(root: str) -> str:
    """The `-c` program that runs the supervisor with `deploy` imported from `root`."""
    return (
        f"import sys; sys.path.append({root!r}); "
        f"from {MODULE} import exit_now, main; exit_now(main())"
    )
