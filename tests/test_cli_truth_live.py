"""Issue 15 with syncs that take a few seconds and a proxy, with a real agent, a real proxy and the
real deploy-client: `eta` falls while `elapsed` grows, `--format ndjson --wait` shows life, the
`--wait` line sums the syncs up within the terminal's width, a host that did not answer is null at
both levels, and group names through the proxy match as the original's did."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.rsync_output import clock_seconds
from tests.conftest import JOBS, Daemons
from tests.harness import (
    AgentProcess,
    ClientRun,
    ProxyProcess,
    free_port,
    make_tree,
    run_client,
    tool,
    wait_until,
)
from tests.test_cli_formats import TtyClient, clean_env, down_host

# 800 KB at 200 KB/s: about 4 s, several files (rsync prints the elapsed time as each ends).
SYNC = ["--archive", "--delete", "--force", "--bwlimit=200"]
NOT_GRANTED = "You don't have permisson to access on this[{}]."


@dataclass
class Live:
    agent: AgentProcess
    proxy: ProxyProcess
    down: str
    home: Path

    def env(self) -> dict[str, str]:
        return clean_env(HOME=str(self.home))

    def run(self, *args: str, hosts: str | None = None) -> ClientRun:
        return run_client(f"--hosts={hosts or self.agent.address}", *args, env=self.env())

    def content(self, order: str, options: str) -> Any:
        run = self.run(f"--order={order}", f"--options={options}")
        return run.content(self.agent.address, order)

    def through(self, args: str, *more: str) -> ClientRun:
        return self.run("--api-key=k1", f"--args={args}", *more, hosts=self.proxy.address)


@pytest.fixture(scope="module")
def live(module_daemons: Daemons) -> Live:
    work = module_daemons.workdir
    tree = make_tree(work / "tree", files=8, size=100_000, dirs=2)
    targets = work / "targets"
    targets.mkdir()
    rsyncd = module_daemons.rsyncd({"DEST": tree})
    jobs = work / "jobs.ini"
    jobs.write_text(JOBS)
    groups = {f"live{i}": rsyncd.group(targets / f"live{i}", *SYNC) for i in range(1, 4)}
    agent = module_daemons.agent(
        groups=groups, jobs=jobs, state=work / "state", allow_paths=[targets]
    )
    down = down_host()
    api = work / "api.ini"
    api.write_text(
        "[keys]\nk1[] = fleet\nk1[] = Web\nk1[] = db\nk1[] = DB\n\n[servers]\n"
        f"fleet[] = {agent.address}\nfleet[] = {down}\n"
        f"Web[] = {agent.address}\ndb[] = {agent.address}\nDB[] = {down}\n"
    )
    port = free_port()
    proxy = module_daemons.proxy(
        f"[server]\naddr = 127.0.0.1\nport = {port}\n\n[client]\nthread_timeout = 10\n\n"
        f"[allow::hosts]\nhost[] = 127.0.0.0/8\n\n[api]\npath = {api}\n",
        "127.0.0.1",
        port,
    )
    home = work / "home"
    home.mkdir()
    return Live(agent, proxy, down, home)


def seconds(text: Any) -> int:
    value = clock_seconds(text)
    assert value is not None, text
    return value


# ------------------------------------------------------------------------------ item 1


def test_eta_falls_while_elapsed_grows(live: Live) -> None:
    """Item 1: while a sync runs, status's `progress.eta` is the time left, falling as the sync
    proceeds (it was the elapsed time, climbing), and `elapsed` beside it grows."""
    assert live.content("rsync", "live1")["return"] == "true"
    samples: list[dict[str, Any]] = []

    def ended() -> bool:
        status = live.content("status", "live1")
        if status.get("alreadyRsync") == "true":
            if status.get("progress"):
                samples.append(status["progress"])
            return False
        return True

    wait_until(ended, 60, 0.05, "the sync of live1 to end")
    early = [p for p in samples if 5 <= p["percent"] <= 50]
    late = [p for p in samples if p["percent"] >= 70]
    assert early and late, samples
    assert seconds(early[0]["eta"]) > seconds(late[-1]["eta"]), samples
    elapsed = [seconds(p["elapsed"]) for p in samples]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= 2, samples
    last = live.content("status", "live1")["lastRsync"]
    assert last["outcome"] == "ok" and last["transferFilesCount"] == 8


# ------------------------------------------------------------------------------ item 7


def start_waiting_client(host: str, group: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The real deploy-client following a sync of `group` on `host` with NDJSON on a pipe."""
    argv = [tool("deploy-client"), f"--hosts={host}", "--order=rsync", f"--options={group}"]
    return subprocess.Popen(
        [*argv, "--wait", "--format=ndjson"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def timed_lines(proc: subprocess.Popen[bytes], into: list[tuple[float, dict[str, Any]]]) -> None:
    """Each stdout line of `proc`, parsed, with when it came (run in a thread)."""
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        into.append((time.monotonic(), json.loads(line)))


def test_ndjson_wait_shows_progress_events_then_the_result(live: Live) -> None:
    """Item 7: `--format ndjson --wait` prints a progress event per host while its sync runs,
    at most one every 2 s, before the host's result line and the summary."""
    proc = start_waiting_client(live.agent.address, "live2", live.env())
    lines: list[tuple[float, dict[str, Any]]] = []
    reader = threading.Thread(target=timed_lines, args=(proc, lines))
    reader.start()
    try:
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    events = [(t, line) for t, line in lines if "event" in line]
    (result_at, result), (_, summary) = [(t, line) for t, line in lines if "event" not in line]
    assert result["outcome"] == "ok" and summary["summary"]["exitCode"] == 0
    assert events, lines
    assert all(t < result_at for t, _ in events)
    assert result_at - events[0][0] > 1.0  # life shown well before the end
    for _, event in events:
        assert sorted(event) == ["bytes", "elapsed", "eta", "event", "host", "percent"]
        assert event["host"] == live.agent.address and event["event"] == "progress"
    gaps = [b[0] - a[0] for a, b in zip(events, events[1:], strict=False)]
    assert all(gap > 1.5 for gap in gaps), gaps  # 2 s apart, as the client timed them
    percents = [event["percent"] for _, event in events]
    assert percents == sorted(percents)


# ------------------------------------------------------------------------------ items 7, 8


def test_wait_line_sums_up_within_the_terminal_through_a_proxy(live: Live) -> None:
    """Item 8: the --wait line on a terminal is a summary (`1/2 syncing, 0 done, 1 failed, N% of
    bytes`) that fits the terminal's width, the agent that was down counted failed at once;
    item 7 through a proxy: each progress event names the proxy in `via`."""
    args = [f"--hosts={live.proxy.address}", "--api-key=k1", "--args=groups:fleet"]
    args += ["--order=rsync", "--options=live3", "--wait", "--format=ndjson"]
    rc, out, tty = TtyClient(args, live.env(), columns=46).finish()
    assert rc == 3, out + tty
    drawn = [text for text in tty.split("\r\x1b[K") if text]
    assert drawn and all(len(text) <= 45 for text in drawn), drawn
    assert "0/1 syncing, 0 done, 0 failed" in drawn  # before the proxy answered
    assert any(re.fullmatch(r"1/2 syncing, 0 done, 1 failed, \d+% of bytes", t) for t in drawn)
    assert "0/2 syncing, 1 done, 1 failed, 100% of bytes" in drawn
    assert live.agent.address not in tty  # no list of hosts, cut after one and a half
    lines = [json.loads(line) for line in out.splitlines()]
    events = [line for line in lines if "event" in line]
    assert events and all(
        (e["host"], e["via"]) == (live.agent.address, live.proxy.address) for e in events
    )
    rows = {line["host"]: line for line in lines if "order" in line}
    assert rows[live.agent.address]["outcome"] == "ok"
    assert rows[live.down]["outcome"] == "unreachable"


# ------------------------------------------------------------------------------ items 5, 6


def test_a_host_that_did_not_answer_is_null_at_both_levels(live: Live) -> None:
    """Item 5: a host that gives no answer has `returnCode` and `returnString` null, from the
    plain and the Twisted client alike and inside a proxy's answer; a host that answered has
    the original's types: a string in the client's output, a number in the proxy's."""
    exec_echo = ("--order=exec", "--options=service:echo,hi")
    for extra in ((), ("--debug",)):
        direct = live.run(*exec_echo, *extra, hosts=live.down)
        assert direct.rc == 3
        entry = direct.entry(live.down, "exec")
        assert (entry["returnCode"], entry["returnString"], entry["serverStatus"]) == (
            None,
            None,
            0,
        )
    via = live.through("groups:fleet", *exec_echo)
    assert via.rc == 3, via.stdout
    outer = via.entry(live.proxy.address, "exec")
    assert (outer["returnCode"], outer["returnString"]) == ("200", "OK")
    inner = outer["content"]
    answered = inner[live.agent.address]["exec"]
    assert (answered["returnCode"], answered["returnString"]) == (200, "OK")
    silent = inner[live.down]["exec"]
    assert (silent["returnCode"], silent["returnString"], silent["serverStatus"]) == (
        None,
        None,
        0,
    )


def test_group_names_match_exactly_then_in_any_case(live: Live) -> None:
    """Item 6: through the proxy a group name matches exactly first, then case-insensitively
    when only one group fits (the original lower-cased --args); two that fit is a refusal."""

    def reached(args: str) -> list[str]:
        run = live.through(args, "--order=exec", "--options=service:echo,hi")
        content = run.content(live.proxy.address, "exec")
        return sorted(content) if isinstance(content, dict) else [content]

    assert reached("groups:Web") == [live.agent.address]
    assert reached("groups:web") == [live.agent.address]
    assert reached("GROUPS:WEB") == [live.agent.address]
    assert reached("groups:db") == [live.agent.address]
    assert reached("groups:DB") == [live.down]
    assert reached("groups:Db") == [NOT_GRANTED.format("Db")]
    assert reached("groups:nosuch") == [NOT_GRANTED.format("nosuch")]
