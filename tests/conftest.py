"""Shared fixtures: hypothesis profiles, and real daemons (rsyncd, agents, proxies) that are
always stopped when a test ends, passing or failing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.harness import (
    AgentClient,
    AgentProcess,
    ChildProcess,
    ProxyProcess,
    RsyncDaemon,
    agent_ini,
    free_port,
    make_tree,
    stop_supervisors,
)

settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

JOBS = """\
; jobs for the tests, in the original's format
[service]
service:echo            =   /bin/echo %s
service:false           =   /bin/false %s
service:sleep           =   /bin/sleep %s
[application]
app:true                =   /bin/true
"""


@dataclass
class Daemons:
    """Starts real daemons for one test and remembers them so they can all be stopped."""

    workdir: Path
    started: list[ChildProcess] = field(default_factory=list)
    state_dirs: list[Path] = field(default_factory=list)

    def rsyncd(
        self, modules: dict[str, Path], host: str = "127.0.0.1", max_connections: int = 0
    ) -> RsyncDaemon:
        d = RsyncDaemon(self.workdir, modules, host, max_connections)
        self.started.append(d)
        return d

    def agent(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        extra: list[str] | None = None,
        wait: bool = True,
        **ini: Any,
    ) -> AgentProcess:
        port = port or free_port(host)
        ini.setdefault("state", self.workdir / "state")
        ini.setdefault("allow_paths", [self.workdir / "targets"])
        self.state_dirs.append(Path(ini["state"]))
        text = agent_ini(host=host, port=port, **ini)
        d = AgentProcess(self.workdir, text, host, port, extra, wait=False)
        self.started.append(d)
        if wait:
            d.wait_listening(host, port)
        return d

    def agent_from_text(
        self, text: str, host: str, port: int, *, extra: list[str] | None = None, wait: bool = True
    ) -> AgentProcess:
        d = AgentProcess(self.workdir, text, host, port, extra, wait=False)
        self.started.append(d)
        if wait:
            d.wait_listening(host, port)
        return d

    def proxy(
        self, text: str, host: str, port: int, *, extra: list[str] | None = None, wait: bool = True
    ) -> ProxyProcess:
        d = ProxyProcess(self.workdir, text, host, port, extra, wait=False)
        self.started.append(d)
        if wait:
            d.wait_listening(host, port)
        return d

    def stop_all(self) -> None:
        for d in reversed(self.started):
            d.stop()
        for s in self.state_dirs:
            stop_supervisors(s)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty HOME, so no ~/.config/deploy/client.ini of the machine leaks in."""
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """Daemons for one test, in its tmp_path, stopped when it ends."""
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.stop_all()


@pytest.fixture(scope="module")
def module_daemons(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemons]:
    """Daemons that the tests of one module share (its module-scoped fixtures start them), in
    a directory of their own, stopped when the module is done."""
    d = Daemons(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]))
    try:
        yield d
    finally:
        d.stop_all()


@dataclass
class Site(AgentClient):
    """An rsync daemon serving a release tree, and one agent with the usual groups."""

    daemons: Daemons
    workdir: Path
    tree: Path
    targets: Path
    state: Path
    jobs: Path
    rsyncd: RsyncDaemon
    agent: AgentProcess

    def groups(self) -> dict[str, dict[str, Any]]:
        return site_groups(self.rsyncd, self.targets)


def site_groups(rsyncd: RsyncDaemon, targets: Path) -> dict[str, dict[str, Any]]:
    base = ["--archive", "--delete", "--force"]
    return {
        "web": rsyncd.group(targets / "web", *base),
        "webslow": rsyncd.group(targets / "webslow", *base, "--bwlimit=200"),
        "weburl": {
            "dest": f"rsync://{rsyncd.host}:{rsyncd.port}/DEST/",
            "src": targets / "weburl",
        },
        "empty": rsyncd.group(targets / "empty", *base, module="EMPTY"),
        "badpath": rsyncd.group("/srv/peer-notallowed/web"),
    }


@pytest.fixture
def site(daemons: Daemons, tmp_path: Path) -> Site:
    tree = make_tree(tmp_path / "tree", files=40, size=2000)
    (tmp_path / "emptytree").mkdir()
    targets = tmp_path / "targets"
    targets.mkdir()
    jobs = tmp_path / "deploy_agent_exec.ini"
    jobs.write_text(JOBS)
    rsyncd = daemons.rsyncd({"DEST": tree, "EMPTY": tmp_path / "emptytree"})
    state = tmp_path / "state"
    agent = daemons.agent(
        groups=site_groups(rsyncd, targets),
        jobs=jobs,
        state=state,
        allow_paths=[targets],
        server={"rkill_grace": 2},
    )
    return Site(daemons, tmp_path, tree, targets, state, jobs, rsyncd, agent)
