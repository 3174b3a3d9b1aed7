"""Issue 15, "what the operator sees is true", with a real agent and the real deploy-client:
deletions counted in status, an unknown group named, a status row that is the order's own result
with the last sync beside it, the run id instead of a "job", long messages kept whole, and exit
code 130 when interrupted."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.output import EXIT_CODES
from tests.conftest import Daemons
from tests.harness import (
    AgentProcess,
    ChildProcess,
    ClientRun,
    RsyncDaemon,
    make_tree,
    run_client,
    tool,
    wait_until,
)
from tests.pki import ec_pair
from tests.test_cli_formats import clean_env
from tests.test_cli_truth_live import start_waiting_client

BASE = ["--archive", "--delete", "--force"]
STALE = 7  # stale files in the `del` target, beside a stale directory holding 2 more
RUN_ID = re.compile(r"[0-9a-f]{32}")
ROOT = Path(__file__).parent.parent


@dataclass
class Fleet:
    """An rsync daemon, a second one that the tests stop and start again, and one agent."""

    daemons: Daemons
    work: Path
    targets: Path
    rsyncd: RsyncDaemon
    flaky: ChildProcess
    agent: AgentProcess
    home: Path
    flaky_port: int

    def run(self, *args: str, hosts: str | None = None) -> ClientRun:
        return run_client(
            f"--hosts={hosts or self.agent.address}", *args, env=clean_env(HOME=str(self.home))
        )

    def order(self, order: str, options: str, *args: str) -> ClientRun:
        return self.run(f"--order={order}", f"--options={options}", *args)

    def content(self, order: str, options: str, *args: str) -> Any:
        return self.order(order, options, *args).content(self.agent.address, order)

    def flaky_down(self) -> None:
        self.flaky.stop()

    def flaky_up(self) -> None:
        """The second rsync daemon again, on the same address and port."""
        again = ChildProcess(self.flaky.argv, self.work / "flaky-again.out", name="rsyncd")
        self.daemons.started.append(again)
        again.wait_listening(self.flaky_host, self.flaky_port)
        self.flaky = again

    @property
    def flaky_host(self) -> str:
        return self.rsyncd.host


@pytest.fixture(scope="module")
def fleet(module_daemons: Daemons) -> Fleet:
    work = module_daemons.workdir
    tree = make_tree(work / "tree", files=40, size=2000)
    slow = work / "slow"
    slow.mkdir()
    with open(slow / "big.bin", "wb") as f:
        f.truncate(64 * 1024 * 1024)  # minutes at --bwlimit=100: time to look at the sync
    targets = work / "targets"
    stale = targets / "del"
    (stale / "olddir").mkdir(parents=True)
    for i in range(STALE):
        (stale / f"stale{i}.txt").write_text("old")
    for name in ("a", "b"):
        (stale / "olddir" / name).write_text("old")
    rsyncd = module_daemons.rsyncd({"DEST": tree, "SLOW": slow})
    flaky = module_daemons.rsyncd({"DEST": tree})
    groups = {
        "web": rsyncd.group(targets / "web", *BASE),
        "del": rsyncd.group(targets / "del", *BASE),
        "slow": rsyncd.group(targets / "slow", *BASE, "--bwlimit=100", module="SLOW"),
        "flaky": flaky.group(targets / "flaky", *BASE),
    }
    agent = module_daemons.agent(
        groups=groups, state=work / "state", allow_paths=[targets], server={"rkill_grace": 2}
    )
    home = work / "home"
    home.mkdir()
    return Fleet(module_daemons, work, targets, rsyncd, flaky, agent, home, flaky.port)


def table_rows(out: str) -> list[dict[str, str]]:
    """The table's rows as dicts of column → cell, each message whole again (its wrapped lines
    joined)."""
    lines = out.splitlines()
    head = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", head)]
    names = head.split()
    rows: list[dict[str, str]] = []
    for line in lines[1:-1]:
        if line[: starts[-1]].strip() == "":
            rows[-1]["MESSAGE"] += " " + line.strip()  # a wrapped message goes on
            continue
        cells = line[: starts[-1]].split() + [line[starts[-1] :].strip()]
        if len(cells) > len(names):  # a cell with spaces (LAST: `ok 5s ago`)
            cells[names.index("LAST") : names.index("LAST") + 3] = [
                " ".join(cells[names.index("LAST") : names.index("LAST") + 3])
            ]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def read_lines(proc: subprocess.Popen[bytes], into: list[bytes]) -> None:
    """Collect `proc`'s stdout lines as they come (run in a thread)."""
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        into.append(line)


def wait_for_last(fleet: Fleet, group: str, run_id: str) -> dict[str, Any]:
    """Poll status until the target's lastRsync is the run `run_id`'s."""

    def ended() -> dict[str, Any] | None:
        last = fleet.content("status", group).get("lastRsync") or {}
        return last if last.get("runId") == run_id else None

    return wait_until(ended, 60, 0.2, f"the sync {run_id} of {group} to end")


# ------------------------------------------------------------------------------ items 2, 3


def test_status_counts_deletions_and_last_rsync_keeps_them(fleet: Fleet) -> None:
    """Item 2: status says how many files a sync would delete (transferDeleteCount, a string
    like the other counts; directories aside, as rlist lists them), the table has a DELETES
    column, and lastRsync records the deletions of the sync."""
    status = fleet.content("status", "del")
    assert status["transferDeleteCount"] == str(STALE + 2)
    rlist = fleet.content("rlist", "del")
    assert len(rlist["transferDeleteFiles"]) == STALE + 2
    table = fleet.order("status", "del", "--format=table")
    (row,) = table_rows(table.stdout)
    assert (row["FILES"], row["DELETES"]) == ("40", str(STALE + 2)), table.stdout
    synced = fleet.order("rsync", "del", "--wait")
    assert synced.rc == 0, synced.stdout + synced.stderr
    last = synced.content(fleet.agent.address, "rsync")["lastRsync"]
    assert last["transferDeleteCount"] == STALE + 2 and last["outcome"] == "ok"
    after = fleet.content("status", "del")
    assert after["transferDeleteCount"] == "0"
    assert after["lastRsync"]["transferDeleteCount"] == STALE + 2
    assert not (fleet.targets / "del" / "olddir").exists()


@pytest.mark.parametrize("order", ["status", "rsync", "rkill"])
def test_unknown_group_is_named(fleet: Fleet, order: str) -> None:
    """Item 3: an unknown group answers 400 naming it, the original's words after it."""
    run = fleet.order(order, "wbe")
    assert run.rc == 2, run.stdout
    entry = run.entry(fleet.agent.address, order)
    assert entry["returnCode"] == "400"
    assert entry["content"] == "unknown group 'wbe': empty value in options!"


# ------------------------------------------------------------------------------ item 4


def test_status_row_is_the_orders_result_and_the_last_sync_has_columns(fleet: Fleet) -> None:
    """Item 4: with the rsync daemon down, the failed status row shows no files or bytes of the
    sync before it; once it is back, the ok row does not carry the failed sync's exit code and
    message: LAST shows how the last sync ended, and how long ago."""
    ok = fleet.order("rsync", "flaky", "--wait")
    assert ok.rc == 0, ok.stdout
    fleet.flaky_down()
    down = fleet.order("status", "flaky", "--format=table")
    assert down.rc == 2, down.stdout
    (row,) = table_rows(down.stdout)
    assert (row["OUTCOME"], row["FILES"], row["BYTES"], row["DELETES"]) == (
        "failed",
        "-",
        "-",
        "-",
    ), down.stdout
    assert row["EXIT"] == "10" and "Connection refused" in row["MESSAGE"]
    assert re.fullmatch(r"ok \d+s ago", row["LAST"]), down.stdout
    failed = fleet.order("rsync", "flaky")
    assert failed.rc == 2 and "Connection refused" in failed.stdout
    fleet.flaky_up()
    back = fleet.order("status", "flaky", "--format=table")
    assert back.rc == 0, back.stdout
    (row,) = table_rows(back.stdout)
    assert (row["OUTCOME"], row["FILES"], row["EXIT"]) == ("ok", "0", "-"), back.stdout
    assert row["MESSAGE"] == "" and "Connection refused" not in back.stdout
    assert re.fullmatch(r"failed \d+s ago", row["LAST"]), back.stdout


# ------------------------------------------------------------------------------ item 9


def test_run_id_in_answers_and_output_never_a_job(fleet: Fleet) -> None:
    """Item 9: the rsync answer, status while the sync runs and lastRsync carry the run's id;
    the table shows it (each run its own), never the target's checksum as a "job"."""
    started = fleet.content("rsync", "slow")
    run_id = started["runId"]
    assert RUN_ID.fullmatch(run_id) and run_id != started["checksum"]

    def running() -> Any:
        status = fleet.content("status", "slow")
        return status if status.get("progress") else None

    status = wait_until(running, 30, 0.2, "the slow sync to show progress")
    assert status["alreadyRsync"] == "true" and status["runId"] == run_id
    table = fleet.order("status", "slow", "--format=table").stdout
    assert re.search(rf"running \d+%.* run {run_id}$", table.splitlines()[1]), table
    assert fleet.content("rkill", "slow")["process"]
    assert wait_for_last(fleet, "slow", run_id)["outcome"] == "killed"

    first = fleet.order("rsync", "web", "--format=table").stdout
    first_id = re.search(r"started, run ([0-9a-f]{32})$", first.splitlines()[1])
    assert first_id, first
    wait_for_last(fleet, "web", first_id.group(1))
    second = fleet.order("rsync", "web", "--format=table", "--wait").stdout
    second_id = re.search(r"synced, run ([0-9a-f]{32})$", second.splitlines()[1])
    assert second_id and second_id.group(1) != first_id.group(1), second
    assert "job" not in first + second + table


# ------------------------------------------------------------------------------ item 10


def test_long_messages_keep_the_fingerprint(fleet: Fleet) -> None:
    """Item 10: a TLS pin mismatch's message (its key fingerprint at the end) is whole in the
    table, wrapped under MESSAGE; with --wide it is whole on one line."""
    private, _ = ec_pair(fleet.work, "agent")
    _, wrong = ec_pair(fleet.work, "other")
    agent = fleet.daemons.agent(
        state=fleet.work / "state-tls",
        allow_paths=[fleet.targets],
        server={"ssl": "true", "ssl_private_key": private},
    )
    args = ["--order=exec", "--options=service:echo", f"--ssl-public-key={wrong}"]
    wide = fleet.run(*args, "--format=table", "--wide", hosts=agent.address)
    assert wide.rc == 3 and len(wide.stdout.splitlines()) == 3, wide.stdout
    (row,) = table_rows(wide.stdout)
    message = row["MESSAGE"]
    fingerprint = re.search(r"sha256 ([0-9a-f]{64})\)$", message)
    assert fingerprint and len(message) > 100, message
    table = fleet.run(*args, "--format=table", hosts=agent.address)
    assert table.rc == 3
    assert len(table.stdout.splitlines()) > 3  # wrapped: the row goes on below
    (row,) = table_rows(table.stdout)
    assert row["MESSAGE"] == message
    assert fingerprint.group(1) in table.stdout  # never cut inside


# ------------------------------------------------------------------------------ item 11


def test_interrupted_client_exits_130_and_says_so(fleet: Fleet) -> None:
    """Item 11: Ctrl-C while --wait follows a sync exits 130 (in --help and the README's
    table); the sync goes on."""
    proc = start_waiting_client(fleet.agent.address, "slow", clean_env(HOME=str(fleet.home)))
    lines: list[bytes] = []
    reader = threading.Thread(target=read_lines, args=(proc, lines))
    reader.start()
    try:
        wait_until(lambda: lines, 30, 0.05, "a progress event from the waiting client")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    assert rc == 130, stderr
    assert json.loads(lines[0])["event"] == "progress"
    assert "interrupted after 0/1 hosts answered; the syncs go on" in stderr
    status = fleet.content("status", "slow")
    assert status["alreadyRsync"] == "true"
    fleet.content("rkill", "slow")
    wait_for_last(fleet, "slow", status["runId"])
    help_text = subprocess.run(
        [tool("deploy-client"), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    assert f"  130  {EXIT_CODES[130]}" in help_text
    assert re.search(r"^\| 130 \| .*interrupted", (ROOT / "README.md").read_text(), re.M)
