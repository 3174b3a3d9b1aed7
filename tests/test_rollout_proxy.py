"""A rollout through a real deploy-proxy: it answers `deploy` at once with a rolloutId, goes on
after its client is killed, can be re-attached and listed, refuses a second rollout of the same
group with 409, and a proxy restarted mid-rollout reports it `interrupted`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from deploy.jobstate import read_state
from tests.conftest import Daemons
from tests.harness import ProxyProcess, free_port, run_client, tool, wait_until
from tests.test_rollout_deploy import Fleet


class Proxied:
    """A fleet of agents behind one proxy that keeps its rollouts in `state`."""

    def __init__(self, daemons: Daemons, work: Path, agents: int, home: Path) -> None:
        self.fleet = Fleet(daemons, work, ["check:ok"] * agents, "--bwlimit=20")
        api = work / "api.ini"
        servers = "".join(f"grp[] = {h}\n" for h in self.fleet.hosts)
        api.write_text(f"[keys]\nk1 = grp\n[servers]\n{servers}")
        self.port = free_port()
        self.state = work / "proxy-state"
        self.text = (
            f"[server]\naddr = 127.0.0.1\nport = {self.port}\nstate_path = {self.state}\n"
            f"[client]\nport = {self.fleet.port}\n"
            f"[allow::hosts]\nhost[] = 127.0.0.0/8\n[api]\npath = {api}\n"
        )
        self.daemons = daemons
        self.proxy: ProxyProcess = daemons.proxy(self.text, "127.0.0.1", self.port)
        self.env = {**os.environ, "HOME": str(home)}
        self.via = [f"--hosts=127.0.0.1:{self.port}", "--api-key=k1"]

    def start_deploy(self, *args: str) -> tuple[subprocess.Popen[bytes], str]:
        """A deploy-client running the rollout; answers it and the rolloutId it printed."""
        proc = subprocess.Popen(
            [tool("deploy-client"), *self.via, "--args=groups:grp", "--order=deploy"]
            + ["--options=web", "--format=ndjson", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert "rollout " in line, line
        return proc, line.split("rollout ", 1)[1].split()[0]

    def record(self, rollout_id: str) -> dict[str, Any]:
        return read_state(str(self.state / f"rollout-{rollout_id}.json")) or {}


def test_rollout_outlives_its_client_is_reattached_and_refuses_a_second(
    daemons: Daemons, tmp_path: Path, home: Path
) -> None:
    """The proxy runs the rollout on after its client is killed; a second rollout of the same
    group is 409 naming the first; --order=rollout --options=ID re-attaches to the end (exit 0,
    per-host timings of their own); --order=rollout lists it."""
    p = Proxied(daemons, tmp_path, 3, home)
    proc, rollout_id = p.start_deploy("--batch=1", "--release=r1")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    second = run_client(*p.via, "--args=groups:grp", "--order=deploy", "--options=web", env=p.env)
    assert second.rc == 2 and rollout_id in second.stdout, second.stdout
    assert "409" in second.stdout
    out = run_client(*p.via, "--order=rollout", f"--options={rollout_id}", env=p.env)
    assert out.rc == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert set(result) == set(a.address.split(":")[0] for a in p.fleet.agents)
    seconds = [entry["deploy"]["content"]["seconds"] for entry in result.values()]
    # each host's own (two may still agree to the millisecond)
    assert all(s > 0 for s in seconds) and len(set(seconds)) > 1
    assert all(p.fleet.live(i) == "v1" for i in range(3))
    listing = run_client(*p.via, "--order=rollout", "--format=ndjson", env=p.env)
    assert listing.rc == 0
    first = json.loads(listing.stdout.splitlines()[0])
    assert first["rolloutId"] == rollout_id and first["state"] == "done"


def test_a_proxy_restarted_mid_rollout_reports_it_interrupted(
    daemons: Daemons, tmp_path: Path, home: Path
) -> None:
    """kill -9 of the proxy during a rollout; once restarted it names the rollout
    `interrupted` with what was done, and following it ends (not exit 0)."""
    p = Proxied(daemons, tmp_path, 3, home)
    proc, rollout_id = p.start_deploy("--batch=1")
    wait_until(lambda: p.record(rollout_id).get("events"), 30, what="the rollout's first save")
    proc.kill()
    proc.wait(10)
    p.proxy.kill()
    p.proxy = daemons.proxy(p.text, "127.0.0.1", p.port)
    assert p.record(rollout_id)["state"] == "interrupted"
    out = run_client(
        *p.via, "--order=rollout", f"--options={rollout_id}", "--format=table", env=p.env
    )
    assert out.rc == 2, out.stdout + out.stderr
    assert "interrupted" in out.stdout and "was interrupted" in out.stderr
