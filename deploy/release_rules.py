"""The states of a release in the history (deploy.releases) and the pure rules over a history's
records: which release is the rollback target, and which releases cleanup takes out."""

from __future__ import annotations

from typing import Any

STATE_LIVE = "live"
STATE_STAGED = "staged"
STATE_GOOD = "good"
STATE_BAD = "bad"
STATE_PARTIAL = "partial"


def previous_good(records: list[dict[str, Any]], live: str | None) -> str | None:
    """The rollback target: the good release other than the live one activated last."""
    good = [r for r in records if r["state"] == STATE_GOOD and r["id"] != live]
    good.sort(key=lambda r: (r.get("activated") or 0, r["id"]))
    return good[-1]["id"] if good else None


def cleanup_plan(records: list[dict[str, Any]], live: str | None, keep: int) -> list[str]:
    """The releases to delete: good ones beyond the `keep` newest (the live one counts), bad ones
    but the newest, staged ones older than the live one; never the live release, the rollback
    target, or a partial."""
    protected = {live, previous_good(records, live)}
    newest_first = sorted(records, key=lambda r: r["id"], reverse=True)
    good = [r["id"] for r in newest_first if r["state"] == STATE_GOOD or r["id"] == live]
    bad = [r["id"] for r in newest_first if r["state"] == STATE_BAD and r["id"] != live]
    staged = [
        r["id"]
        for r in newest_first
        if r["state"] == STATE_STAGED and r["id"] != live and live is not None and r["id"] < live
    ]
    doomed = good[keep:] + bad[1:] + staged
    return sorted(i for i in doomed if i not in protected)
