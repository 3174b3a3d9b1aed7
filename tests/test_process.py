"""Tests of deploy.process: /proc identity and group look-ups on real processes, the stop policy
as a plain state machine, its Twisted driver on a Clock, and group signals on real children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from deploy.process import (
    GroupStopper,
    Stopper,
    StopPolicy,
    all_processes,
    has_exited,
    is_same_process,
    proc_start_ticks,
    process_group_pids,
    read_stat,
    signal_group,
    signal_pid,
)
from tests.harness import wait_until

TERM, KILL = signal.SIGTERM, signal.SIGKILL

# --------------------------------------------------------------------------- /proc


def test_read_stat_of_ourselves_and_of_no_one() -> None:
    """read_stat gives our own parent, group and start time; a pid that does not exist, None."""
    me = read_stat(os.getpid())
    assert me is not None and me.alive
    assert (me.ppid, me.pgid) == (os.getppid(), os.getpgrp())
    assert me.start_ticks == proc_start_ticks(os.getpid())
    assert read_stat(2**22 + 1) is None  # above pid_max: never a process
    assert os.getpid() in [s.pid for s in all_processes()]


def test_is_same_process_needs_the_right_start_time() -> None:
    """Our own pid with its real start time is the same process; with any other start time
    (the pid was reused), or no start time, it is not."""
    me = os.getpid()
    ticks = proc_start_ticks(me)
    assert ticks is not None
    assert is_same_process(me, ticks)
    assert not is_same_process(me, ticks + 1)
    assert not is_same_process(me, None)
    assert not is_same_process(None, ticks)


def test_is_same_process_false_for_gone_and_zombie() -> None:
    """A pid that exited, even if not yet reaped (a zombie), is not the process any more."""
    child = subprocess.Popen(["true"])
    ticks = proc_start_ticks(child.pid)

    def zombie() -> bool:
        stat = read_stat(child.pid)
        return stat is not None and stat.state == "Z"

    wait_until(zombie, 10, what="the child to be a zombie")
    assert not is_same_process(child.pid, ticks)
    child.wait()
    assert not is_same_process(child.pid, ticks)


def test_process_group_pids_lists_the_group() -> None:
    """process_group_pids finds the members of a process group, leader first."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import os,time; os.fork(); time.sleep(30)"], process_group=0
    )
    try:
        wait_until(lambda: len(process_group_pids(child.pid)) == 2, 10, what="the fork")
        pids = process_group_pids(child.pid)
        assert pids[0] == child.pid
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    wait_until(lambda: process_group_pids(child.pid) == [], 10, what="the group to go")


def test_has_exited_leaves_the_zombie_to_its_parent() -> None:
    """has_exited says a child has exited without reaping it: its pid stays taken until wait()."""
    child = subprocess.Popen(["true"])
    wait_until(lambda: has_exited(child.pid), 10, what="the child to exit")
    stat = read_stat(child.pid)
    assert stat is not None and stat.state == "Z"
    assert child.wait() == 0


# --------------------------------------------------------------------------- signals


def test_signals_are_never_sent_to_special_pids() -> None:
    """0, 1 and negative pids (our own group, init, everything) are refused, not signalled."""
    for pid in (0, 1, -1):
        assert not signal_group(pid, 0)
        assert not signal_pid(pid, 0)


def test_signals_to_a_gone_process_are_fine() -> None:
    """Signalling a process or group that is gone answers False and raises nothing."""
    child = subprocess.Popen(["true"], process_group=0)
    child.wait()
    assert not signal_group(child.pid, TERM)
    assert not signal_pid(child.pid, TERM)


# --------------------------------------------------------------------------- the stop policy


def test_policy_terms_at_once_and_kills_once_the_grace_has_passed() -> None:
    """Nothing before the request; TERM at it; KILL when the grace has passed, not before; each
    once."""
    policy = StopPolicy(5.0)
    assert policy.due(0.0) is None and policy.next_at() is None and not policy.requested
    policy.request(10.0)
    assert policy.requested and policy.next_at() == 10.0
    assert policy.due(10.0) == TERM
    assert policy.due(10.0) is None and policy.next_at() == 15.0
    assert policy.due(14.9) is None
    assert policy.due(15.0) == KILL
    assert policy.due(100.0) is None and policy.next_at() is None


def test_policy_asked_again_sends_no_second_term_but_a_shorter_grace_kills_sooner() -> None:
    """A second request does not TERM again; one with a shorter grace brings the KILL closer,
    one with a longer grace does not push it back."""
    policy = StopPolicy(30.0)
    policy.request(0.0)
    assert policy.due(0.0) == TERM
    policy.request(1.0)
    policy.request(1.0, grace=60.0)
    assert policy.next_at() == 30.0
    policy.request(2.0, grace=0.0)
    assert policy.due(2.0) == KILL


def test_policy_repeats_the_kill() -> None:
    """With `repeat`, KILL comes again every `repeat` seconds after the first."""
    policy = StopPolicy(1.0, repeat=2.0)
    policy.request(0.0)
    due = [policy.due(t) for t in (0.0, 1.0, 2.0, 3.0, 4.9, 5.0)]
    assert due == [TERM, KILL, None, KILL, None, KILL]
    with pytest.raises(ValueError):
        StopPolicy(1.0, repeat=0)


class Target:
    """What a Stopper stops: records each signal; `there` says whether it still exists."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, int]] = []
        self.there = True
        self.clock = Clock()

    def send(self, sig: int) -> bool:
        self.sent.append((self.clock.seconds(), sig))
        return self.there


@pytest.fixture
def target() -> Target:
    return Target()


def test_stopper_terms_now_and_kills_after_the_grace(target: Target) -> None:
    """stop() TERMs at once and KILLs when the grace has passed; then no timer is left."""
    stopper = Stopper(target.clock, StopPolicy(3.0), target.send)
    stopper.stop()
    assert target.sent == [(0.0, TERM)] and stopper.requested
    target.clock.advance(2.9)
    assert len(target.sent) == 1
    target.clock.advance(0.1)
    assert target.sent == [(0.0, TERM), (3.0, KILL)]
    assert target.clock.getDelayedCalls() == []


def test_stopper_cancelled_when_the_process_ends_sends_nothing_more(target: Target) -> None:
    """cancel() (the process ended) drops the KILL to come and any stop asked for later."""
    stopper = Stopper(target.clock, StopPolicy(3.0), target.send)
    stopper.stop()
    stopper.cancel()
    assert target.clock.getDelayedCalls() == []
    stopper.stop()
    target.clock.advance(10)
    assert target.sent == [(0.0, TERM)]


def test_stopper_ends_when_nothing_is_left_to_stop(target: Target) -> None:
    """A target that is gone at the TERM gets no KILL, and no timer waits for one."""
    target.there = False
    stopper = Stopper(target.clock, StopPolicy(3.0), target.send)
    stopper.stop()
    assert target.clock.getDelayedCalls() == []
    target.clock.advance(10)
    assert target.sent == [(0.0, TERM)]


def test_stopper_stop_after_is_a_timeout(target: Target) -> None:
    """stop_after(t) stops at t; cancelled before t, nothing is sent and no timer is left."""
    stopper = Stopper(target.clock, StopPolicy(1.0), target.send)
    stopper.stop_after(5.0)
    target.clock.advance(4.9)
    assert target.sent == [] and not stopper.requested
    target.clock.advance(0.1)
    target.clock.advance(1.0)
    assert target.sent == [(5.0, TERM), (6.0, KILL)]
    other = Stopper(target.clock, StopPolicy(1.0), target.send)
    other.stop_after(5.0)
    other.cancel()
    assert target.clock.getDelayedCalls() == []
    target.clock.advance(20)
    assert len(target.sent) == 2 and not other.requested


@pytest.fixture
def group() -> Iterator[subprocess.Popen[bytes]]:
    """A real process group: a leader and its fork, both ignoring TERM."""
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "os.fork()\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], process_group=0)
    wait_until(lambda: len(process_group_pids(child.pid)) == 2, 10, what="the fork")
    yield child
    signal_group(child.pid, KILL)
    child.wait()


def test_group_stopper_kills_a_group_that_ignores_term(group: subprocess.Popen[bytes]) -> None:
    """A group that ignores TERM lives on through the grace and is gone after the KILL."""
    clock = Clock()
    stopper = GroupStopper(clock, group.pid, 2.0)
    stopper.stop()
    clock.advance(1.9)
    assert len(process_group_pids(group.pid)) == 2
    clock.advance(0.1)
    wait_until(lambda: process_group_pids(group.pid) == [], 10, what="the group to go")
    assert group.wait() == -KILL


def test_group_stopper_signals_an_ungrouped_leader_alone() -> None:
    """A child that leads no group of its own (no setsid) is stopped alone through its transport,
    while the transport still knows its pid."""

    class Transport:
        pid: Any = None

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    transport = Transport()
    transport.pid = child.pid
    stopper = GroupStopper(Clock(), child.pid, 2.0, leader=transport)  # type: ignore[arg-type]
    stopper.stop()
    assert child.wait(timeout=10) == -TERM
