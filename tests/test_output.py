"""The pure pieces of what deploy-client shows (issue 15), without a network: the table's own
figures and LAST column, long messages, the --wait summary line and its width, and the NDJSON
progress events' pace."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from typing import Any

from deploy.clientrun import Reporter
from deploy.orders import HostResult
from deploy.output import Row
from deploy.progressline import (
    ENDED,
    RUNNING,
    STARTING,
    ProgressLine,
    SyncBoard,
    SyncEvent,
    fit,
)
from deploy.table import MESSAGE_WIDTH, message_lines, render_table

NOW = 1_700_000_000.0
FINGERPRINT = "ab" * 32
TLS_MESSAGE = (
    "TLS handshake with 10.0.0.7:3440 failed: server key does not match pinned public key "
    f"/etc/deploy/keys/web-public.pem (server key sha256 {FINGERPRINT})"
)


def iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def last(outcome: str, ago: float, **more: Any) -> dict[str, Any]:
    return {"outcome": outcome, "ended": iso(NOW - ago), "exitCode": 0, **more}


def row(order: str, outcome: str, content: Any, **entry: Any) -> Row:
    return Row(
        "web1", order, outcome, {"returnCode": "200", "content": content, **entry}, None, 0.5
    )


def cells(table: str) -> list[str]:
    return table.splitlines()[1].split()


def test_status_row_shows_its_own_figures_and_the_last_sync_apart() -> None:
    """A status row never borrows the last sync's counts, exit code or message; LAST says how
    the last sync ended and how long ago."""
    failed_last = last("failed", 300, transferFilesCount=3, transferFilesSize=10, exitCode=10)
    failed_last["message"] = "rsync: failed to connect: Connection refused"
    ok = row(
        "status",
        "ok",
        {
            "return": "true",
            "transferFilesCount": "1",
            "transferFilesSize": "3",
            "transferDeleteCount": "400",
            "lastRsync": failed_last,
        },
    )
    table = render_table([ok], now=NOW)
    head = "HOST ORDER OUTCOME FILES BYTES DELETES EXIT TIME LAST MESSAGE"
    assert table.splitlines()[0].split() == head.split()
    assert cells(table) == [
        "web1",
        "status",
        "ok",
        "1",
        "3",
        "400",
        "-",
        "0.50s",
        "failed",
        "5m",
        "ago",
    ]
    down = row(
        "status",
        "failed",
        {
            "return": "false",
            "message": "rsync: Connection refused",
            "exitCode": 10,
            "lastRsync": last("ok", 7200, transferFilesCount=40, transferFilesSize=80000),
        },
    )
    line = render_table([down], now=NOW).splitlines()[1]
    assert line.split()[:9] == ["web1", "status", "failed", "-", "-", "-", "10", "0.50s", "ok"]
    assert line.endswith("2h ago  rsync: Connection refused")


def test_rsync_row_is_the_sync_it_started_named_by_its_run() -> None:
    """An rsync row followed by --wait shows the sync's own counts and its run id; one that was
    only started says so; neither calls the target's checksum a job."""
    run_id = "f" * 32
    synced = row(
        "rsync",
        "ok",
        {
            "checksum": "c" * 32,
            "return": "true",
            "runId": run_id,
            "outcome": "ok",
            "lastRsync": last(
                "ok",
                1,
                runId=run_id,
                transferFilesCount=8,
                transferFilesSize=800000,
                transferDeleteCount=5,
                message="",
            ),
        },
    )
    started = row("rsync", "ok", {"checksum": "c" * 32, "return": "true", "runId": run_id})
    table = render_table([synced, started], now=NOW)
    first, second = table.splitlines()[1:3]
    assert first.split()[3:7] == ["8", "781.2K", "5", "0"]
    assert first.endswith(f"synced, run {run_id}") and second.endswith(f"started, run {run_id}")
    assert "LAST" not in table and "job" not in table and "c" * 12 not in table


def test_long_messages_wrap_under_their_column_or_stay_whole_with_wide() -> None:
    """A message past the width wraps under MESSAGE, a fingerprint never cut; --wide keeps it on
    one line; a very long one keeps its start and its end."""
    failed = Row("web1", "exec", "unreachable", {"serverStatus": 0, "content": TLS_MESSAGE})
    table = render_table([failed], now=NOW).splitlines()
    column = table[0].index("MESSAGE")
    assert len(table) > 3 and table[-1] == "1 host: 1 unreachable"
    assert all(line[:column].strip() == "" for line in table[2:-1])
    assert " ".join(line[column:] for line in table[1:-1]) == TLS_MESSAGE
    assert f"{FINGERPRINT})" in table[-2]
    wide = render_table([failed], wide=True, now=NOW).splitlines()
    assert len(wide) == 3 and wide[1].endswith(TLS_MESSAGE)
    huge = "start " + "x " * 1000 + "the end that matters (code 10)"
    lines = message_lines(huge)
    assert lines[0].startswith("start ") and lines[-1].endswith("the end that matters (code 10)")
    assert "[...]" in " ".join(lines) and len(lines) <= 4
    assert all(len(line) <= MESSAGE_WIDTH for line in lines)
    assert message_lines("short") == ["short"]


def test_wait_summary_counts_syncs_and_bytes() -> None:
    """The --wait line: how many sync, are done, failed, and the share of bytes moved."""
    board = SyncBoard(total=3)
    assert board.parts() == ["0/3 syncing", "0 done", "0 failed"]
    board.update(SyncEvent("a", None, STARTING))
    board.update(SyncEvent("b", None, RUNNING, {"bytes": 500, "percent": 50}))
    board.update(SyncEvent("a", None, RUNNING, {"bytes": 0, "percent": 0}))  # no size yet
    board.result(None, "c", good=False)  # never started: unreachable
    assert board.parts() == ["2/3 syncing", "0 done", "1 failed", "50% of bytes"]
    board.update(SyncEvent("a", None, RUNNING, {"bytes": 300, "percent": 10}))
    assert board.parts()[-1] == "20% of bytes"  # 800 of 1000 + 3000
    board.update(SyncEvent("b", None, ENDED, outcome="ok", size=1000))
    board.update(SyncEvent("a", None, ENDED, outcome="ok", size=3000))
    assert board.parts() == ["0/3 syncing", "2 done", "1 failed", "100% of bytes"]


def test_the_line_fits_the_terminal_dropping_what_matters_least() -> None:
    """Parts that do not fit are left out from the end; the progress line never passes the
    terminal's width (less the cursor's column)."""
    parts = ["3/50 syncing", "45 done", "2 failed", "41% of bytes"]
    assert fit(parts, 80) == "3/50 syncing, 45 done, 2 failed, 41% of bytes"
    assert fit(parts, 32) == "3/50 syncing, 45 done, 2 failed"
    assert fit(parts, 5) == "3/50 "
    stream = io.StringIO()
    line = ProgressLine(stream, enabled=True)
    line.width = lambda: 30  # type: ignore[method-assign]
    line.update(parts)
    assert stream.getvalue() == "\r\x1b[K3/50 syncing, 45 done"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ndjson_progress_events_at_most_every_two_seconds_per_host() -> None:
    """With --format ndjson --wait a running sync prints a progress event at once, then at most
    one every 2 s per host; one without figures yet prints none; the result line follows."""
    clock = Clock()
    reporter = Reporter(
        "ndjson", 2, False, ProgressLine(io.StringIO(), False), wait=True, clock=clock
    )
    out = io.StringIO()
    progress = {"bytes": 10, "percent": 1, "eta": "0:01:00", "elapsed": "0:00:01", "rate": "x"}
    with redirect_stdout(out):
        reporter.on_sync(SyncEvent("web1", "proxy", RUNNING, {}))
        for step in range(9):  # every 0.5 s for 4 s
            clock.now = step * 0.5
            reporter.on_sync(SyncEvent("web1", "proxy", RUNNING, progress))
            reporter.on_sync(SyncEvent("web2", "proxy", RUNNING, progress))
        reporter.on_result(
            HostResult(
                "proxy",
                "rsync",
                1,
                200,
                "OK",
                {
                    "web1": {
                        "rsync": {
                            "serverStatus": 1,
                            "returnCode": 200,
                            "content": {"return": "true"},
                        }
                    }
                },
            )
        )
    lines = [json.loads(text) for text in out.getvalue().splitlines()]
    events = [line for line in lines if line.get("event") == "progress"]
    assert [e["host"] for e in events] == ["web1", "web2"] * 3  # at 0, 2 and 4 s
    assert events[0] == {
        "host": "web1",
        "via": "proxy",
        "event": "progress",
        "percent": 1,
        "bytes": 10,
        "eta": "0:01:00",
        "elapsed": "0:00:01",
    }
    assert lines[-1]["host"] == "web1" and lines[-1]["order"] == "rsync"
