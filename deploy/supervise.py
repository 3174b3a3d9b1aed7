"""The sync supervisor: a tiny process that runs one background rsync, records its progress and its
outcome in the job's state file, and outlives the agent that started it.

Run as `python -S -P -c BOOTSTRAP --state FILE --run ID --grace S [--refuse-empty] -- RSYNC
ARGV...` (or `-m deploy.supervise`; see deploy.supervise_argv). It runs only if FILE still holds
the `starting` record of run ID, so a late or duplicate supervisor never runs a second sync. It
speaks to its parent on stdout only until the sync is under way (`pid N`, then `ready` or `ended`),
so an agent that dies or restarts costs the sync nothing. SIGTERM stops the sync: TERM to rsync's
process group, KILL after the grace period. The end is recorded only once no process of that group
is left; while the state file system is full, the supervisor stays and tries again until the end is
written (the sync is reported with its real outcome once there is space, not as lost)."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from deploy.jobstate import (
    GOOD_OUTCOMES,
    OUTCOME_FAILED,
    OUTCOME_KILLED,
    OUTCOME_REFUSED,
    STATE_ENDED,
    STATE_RUNNING,
    STATE_STARTING,
    error_message,
    outcome_of,
    read_state,
)
from deploy.process import (
    GROUP_GONE_WITHIN,
    GROUP_POLL,
    StopPolicy,
    has_exited,
    proc_start_ticks,
    process_group_pids,
    signal_group,
)
from deploy.rsync_output import Progress, RsyncOutputParser, TailBuffer, rsync_environment
from deploy.source_listing import refusal, source_lists_nothing, synced_nothing, unverified
from deploy.source_retry import SourceRetry, sleep_unless, source_busy
from deploy.supervise_argv import USAGE, UsageError, parse_args
from deploy.supervise_record import SyncRecord

PROGRESS_INTERVAL = 0.5
READY_AFTER = 1.0
# Once rsync itself has exited, how long its forked children may keep our pipes open.
DRAIN_AFTER_EXIT = 2.0


class Supervisor:
    """Runs one rsync to its end and keeps its state record."""

    def __init__(
        self,
        state_path: str,
        argv: list[str],
        grace: float,
        refuse_empty: bool,
        run_id: str | None = None,
        source_retry: float = 0.0,
    ) -> None:
        self.state_path = state_path
        self.source = SourceRetry(source_retry)
        self.argv = argv
        self.grace = grace
        self.refuse_empty = refuse_empty
        self.run_id = run_id
        self.record = SyncRecord(state_path, self.complain)
        self.kill_requested = False
        self.stop = StopPolicy(grace)
        self.child: subprocess.Popen[bytes] | None = None
        self.lister: subprocess.Popen[bytes] | None = None
        self.parent_open = True
        self.rsync_started: float | None = None  # monotonic, once rsync runs
        self.two_pass: Any = None  # a deploy.release_sync.TwoPass, for a two-pass release sync
        # the parser whose stats count the release's files (the dry run's, in two passes)
        self.release_stats: RsyncOutputParser | None = None

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

    def complain(self, text: str) -> None:
        """A line for the job's log file (our stderr), which the agent reads if we die."""
        try:
            os.write(2, f"deploy.supervise: {text}\n".encode("utf-8", "replace"))
        except OSError:
            pass

    # -- state

    @property
    def state(self) -> dict[str, Any]:
        return self.record.state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self.record.state = value

    def on_term(self, signum: int, frame: Any) -> None:
        # Only flags here; the loops send the signals. A listing in flight is stopped at once.
        self.kill_requested = True
        lister = self.lister
        if lister is not None and lister.poll() is None:
            signal_group(lister.pid, signal.SIGKILL)

    # -- the run

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        record = read_state(self.state_path)
        if (
            record is None
            or record.get("state") != STATE_STARTING
            or (self.run_id is not None and record.get("runId") != self.run_id)
        ):
            self.complain(
                f"{self.state_path} does not hold this run's starting record; not syncing"
            )
            self.tell("ended")
            return 2
        self.state = record
        try:
            self.record.save(
                state=STATE_RUNNING,
                supervisorPid=os.getpid(),
                supervisorStart=proc_start_ticks(os.getpid()),
                started=time.time(),
            )
        except OSError as e:
            # A sync nobody can account for is worse than none.
            self.complain(f"cannot record the sync in {self.state_path}: {e}; not syncing")
            self.tell("ended")
            return 2
        parser = RsyncOutputParser(keep_lists=False)
        # Before a sync into the live target, a listing of the source (one that cannot tell
        # lets the sync run: it reports an unreachable source itself). A release-mode sync
        # fills a partial no reader sees: its own file list answers the guard before the
        # release can go live (see pump), with no listing connection first.
        if self.refuse_empty and not self.release_mode() and self.source_is_empty() is True:
            refused = refusal(self.argv[-2], release=False)
            return self.finish(OUTCOME_REFUSED, None, None, refused, parser)
        if self.state.get("releaseTwoPass") is True:
            from deploy.release_sync import ReleaseSyncError, TwoPass

            try:
                self.two_pass = TwoPass(self.argv, os.path.dirname(self.state_path) or ".")
            except ReleaseSyncError as e:
                return self.finish(OUTCOME_FAILED, None, None, str(e), parser)
        return self.start_rsync(parser)

    def release_mode(self) -> bool:
        """The record names a release (deploy.release_steps completes it after rsync)."""
        return isinstance(self.state.get("release"), dict)

    def start_rsync(self, parser: RsyncOutputParser) -> int:
        if self.kill_requested:
            return self.finish(
                OUTCOME_KILLED, None, None, "stopped by rkill before rsync ran", parser
            )
        argv, stdin = self.argv, subprocess.DEVNULL
        two = self.two_pass
        if two is not None:
            if not two.planned and (ended := two.first_pass(self, parser)) is not None:
                return ended
            argv, stdin = two.real_argv(), two.names_fd()
        if (error := self.spawn(argv, stdin)) is not None:
            return self.finish(OUTCOME_FAILED, None, None, error, parser)
        return self.pump()

    def spawn(self, argv: list[str], stdin: int = subprocess.DEVNULL) -> str | None:
        """Start an rsync of this sync in its own process group (the one signals go to); None,
        or why it could not."""
        try:
            self.child = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                process_group=0,
                env=rsync_environment(),
            )
        except OSError as e:
            return f"cannot run {argv[0]}: {e}"
        self.rsync_started = time.monotonic()
        self.record.save_soft(rsyncPid=self.child.pid, rsyncStart=proc_start_ticks(self.child.pid))
        self.tell(f"pid {self.child.pid}")
        return None

    def source_is_empty(self) -> bool | None:
        """List the top level of the source (as a directory, with the sync's filters): `.` alone
        means a sync with --delete would empty the target; None: the listing could not tell."""
        return source_lists_nothing(self.argv, self._listing_started)

    def _listing_started(self, lister: subprocess.Popen[bytes]) -> None:
        self.lister = lister
        if self.kill_requested:  # TERM came while we were starting it
            lister.kill()

    def pump(self) -> int:
        progress: list[Progress] = []
        parser = RsyncOutputParser(keep_lists=False, on_progress=progress.append)
        code, text = self.drain(parser, progress)
        exit_code = code if code >= 0 else None
        sig = -code if code < 0 else None
        if parser.progress is not None:
            self.state["progress"] = self.record.progress(self.rsync_started, parser.progress)
        if self.kill_requested:
            outcome, message = OUTCOME_KILLED, "stopped by rkill"
        elif self.waited_for_source(exit_code, text):
            return self.start_rsync(parser)
        else:
            outcome, message = outcome_of(exit_code, sig, text)
            if self.two_pass is not None and outcome in GOOD_OUTCOMES:  # guarded after its dry run
                outcome, message = self.two_pass.top_pass(self, outcome, message)
            elif self.two_pass is None:
                outcome, message = self.guarded(outcome, message, parser)
        return self.finish(outcome, exit_code, sig, message, parser, text)

    def guarded(self, outcome: str, message: str, parser: RsyncOutputParser) -> tuple[str, str]:
        """The outcome once the empty-source guard of a release has judged `parser`'s run."""
        empty = self.empty_release(outcome, parser)
        if self.kill_requested:  # stopped while the guard listed the source
            return OUTCOME_KILLED, "stopped by rkill"
        if empty is True:
            return OUTCOME_REFUSED, refusal(self.argv[-2], release=True)
        if empty is None:  # fail closed: nothing may go live unchecked
            return OUTCOME_FAILED, unverified(self.argv[-2])
        return outcome, message

    def drain(
        self,
        parser: RsyncOutputParser,
        progress: list[Progress],
        stop: Callable[[], bool] = lambda: False,
    ) -> tuple[int, str]:
        """Read the running rsync's output to its end (stdout into `parser`, recording its
        progress; a stop as `_send_due_signals` says, or once `stop()` is true); answers its
        exit status (minus the signal that ended it) and the tail of its stderr."""
        child = self.child
        assert child is not None and child.stdout and child.stderr
        stderr = TailBuffer(8192)
        sel = selectors.DefaultSelector()
        sel.register(child.stdout, selectors.EVENT_READ, parser)
        sel.register(child.stderr, selectors.EVENT_READ, stderr)
        ready_at = time.monotonic() + READY_AFTER
        drain_until: float | None = None
        open_streams = 2
        while open_streams:
            now = time.monotonic()
            if stop():
                self.stop.request(now)
            self._send_due_signals(now)
            if self.parent_open and now >= ready_at:
                self.tell("ready")
                self.hang_up()
            if has_exited(child.pid):
                if drain_until is None:
                    drain_until = now + DRAIN_AFTER_EXIT
                elif now >= drain_until:
                    break  # rsync is gone; whatever still holds its pipes is not worth waiting for
            for key, _ in sel.select(0.25):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                key.data.feed(data)
                if key.data is parser and self.parent_open:
                    self.tell("ready")  # rsync is talking: the source answered
                    self.hang_up()
            if progress and time.monotonic() - self.record.last_write >= PROGRESS_INTERVAL:
                self.record.save_soft(
                    progress=self.record.progress(self.rsync_started, progress[-1])
                )
                progress.clear()
        sel.close()
        parser.close()
        return self.wait_for_group(child), stderr.text()

    def empty_release(self, outcome: str, parser: RsyncOutputParser) -> bool | None:
        """The guard of a release-mode sync: rsync filled the partial from a source that lists
        no files (its stats say so, else the listing), which must not become the live release.
        None when neither can tell. `parser`: the run whose file list is the whole source."""
        if not (self.refuse_empty and self.release_mode() and outcome in GOOD_OUTCOMES):
            return False
        said = synced_nothing(parser.stats.files, parser.file_kinds, self.argv)
        return self.source_is_empty() if said is None else said

    def waited_for_source(self, exit_code: int | None, stderr_text: str) -> bool:
        """rsyncd said `max connections`: wait as `deploy.source_retry` says (the record saying
        so, for status) and answer True to try again; False once that time has run out."""
        delay = self.source.delay() if source_busy(exit_code, stderr_text) else None
        if delay is None:
            return False
        if self.parent_open:  # the agent answers the order: the sync is under way, waiting
            self.tell("ready")
            self.hang_up()
        self.record.save_soft(waiting=self.source.waiting(error_message(stderr_text), delay))
        sleep_unless(delay, lambda: self.kill_requested)
        self.record.save_soft(waiting=None)
        return True

    def wait_for_group(self, child: subprocess.Popen[bytes]) -> int:
        """Wait until rsync has exited and no process of its group is left (a forked rsync can
        outlive its parent), KILLing what outlives rsync; then reap rsync and answer its exit
        status. rsync stays unreaped (a zombie) until then, so its group id cannot be reused
        while we signal it. A group that will not go is given up on after GROUP_GONE_WITHIN."""
        give_up_at = None
        while True:
            now = time.monotonic()
            if has_exited(child.pid):
                left = process_group_pids(child.pid)
                if not left:
                    break
                if give_up_at is None:
                    give_up_at = now + GROUP_GONE_WITHIN
                elif now >= give_up_at:
                    self.complain(f"rsync's processes {left} outlived it and would not go")
                    break
                self.stop.request(now, grace=0)  # rsync ended: what is left of it goes now
            self._send_due_signals(now)
            time.sleep(GROUP_POLL)
        return child.wait()

    def _send_due_signals(self, now: float) -> None:
        """Stop rsync's group as the policy says: on rkill TERM, KILL after the grace period."""
        if self.kill_requested:
            self.stop.request(now)
        while (sig := self.stop.due(now)) is not None:
            if self.child is not None:
                signal_group(self.child.pid, sig)

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
        # release mode (deploy.release_steps): rename, switch, after_activate, check
        release, release_id = self.state.get("release"), self.state.get("releaseId")
        if self.two_pass is not None:
            self.two_pass.close()
        if isinstance(release, dict) and isinstance(release_id, str):
            from deploy.release_steps import after_sync

            whole = (self.release_stats or parser).stats
            outcome, more = after_sync(
                release, release_id, outcome, whole.files, whole.total_file_size
            )
            message = f"{message}; {more}" if message and more else message or more
        if not self.record.save_end(
            state=STATE_ENDED,
            outcome=outcome,
            exitCode=exit_code,
            signal=sig,
            ended=time.time(),
            message=message,
            stderrTail=stderr_text[-4096:],
            transferFilesCount=stats.files_transferred,
            transferFilesSize=stats.transferred_size,
            transferDeleteCount=parser.delete_count if self.child is not None else None,
        ):
            return 1
        self.tell("ended")
        self.hang_up()
        if isinstance(release, dict):
            from deploy.release_steps import purge_after_sync

            purge_after_sync(release)
        return 0


def main(argv: list[str] | None = None) -> int:
    try:
        options, rsync_argv = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        os.write(2, f"{USAGE}\ndeploy.supervise: error: {e}\n".encode())
        return 2
    try:
        os.setsid()  # our own session: signals to the agent's group do not reach the sync
    except OSError:
        pass
    return Supervisor(argv=rsync_argv, **options).run()


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown (freeing every module costs each sync ~8 ms of
    CPU) once the run is over; the supervisor writes with os.write, Python's buffers are empty."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())  # an exception still ends through the interpreter: traceback, exit 1
