"""The sync supervisor's command line and environment, both ends of them: what the agent spawns
(`supervisor_command`, `import_path_env`) and how the supervisor reads them back (`parse_args`,
`drop_import_path`)."""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

# The supervisor starts with every sync: `-S` spares it the site processing (every .pth file of
# the environment, e.g. setuptools' distutils hack), which it does not need: it imports only the
# standard library and `deploy`, found through PYTHONPATH (deploy.jobstart.child_env).
# -P: nor the working directory it inherits from the agent first on sys.path (a module there
# would run as root).
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
    cmd = [python, *PYTHON_FLAGS, "-m", MODULE, "--state", state, "--run", run_id]
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


def import_path_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with `deploy` importable as here: our package root first on PYTHONPATH."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), env.get("PYTHONPATH")) if p)
    return env


def drop_import_path(env: MutableMapping[str, str]) -> None:
    """Undo `import_path_env` in `env` (the supervisor's own, once `deploy` is imported): rsync
    and the release hooks it runs get the agent's environment, not a PYTHONPATH that puts
    deploy's site-packages before their own interpreter's libraries."""
    parts = env.get("PYTHONPATH", "").split(os.pathsep)
    if parts[0] != package_root():
        return
    if len(parts) > 1:
        env["PYTHONPATH"] = os.pathsep.join(parts[1:])
    else:
        del env["PYTHONPATH"]
