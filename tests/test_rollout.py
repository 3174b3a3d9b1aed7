"""The rollout state machine (deploy.rollout) on its own: batches, the cumulative failure budget,
canaries, rollback of exactly the switched hosts — no reactor, no I/O."""

from __future__ import annotations

import pytest

from deploy.rollout import (
    BUSY,
    CHECK_FAILED,
    FAILED,
    OK,
    ROLLBACK_FAILED,
    ROLLED_BACK,
    SKIPPED,
    TIMED_OUT,
    UNREACHABLE,
    CheckCanaries,
    Finished,
    RollBack,
    Rollout,
    Start,
    poll_interval,
)

HOSTS = [f"h{i}" for i in range(1, 7)]


def finish(r: Rollout, outcomes: dict[str, str], switched: bool = True) -> list[object]:
    actions: list[object] = []
    for host, outcome in outcomes.items():
        actions += r.host_done(host, outcome, switched=switched and outcome == OK)
    return actions


def test_a_batch_starts_only_when_every_host_of_the_one_before_is_done() -> None:
    """Batch 2 is not started while any host of batch 1 is still running."""
    r = Rollout(HOSTS, batch=2)
    assert r.start() == [Start(("h1", "h2"))]
    assert r.host_done("h1", OK, switched=True) == []
    assert r.host_done("h2", OK, switched=True) == [Start(("h3", "h4"))]
    assert finish(r, {"h3": OK, "h4": OK}) == [Start(("h5", "h6"))]
    assert finish(r, {"h5": OK, "h6": OK}) == [Finished(False, "")]


def test_no_batch_means_every_host_at_once() -> None:
    """Without --batch every host starts in the first batch."""
    r = Rollout(HOSTS)
    assert r.start() == [Start(tuple(HOSTS))]


def test_percent_batch_rounds_up() -> None:
    """--batch=34% of 6 hosts is 3 hosts (a batch rounds up)."""
    r = Rollout(HOSTS, batch="34%")
    assert r.start() == [Start(("h1", "h2", "h3"))]


def test_the_budget_is_cumulative_across_batches() -> None:
    """One failure in batch 1 and one in batch 2 exceed --max-fail=1 although no batch did."""
    r = Rollout(HOSTS, batch=2, max_fail=1)
    r.start()
    assert finish(r, {"h1": FAILED, "h2": OK}) == [Start(("h3", "h4"))]
    assert r.host_done("h3", UNREACHABLE) == []  # h4 still running: wait for it
    assert r.host_done("h4", OK, switched=True) == [RollBack(("h2", "h4"))]
    assert r.states["h5"].outcome == SKIPPED and r.states["h6"].outcome == SKIPPED


@pytest.mark.parametrize("kind", [FAILED, UNREACHABLE, TIMED_OUT, CHECK_FAILED, BUSY])
def test_every_kind_of_failure_counts(kind: str) -> None:
    """Unreachable, timed-out, check-failed and busy hosts spend the budget like a failed sync."""
    r = Rollout(HOSTS, batch=1, max_fail=0)
    r.start()
    assert r.host_done("h1", kind) == [Finished(True, "more than 0 host(s) failed")]
    assert [r.states[h].outcome for h in HOSTS[1:]] == [SKIPPED] * 5


def test_rollback_is_of_exactly_the_switched_hosts() -> None:
    """Hosts that failed, were skipped or never switched are not rolled back."""
    r = Rollout(HOSTS, batch=3, max_fail=0)
    r.start()
    r.host_done("h1", OK, switched=True)
    r.host_done("h2", OK, switched=False)  # in-place group: nothing to roll back
    assert r.host_done("h3", CHECK_FAILED) == [RollBack(("h1",))]
    assert r.rolled_back("h1", True) == [Finished(True, "more than 0 host(s) failed")]
    assert r.states["h1"].outcome == ROLLED_BACK
    assert r.states["h2"].outcome == OK
    assert r.states["h4"].outcome == SKIPPED


def test_a_failed_rollback_is_reported() -> None:
    """A host whose rollback failed is rollback_failed and still counts as switched."""
    r = Rollout(HOSTS[:2], batch=2, max_fail=0)
    r.start()
    r.host_done("h1", OK, switched=True)
    assert r.host_done("h2", FAILED) == [RollBack(("h1",))]
    assert r.rolled_back("h1", False, "no earlier release") == [
        Finished(True, "more than 0 host(s) failed")
    ]
    assert r.states["h1"].outcome == ROLLBACK_FAILED and r.states["h1"].switched


def test_no_rollback_stops_without_rolling_back() -> None:
    """--no-rollback: the budget still stops the rollout, the switched hosts stay switched."""
    r = Rollout(HOSTS, batch=2, max_fail=0, rollback=False)
    r.start()
    r.host_done("h1", OK, switched=True)
    assert r.host_done("h2", FAILED) == [Finished(True, "more than 0 host(s) failed")]
    assert r.states["h1"].outcome == OK


def test_without_a_budget_failures_do_not_stop() -> None:
    """No --max-fail: every batch runs whatever fails."""
    r = Rollout(HOSTS, batch=3)
    r.start()
    assert finish(r, {"h1": FAILED, "h2": FAILED, "h3": FAILED}) == [Start(("h4", "h5", "h6"))]


def test_percent_budget_rounds_down() -> None:
    """--max-fail=20% of 6 hosts is 1: the second failure stops it."""
    r = Rollout(HOSTS, batch=1, max_fail="20%")
    r.start()
    assert r.host_done("h1", FAILED) == [Start(("h2",))]
    assert r.host_done("h2", FAILED) == [Finished(True, "more than 1 host(s) failed")]


def test_canary_batch_then_check_then_the_rest() -> None:
    """--canary=1: one host first, its check again after the wait, then the batches."""
    r = Rollout(HOSTS, batch=3, canary=1)
    assert r.start() == [Start(("h1",))]
    assert r.host_done("h1", OK, switched=True) == [CheckCanaries(("h1",))]
    assert r.canaries_checked({"h1": True}) == [Start(("h2", "h3", "h4"))]
    assert finish(r, {"h2": OK, "h3": OK, "h4": OK}) == [Start(("h5", "h6"))]


def test_a_canary_that_fails_its_later_check_stops_and_rolls_back() -> None:
    """A canary passing its sync but failing the check after the wait stops the rollout."""
    r = Rollout(HOSTS, canary=2, max_fail=5)
    r.start()
    r.host_done("h1", OK, switched=True)
    assert r.host_done("h2", OK, switched=True) == [CheckCanaries(("h1", "h2"))]
    assert r.canaries_checked({"h1": True, "h2": False}) == [RollBack(("h1", "h2"))]
    assert r.states["h2"].outcome == CHECK_FAILED
    assert all(r.states[h].outcome == SKIPPED for h in HOSTS[2:])


def test_a_canary_that_fails_its_sync_stops_whatever_the_budget() -> None:
    """A canary must pass whole: one failed canary stops the rollout even with budget left."""
    r = Rollout(HOSTS, canary=2, max_fail=3)
    r.start()
    assert r.host_done("h1", FAILED) == []  # h2 still running
    assert r.host_done("h2", OK, switched=True) == [RollBack(("h2",))]
    assert r.stop_reason == "canary h1 failed"


def test_no_hosts_finishes_at_once() -> None:
    """A rollout over no hosts is over before it starts."""
    assert Rollout([]).start() == [Finished(False, "")]


def test_events_out_of_turn_are_refused() -> None:
    """A result for a host not running, or a rollback not asked for, is a driver bug: refused."""
    r = Rollout(HOSTS, batch=2)
    r.start()
    with pytest.raises(ValueError):
        r.host_done("h5", OK)
    with pytest.raises(ValueError):
        r.host_done("h1", "weird")
    with pytest.raises(ValueError):
        r.rolled_back("h1", True)
    with pytest.raises(ValueError):
        r.canaries_checked({})


def test_poll_interval_is_a_tenth_of_the_time_followed_within_bounds() -> None:
    """Quick polls at first, then a tenth of the time followed so far, never over the cap."""
    assert poll_interval(0.0, 0.25, 1.0) == 0.25
    assert poll_interval(5.0, 0.25, 1.0) == 0.5
    assert poll_interval(60.0, 0.25, 1.0) == 1.0
