"""The sync supervisor: a tiny process that runs one background rsync, records its progress and
its outcome in the job's state file, and outlives the agent that started it.

Run as `python -m deploy.supervise --state FILE --grace S [--refuse-empty] -- RSYNC ARGV...`.
It speaks to its parent on stdout only until the sync is under way (`pid N`, then `ready` or
`ended`), so an agent that dies or restarts costs the sync nothing."""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

from deploy.jobstate import (
    OUTCOME_FAILED,
    OUTCOME_KILLED,
    OUTCOME_OK,
    OUTCOME_REFUSED,
    OUTCOME_WARNING,
    error_message,
    proc_start_ticks,
    read_state,
    write_state,
)
from deploy.rsync import Progress, RsyncOutputParser, TailBuffer

PROGRESS_INTERVAL = 0.5
READY_AFTER = 1.0


class Supervisor:
    def __init__(self, state_path: str, argv: list[str], grace: float, refuse_empty: bool) -> None:
        self.state_path = state_path
        self.argv = argv
        self.grace = grace
        self.refuse_empty = refuse_empty
        self.state: dict[str, Any] = read_state(state_path) or {}
        self.kill_requested = False
        self.kill_deadline: float | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.last_write = 0.0
        self.parent_open = True

    # -- talking to the agent that started us, while it listens

    def tell(self, line: str) -> None:
        if not self.parent_open:
            return
        try:
            os.write(1, line.encode() + b"\n")
        except OSError:
            self.parent_open = False

    def hang_up(self) -> None:
        if self.parent_open:
            self.parent_open = False
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)

    # -- state

    def save(self, **changes: Any) -> None:
        self.state.update(changes)
        write_state(self.state_path, self.state)
        self.last_write = time.monotonic()

    def on_term(self, signum: int, frame: Any) -> None:
        self.kill_requested = True
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self.kill_deadline is None:
                self.kill_deadline = time.monotonic() + self.grace

    # -- the run

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.save(
            state="running",
            supervisorPid=os.getpid(),
            supervisorStart=proc_start_ticks(os.getpid()),
            started=time.time(),
        )
        if self.refuse_empty and self.source_is_empty():
            return self.finish(
                OUTCOME_REFUSED,
                None,
                None,
                f"source {self.argv[-2]} lists no files; refusing to sync it with --delete "
                "(set allow_empty_source = true in the group to allow it)",
                RsyncOutputParser(keep_lists=False),
            )
        if self.kill_requested:
            return self.finish(
                OUTCOME_KILLED,
                None,
                None,
                "killed before it started",
                RsyncOutputParser(keep_lists=False),
            )
        try:
            self.child = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                process_group=0,
                env=rsync_env(),
            )
        except OSError as e:
            return self.finish(
                OUTCOME_FAILED,
                None,
                None,
                f"cannot run {self.argv[0]}: {e}",
                RsyncOutputParser(keep_lists=False),
            )
        self.save(rsyncPid=self.child.pid, rsyncStart=proc_start_ticks(self.child.pid))
        self.tell(f"pid {self.child.pid}")
        return self.pump()

    def source_is_empty(self) -> bool:
        """List only the top level of the source: `.` alone means there is nothing to sync."""
        source = self.argv[-2]
        listing = [
            a for a in self.argv[:-2] if a.startswith(("--port=", "--rsh=", "--password-file="))
        ]
        argv = [self.argv[0], "--list-only", "--no-recursive", "--dirs", *listing, "--", source]
        try:
            out = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, env=rsync_env()
            )
        except (OSError, subprocess.TimeoutExpired):
            return False  # the real run will report the problem
        if out.returncode != 0:
            return False
        names = [
            line.split(None, 4)[-1]
            for line in out.stdout.decode("utf-8", "replace").splitlines()
            if line.strip()
        ]
        return all(n == "." for n in names)

    def pump(self) -> int:
        assert self.child is not None and self.child.stdout and self.child.stderr
        progress: list[Progress] = []
        parser = RsyncOutputParser(keep_lists=False, on_progress=progress.append)
        stderr = TailBuffer(8192)
        sel = selectors.DefaultSelector()
        sel.register(self.child.stdout, selectors.EVENT_READ, parser)
        sel.register(self.child.stderr, selectors.EVENT_READ, stderr)
        ready_at = time.monotonic() + READY_AFTER
        open_streams = 2
        while open_streams:
            now = time.monotonic()
            if self.parent_open and now >= ready_at:
                self.tell("ready")
                self.hang_up()
            if self.kill_deadline is not None and now >= self.kill_deadline:
                try:
                    os.killpg(self.child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.kill_deadline = None
            timeout = 0.25
            for key, _ in sel.select(timeout):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                key.data.feed(data)
                if key.data is parser and self.parent_open:
                    self.tell("ready")  # rsync is talking: the source answered
                    self.hang_up()
            if progress and time.monotonic() - self.last_write >= PROGRESS_INTERVAL:
                p = progress[-1]
                progress.clear()
                self.save(
                    progress={"bytes": p.bytes, "percent": p.percent, "rate": p.rate, "eta": p.eta}
                )
        parser.close()
        code = self.child.wait()
        exit_code = code if code >= 0 else None
        sig = -code if code < 0 else None
        text = stderr.text()
        if self.kill_requested:
            outcome, message = OUTCOME_KILLED, "stopped by rkill"
        elif exit_code == 0:
            outcome, message = OUTCOME_OK, ""
        elif exit_code == 24:
            outcome, message = OUTCOME_WARNING, error_message(text) or "some source files vanished"
        else:
            outcome = OUTCOME_FAILED
            message = error_message(text) or (
                f"rsync exited with code {exit_code}"
                if sig is None
                else f"rsync killed by signal {sig}"
            )
        return self.finish(outcome, exit_code, sig, message, parser, text)

    def finish(
        self,
        outcome: str,
        exit_code: int | None,
        sig: int | None,
        message: str,
        parser: RsyncOutputParser,
        stderr_text: str = "",
    ) -> int:
        stats = parser.stats
        self.save(
            state="ended",
            outcome=outcome,
            exitCode=exit_code,
            signal=sig,
            ended=time.time(),
            message=message,
            stderrTail=stderr_text[-4096:],
            transferFilesCount=stats.files_transferred,
            transferFilesSize=stats.transferred_size,
        )
        self.tell("ended")
        self.hang_up()
        return 0


def rsync_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"  # unlocalised numbers and messages
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy.supervise")
    parser.add_argument("--state", required=True)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--refuse-empty", action="store_true")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rsync_argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if len(rsync_argv) < 3:
        parser.error("need an rsync command line after --")
    try:
        os.setsid()  # our own session: signals to the agent's group do not reach the sync
    except OSError:
        pass
    return Supervisor(args.state, rsync_argv, args.grace, args.refuse_empty).run()


if __name__ == "__main__":
    sys.exit(main())
