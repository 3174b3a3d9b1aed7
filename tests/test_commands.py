"""Tests of deploy.commands: looking an exec order up by exact name, turning template and
arguments into an argv (never a shell), and running it with a timeout and an output cap."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.task import Clock

from deploy.commands import (
    MAX_ARG_LENGTH,
    MAX_ARGS,
    CommandError,
    CommandStopper,
    build_command,
    check_argument,
    group_leader_prefix,
    run_command,
    template_problem,
)
from deploy.process import ProcStat, pipe_holders, proc_start_ticks, read_stat, signal_pid
from tests.harness import comm, wait_until

JOBS = {
    "service:echo": "/bin/echo %s",
    "service:false": "/bin/false %s",
    "app:true": "/bin/true",
    "app:greet": "/bin/echo 'hello world' --name %s",
    "app:quoted": '/usr/bin/printf "%%s|%%s\\n" %s',
    "app:broken": "/bin/echo 'unclosed",
    "a.b": "/bin/echo dot",
}


# --------------------------------------------------------------------------- build_command


def test_exact_name_with_arguments() -> None:
    """`NAME,a,b` runs NAME's template with a and b in place of `%s`."""
    assert build_command(JOBS, "service:echo,hello,world") == (
        "service:echo",
        ["/bin/echo", "hello", "world"],
    )


def test_template_without_arguments() -> None:
    """A template with `%s` and no arguments drops the placeholder."""
    assert build_command(JOBS, "service:echo") == ("service:echo", ["/bin/echo"])
    assert build_command(JOBS, "app:true") == ("app:true", ["/bin/true"])


def test_argument_with_spaces_stays_one_argument() -> None:
    """An argument holding spaces (`1+1` decoded) is one argv item, never re-split."""
    assert build_command(JOBS, "service:echo,1 1")[1] == ["/bin/echo", "1 1"]


@pytest.mark.parametrize("arg", ["a;b", "a|b", "a&b", "$(id)", "`x`", "$HOME", "a>b", "a<b", "(a)"])
def test_shell_metacharacters_are_refused(arg: str) -> None:
    """Shell syntax in an argument is refused, in case a jobs template runs `sh -c`."""
    with pytest.raises(CommandError, match="shell syntax"):
        build_command(JOBS, f"service:echo,{arg}")


def test_quotes_spaces_and_plus_are_plain_text() -> None:
    """Quotes, spaces and other punctuation reach the command as one argument each."""
    arg = 'it\'s "quoted" 1+1 = 2, 100% / done!'
    assert build_command(JOBS, f"service:echo,{arg}")[1][1:] == arg.split(",")


def test_template_is_split_like_a_shell_would() -> None:
    """Quotes in the template group words (shlex); each argument replaces a whole `%s`."""
    assert build_command(JOBS, "app:greet,bob")[1] == ["/bin/echo", "hello world", "--name", "bob"]
    assert build_command(JOBS, "app:greet,bob,al")[1] == [
        "/bin/echo",
        "hello world",
        "--name",
        "bob",
        "al",
    ]


@pytest.mark.parametrize(
    "template",
    [
        "/bin/sh -c 'echo hello %s'",
        "/bin/echo --name=%s",
        "/bin/echo %s%%",
        '/bin/bash -c "ls %s"',
        "/usr/bin/ssh host 'rm -rf /srv/%s'",
    ],
)
def test_percent_s_inside_an_argument_is_refused(template: str) -> None:
    """A `%s` that is not a whole argv element (a shell would re-split, glob and ~-expand what
    replaces it) is refused, naming the safe form; nothing is built."""
    problem = template_problem(template)
    assert problem is not None and "sh -c 'echo hello \"$1\"' sh %s" in problem
    with pytest.raises(CommandError, match="positional parameter"):
        build_command({"x": template}, "x,a")


@pytest.mark.parametrize(
    "template",
    [
        "/bin/echo %s",
        "/bin/sh -c 'echo hello \"$1\"' sh %s",
        "/bin/echo '%s'",
        "/bin/date +%%s",
        '/usr/bin/printf "%%s|%%s\\n" %s',
        "/bin/echo 'unclosed %s",
    ],
)
def test_whole_percent_s_literal_percent_and_unsplittable_templates_pass(template: str) -> None:
    """A whole-element `%s`, a literal `%%s` and a template shlex cannot split (build_command
    reports that one) are no template problem."""
    assert template_problem(template) is None


def test_safe_form_passes_arguments_as_positional_parameters() -> None:
    """The safe form hands the argument to the shell as `$1`: one word, never re-read."""
    argv = build_command({"x": "/bin/sh -c 'echo hello \"$1\"' sh %s"}, "x,a b* ~")[1]
    assert argv == ["/bin/sh", "-c", 'echo hello "$1"', "sh", "a b* ~"]


def test_double_percent_is_a_literal_percent() -> None:
    """`%%` in a template is a literal `%` (the original's sprintf), never an argument slot."""
    assert build_command(JOBS, "app:quoted,x")[1] == ["/usr/bin/printf", "%s|%s\\n", "x"]
    assert build_command({"d": "/bin/date +%%s"}, "d")[1] == ["/bin/date", "+%s"]
    with pytest.raises(CommandError, match="takes no arguments"):
        build_command({"d": "/bin/date +%%s"}, "d,x")
    assert build_command({"p": "/bin/echo 100%% %s"}, "p,5")[1] == ["/bin/echo", "100%", "5"]


def test_empty_arguments_are_dropped() -> None:
    """Empty arguments (`NAME,,a,`) are left out rather than passed as ''."""
    assert build_command(JOBS, "service:echo,,a,")[1] == ["/bin/echo", "a"]


@pytest.mark.parametrize(
    "options",
    [
        ".*,hi",
        ".*",
        "service:.*,hi",
        "service:ech",
        "SERVICE:ECHO,hi",
        " service:echo",
        "a.",
        "a?b",
    ],
)
def test_name_must_match_exactly(options: str) -> None:
    """The name is a key, not a pattern (the original ran anything for `.*`)."""
    with pytest.raises(CommandError, match=r"^exec\[.*\] not found!$"):
        build_command(JOBS, options)


def test_unknown_name_message_is_the_originals() -> None:
    """An unknown name reads `exec[NAME] not found!`."""
    with pytest.raises(CommandError) as e:
        build_command(JOBS, "service:nosuch,hi")
    assert str(e.value) == "exec[service:nosuch] not found!"


@pytest.mark.parametrize(
    "arg", ["hi\n/bin/echo INJECTED", "a\rb", "tab\there", "nul\x00", "del\x7f", "\x1b[31m"]
)
def test_control_characters_are_refused(arg: str) -> None:
    """An argument holding a control character (`%0a` was the original's injection) is refused."""
    with pytest.raises(CommandError, match="control character"):
        build_command(JOBS, f"service:echo,{arg}")


@pytest.mark.parametrize(
    ("arg", "code"),
    [
        ("a\x80b", "0080"),
        ("next\x85line", "0085"),
        ("\x9b31m", "009B"),
        ("\x9f", "009F"),
        ("evil\u202atxt", "202A"),
        ("gpj.\u202eexe", "202E"),
        ("\u2066isolate", "2066"),
        ("x\u2069", "2069"),
        ("line\u2028sep", "2028"),
        ("para\u2029sep", "2029"),
    ],
)
def test_c1_controls_bidi_overrides_and_line_separators_are_refused(arg: str, code: str) -> None:
    """C1 controls, bidi overrides/isolates and U+2028/U+2029 are refused like C0 controls (they
    would reorder or break the line a log or terminal shows), naming the code point."""
    with pytest.raises(CommandError, match=f"control character \\(U\\+{code}\\)"):
        build_command(JOBS, f"service:echo,{arg}")


@pytest.mark.parametrize("arg", ["\xa0nbsp", "\u00e9", "\u200bzero-width", "\u2030", "\u2065"])
def test_printable_neighbours_of_the_refused_ranges_pass(arg: str) -> None:
    """The code points just outside the refused ranges are ordinary text."""
    assert build_command(JOBS, f"service:echo,{arg}")[1] == ["/bin/echo", arg]


@pytest.mark.parametrize("arg", ["-n", "--help", "-", "--rsh=sh"])
def test_leading_dash_is_refused(arg: str) -> None:
    """An argument may not start with `-` (it would be read as an option)."""
    with pytest.raises(CommandError, match="may not start with '-'"):
        build_command(JOBS, f"service:echo,ok,{arg}")


def test_dash_inside_an_argument_is_fine() -> None:
    """A `-` that does not start the argument is ordinary text."""
    assert build_command(JOBS, "service:echo,a-b,x--y")[1] == ["/bin/echo", "a-b", "x--y"]


def test_unicode_arguments_are_allowed() -> None:
    """Printable non-ASCII text is a valid argument."""
    assert build_command(JOBS, "service:echo,caf\u00e9")[1] == ["/bin/echo", "caf\u00e9"]


def test_too_many_or_too_long_arguments() -> None:
    """Argument count and length are bounded."""
    with pytest.raises(CommandError, match="arguments"):
        build_command(JOBS, "service:echo" + ",a" * (MAX_ARGS + 1))
    assert len(build_command(JOBS, "service:echo" + ",a" * MAX_ARGS)[1]) == MAX_ARGS + 1
    with pytest.raises(CommandError, match="longer"):
        check_argument("x", "a" * (MAX_ARG_LENGTH + 1))
    check_argument("x", "a" * MAX_ARG_LENGTH)


def test_arguments_for_a_template_without_placeholder_are_refused() -> None:
    """Arguments given to a command that takes none are refused, not silently dropped."""
    with pytest.raises(CommandError, match="takes no arguments"):
        build_command(JOBS, "app:true,x")


def test_broken_template_is_an_error_not_a_crash() -> None:
    """A template shlex cannot split gives a clear error naming the job."""
    with pytest.raises(CommandError, match=r"exec\[app:broken\]"):
        build_command(JOBS, "app:broken")


# --------------------------------------------------------------------------- run_command

PY = sys.executable


@pytest_twisted.ensureDeferred
async def test_run_collects_output_and_exit_status() -> None:
    """stdout and stderr are collected together; exit 0 is ok."""
    result = await run_command(
        reactor, [PY, "-c", "import sys; print('out'); sys.stderr.write('err\\n')"]
    )
    assert result.exit_code == 0 and result.ok
    assert sorted(result.output.split()) == [b"err", b"out"]
    assert not result.truncated and not result.timed_out


@pytest_twisted.ensureDeferred
async def test_run_nonzero_exit_is_not_ok() -> None:
    """A non-zero exit is reported with its code and is not ok."""
    result = await run_command(reactor, [PY, "-c", "raise SystemExit(3)"])
    assert result.exit_code == 3
    assert not result.ok


@pytest_twisted.ensureDeferred
async def test_run_passes_arguments_verbatim() -> None:
    """Arguments reach the child byte for byte: no shell, no splitting, no globbing."""
    arg = "a b; echo X | * $(id)"
    result = await run_command(reactor, [PY, "-c", "import sys; print(sys.argv[1])", arg])
    assert result.output == arg.encode() + b"\n"


@pytest_twisted.ensureDeferred
async def test_run_passes_the_environment() -> None:
    """The child gets the environment it is given (not an empty one)."""
    result = await run_command(
        reactor,
        [PY, "-c", "import os; print(os.environ.get('DEPLOY_T', 'missing'))"],
        env={**os.environ, "DEPLOY_T": "given"},
    )
    assert result.output == b"given\n"


@pytest_twisted.ensureDeferred
async def test_run_caps_the_output_kept() -> None:
    """Output beyond the limit is dropped and flagged, and the command still ends normally."""
    result = await run_command(
        reactor, [PY, "-c", "import sys; sys.stdout.write('x' * 200000)"], limit=1000
    )
    assert result.exit_code == 0
    assert result.output == b"x" * 1000
    assert result.truncated


@pytest_twisted.ensureDeferred
async def test_run_missing_command_is_a_command_error() -> None:
    """A command that does not exist fails with CommandError, not a crash."""
    with pytest.raises(CommandError, match="not found"):
        await run_command(reactor, ["no-such-command-deploy-test"], prefix=[])
    with pytest.raises(CommandError):
        await run_command(reactor, ["/nonexistent/bin/x"], prefix=[])


@pytest_twisted.ensureDeferred
async def test_run_timeout_stops_the_whole_process_group(tmp_path: Path) -> None:
    """On timeout the command and what it started are stopped, and the result says timed out."""
    pidfile = tmp_path / "grandchild"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    result = await run_command(reactor, [PY, "-c", script], timeout=0.5)
    assert time.monotonic() - started < 10
    assert result.timed_out and not result.ok
    assert result.signal is not None or result.exit_code != 0
    grandchild = int(pidfile.read_text())
    wait_until(lambda: not _alive(grandchild), 10, what="the grandchild to be gone")


@pytest_twisted.ensureDeferred
async def test_run_timeout_escalates_to_kill() -> None:
    """A command that ignores TERM is killed after the grace period."""
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    started = time.monotonic()
    result = await run_command(reactor, [PY, "-c", script], timeout=0.3)
    assert result.timed_out
    assert result.signal == 9
    assert time.monotonic() - started < 10


@pytest_twisted.ensureDeferred
async def test_run_leaves_no_timer_behind() -> None:
    """A command that ends before its timeout cancels the timer."""
    before = len(reactor.getDelayedCalls())
    result = await run_command(reactor, [PY, "-c", "pass"], timeout=30)
    assert result.ok
    assert len(reactor.getDelayedCalls()) == before


def _leftover(output: bytes) -> int:
    """The pid a test command printed (`echo $!`): a process it started and left running."""
    return int(output.split()[-1])


def _stop_leftover(pid: int, started_after: int) -> None:
    """Stop a process our test command left running, once proven to be that one (a sleep that
    started after the test did)."""
    stat = read_stat(pid)
    if stat is not None and stat.start_ticks >= started_after and comm(pid) == "sleep":
        signal_pid(pid, 9)


async def _gone(pid: int, timeout: float) -> None:
    """Poll until `pid` is gone, letting the reactor run (its timers stop the process)."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"{pid} still runs after {timeout:g}s"
        await task.deferLater(reactor, 0.05, lambda: None)


def _now_ticks() -> int:
    ticks = proc_start_ticks(os.getpid())
    assert ticks is not None
    return ticks


@pytest_twisted.ensureDeferred
async def test_command_that_exits_while_a_child_holds_its_output_is_answered_at_once() -> None:
    """`sh -c 'sleep 30 & echo $!'`: answered when sh exits (after the drain), with its status
    and output, not when the sleep ends; the sleep is named as left running."""
    since = _now_ticks()
    started = time.monotonic()
    result = await run_command(reactor, ["/bin/sh", "-c", "sleep 30 & echo $!"], drain=0.3)
    elapsed = time.monotonic() - started
    pid = _leftover(result.output)
    try:
        assert elapsed < 10, elapsed
        assert result.exit_code == 0 and result.ok and not result.timed_out
        assert result.left_running == [pid]
        assert _alive(pid)  # no timeout: what it left is not ours to stop
    finally:
        _stop_leftover(pid, since)


@pytest_twisted.ensureDeferred
async def test_what_still_holds_the_output_is_stopped_at_the_timeout() -> None:
    """With a timeout, the answer still comes when the command exits, and the child that kept
    its output is stopped when the timeout comes (TERM to the command's group)."""
    since = _now_ticks()
    result = await run_command(
        reactor, ["/bin/sh", "-c", "sleep 30 & echo $!"], timeout=3, drain=0.2
    )
    pid = _leftover(result.output)
    try:
        assert result.ok and not result.timed_out, result
        assert result.left_running == [pid]
        await _gone(pid, 20)
    finally:
        _stop_leftover(pid, since)


@pytest_twisted.ensureDeferred
async def test_timeout_kills_a_child_that_ignores_term_and_holds_the_output() -> None:
    """A command still running at its timeout is answered `timed_out`; a child of it that
    ignores TERM and keeps the output is KILLed after the grace, though the command is gone."""
    since = _now_ticks()
    script = '(trap "" TERM; exec sleep 30) & echo $!; sleep 30'
    started = time.monotonic()
    result = await run_command(reactor, ["/bin/sh", "-c", script], timeout=0.5, drain=0.2)
    pid = _leftover(result.output)
    try:
        assert time.monotonic() - started < 10
        assert result.timed_out and not result.ok
        assert result.left_running == [pid]
        await _gone(pid, 20)
    finally:
        _stop_leftover(pid, since)


@pytest_twisted.ensureDeferred
async def test_a_child_that_let_go_of_the_output_is_left_alone() -> None:
    """A child that does not hold the output (a daemon that redirected it) is not waited for,
    and no timer is left to stop it: a `service restart` that starts one keeps it running."""
    since = _now_ticks()
    before = len(reactor.getDelayedCalls())
    result = await run_command(
        reactor, ["/bin/sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], timeout=30
    )
    pid = _leftover(result.output)
    try:
        assert result.ok and result.left_running == []
        assert len(reactor.getDelayedCalls()) == before
        assert _alive(pid)
    finally:
        _stop_leftover(pid, since)


class _Signals:
    """Records the signals a stopper sends instead of sending them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[str, int, int]] = []
        monkeypatch.setattr(
            "deploy.commands.signal_group", lambda g, sig: self.record("group", g, sig)
        )
        monkeypatch.setattr("deploy.commands.signal_pid", lambda p, sig: self.record("pid", p, sig))

    def record(self, kind: str, target: int, sig: int) -> bool:
        self.sent.append((kind, target, sig))
        return True


class _ReapedLeader:
    """The transport of a command whose leader has exited and been reaped."""

    pid = None


def test_stopper_signals_nothing_it_cannot_prove_is_the_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the command is reaped its group id could name another group: a leftover that is
    gone or whose pid was reused (another start time) proves nothing, and nothing is sent."""
    signals = _Signals(monkeypatch)
    me = read_stat(os.getpid())
    assert me is not None
    ghost = ProcStat(me.pid, "S", me.ppid, me.pgid, me.start_ticks + 1)  # same pid, not the same
    stopper = CommandStopper(Clock(), _ReapedLeader(), 2.0, lambda: [ghost])  # type: ignore[arg-type]
    stopper.pgid = me.pgid
    assert stopper.signal(15) is False
    assert signals.sent == []


def test_stopper_signals_a_leftovers_group_once_and_a_strays_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Leftovers still in the command's group prove the group: it gets one signal; a leftover
    that left the group (setsid) gets its own."""
    signals = _Signals(monkeypatch)
    leader = subprocess.Popen(["sleep", "30"], process_group=0)
    children = [
        leader,
        subprocess.Popen(["sleep", "30"], process_group=leader.pid),
        subprocess.Popen(["sleep", "30"], start_new_session=True),
    ]
    try:
        in_group, mate, stray = (read_stat(child.pid) for child in children)
        assert in_group is not None and mate is not None and stray is not None
        assert in_group.pgid == mate.pgid == leader.pid != stray.pgid
        leftovers = [in_group, mate, stray]
        stopper = CommandStopper(Clock(), _ReapedLeader(), 2.0, lambda: leftovers)  # type: ignore[arg-type]
        stopper.pgid = in_group.pgid
        assert stopper.signal(15) is True
        assert signals.sent == [("group", in_group.pgid, 15), ("pid", stray.pid, 15)]
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_pipe_holders_finds_the_processes_holding_a_pipe() -> None:
    """A child given a pipe's write end holds it (and so is found by the pipe's inode); one
    started without it is not; the caller itself is never listed."""
    read_end, write_end = os.pipe()
    holder = subprocess.Popen(["sleep", "30"], stdout=write_end)
    other = subprocess.Popen(["sleep", "30"], stdout=subprocess.DEVNULL)
    os.close(write_end)
    try:
        inode = os.fstat(read_end).st_ino
        assert [s.pid for s in pipe_holders([inode])] == [holder.pid]
        later = read_stat(other.pid)
        assert later is not None
        assert pipe_holders([inode], since_ticks=later.start_ticks + 10**9) == []
    finally:
        for child in (holder, other):
            child.kill()
            child.wait()
        os.close(read_end)


def test_group_leader_prefix_is_setsid() -> None:
    """Children are started through setsid so they lead their own process group."""
    prefix = group_leader_prefix()
    assert prefix and os.path.basename(prefix[0]) == "setsid"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
