"""What `deploy-client` makes of the answers: the outcome of each host's answer (looking through a
proxy's answer to its agents), the exit code those outcomes make, and the renderings for scripts —
the original JSON and NDJSON. The table for people is `deploy.table`, the progress line
`deploy.progressline`.

Pure Python with no Twisted import: the client imports it before it knows it will connect."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from deploy.orders import SKIPPED

BAD_ANSWER = "bad answer from "  # deploy.orders.bad_answer: garbage, too large, undecodable

# -------------------------------------------------------------------------------- exit codes

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_FAILED = 2
EXIT_UNREACHABLE = 3
EXIT_STOPPED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

# The one table of exit codes: `exit_code()` decides them, `--help` prints this.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "every host answered and succeeded (a sync ended ok or warning)",
    EXIT_USAGE: "usage or local error (bad option, config file, result file)",
    EXIT_FAILED: "at least one host answered with a failure (or its sync failed)",
    EXIT_UNREACHABLE: "at least one host was unreachable or timed out (and none failed)",
    EXIT_STOPPED: "a rolling deploy stopped at its failure budget (--max-fail)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C) before every host answered; syncs started go on",
}

FORMATS = ("json", "table", "ndjson")

# Outcomes a row can have. The sync outcomes (`warning`, `killed`, `lost`, `refused`) come from
# the agent's `lastRsync`/`outcome`; `timeout` is also a `--wait` that ran out of time.
GOOD = frozenset({"ok", "warning"})
NO_ANSWER = frozenset({"unreachable", "timeout"})


@dataclass
class Row:
    """One agent's answer to one order: ordered directly, or through the proxy `via`."""

    host: str
    order: str
    outcome: str
    entry: dict[str, Any]  # the original shape: return, serverStatus, returnCode, ..., content
    via: str | None = None
    # The host's own time: the client's round trip to it; through a proxy, the agent's round
    # trip as the proxy measured it (an older proxy's answer: the client's to the proxy).
    seconds: float | None = None

    @property
    def good(self) -> bool:
        return self.outcome in GOOD

    @property
    def content(self) -> Any:
        return self.entry.get("content")

    def to_json(self) -> dict[str, Any]:
        """The NDJSON line of this row: who, what, outcome, then the original answer's keys."""
        line: dict[str, Any] = {"host": self.host}
        if self.via is not None:
            line["via"] = self.via
        line["order"] = self.order
        line["outcome"] = self.outcome
        if self.seconds is not None:
            line["seconds"] = round(self.seconds, 3)
        line.update(self.entry)
        return line


def is_proxy_answer(content: Any) -> TypeGuard[dict[str, dict[str, Any]]]:
    """A proxy's answer, `{agent: {order: {serverStatus, ...}}}`, as opposed to an agent's JSON."""
    if not isinstance(content, dict) or not content or "return" in content:
        return False
    return all(
        isinstance(per_order, dict)
        and per_order
        and all(isinstance(e, dict) and "serverStatus" in e for e in per_order.values())
        for per_order in content.values()
    )


def _false(value: Any) -> bool:
    return value in ("false", False, 0, "0")


def last_rsync(content: Mapping[str, Any]) -> dict[str, Any]:
    """The agent's `lastRsync` in an answer's content; empty when there is none."""
    last = content.get("lastRsync")
    return last if isinstance(last, dict) else {}


def outcome_of(order: str, entry: Mapping[str, Any]) -> str:
    """The outcome of one original-shape answer (not looking inside a proxy's answer)."""
    if entry.get("skipped"):
        return SKIPPED
    content = entry.get("content")
    if entry.get("serverStatus") == 0:
        if isinstance(content, str) and content.startswith("Process Timeout"):
            return "timeout"
        if isinstance(content, str) and content.startswith(BAD_ANSWER):
            return "failed"  # it answered, with something that is not an answer
        return "unreachable"
    if str(entry.get("returnCode")) != "200":
        return "failed"
    if not isinstance(content, dict):
        return "ok"
    if order == "rsync":
        # A sync that ended at once, or one `--wait` followed: the sync's own outcome.
        outcome = content.get("outcome") or last_rsync(content).get("outcome")
        if isinstance(outcome, str) and outcome:
            return outcome
    if _false(content.get("return")):
        return "failed"
    return "ok"


def rows_for(
    host: str, order: str, entry: Mapping[str, Any], seconds: float | None = None
) -> list[Row]:
    """The rows of one host's answer: one, or one per agent when the host is a proxy that
    answered for its agents."""
    entry = dict(entry)
    content = entry.get("content")
    if outcome_of(order, entry) == "ok" and is_proxy_answer(content):
        rows = []
        for agent, per_order in content.items():
            for agent_order, agent_entry in per_order.items():
                agent_entry = dict(agent_entry)
                own = take_agent_seconds(agent_entry, seconds)
                rows.append(
                    Row(
                        agent,
                        agent_order,
                        outcome_of(agent_order, agent_entry),
                        agent_entry,
                        via=host,
                        seconds=own,
                    )
                )
        return rows
    return [Row(host, order, outcome_of(order, entry), entry, seconds=seconds)]


def take_agent_seconds(entry: dict[str, Any], proxy_seconds: float | None) -> float | None:
    """An agent's own time, taken out of its `entry` in a proxy's answer (the row keeps it apart
    from the original keys): its `seconds`, None when the proxy never ordered it or sent no
    number; without the key (an older proxy, which did not time its agents) `proxy_seconds`."""
    if "seconds" not in entry:
        return proxy_seconds
    value = entry.pop("seconds")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def rows_from_result_map(result: Mapping[str, Any]) -> list[Row]:
    """Rows of a whole `host → order → answer` map (the client's JSON output)."""
    rows: list[Row] = []
    for host, per_order in result.items():
        if not isinstance(per_order, dict):
            raise ValueError(f"{host!r}: expected an object of orders")
        for order, entry in per_order.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{host!r}/{order!r}: expected an answer object")
            rows.extend(rows_for(host, order, entry))
    return rows


def exit_code(rows: Iterable[Row], stopped: bool = False) -> int:
    """Budget stop → 4; else any failure → 2; else any host without an answer → 3; else 0."""
    outcomes = [r.outcome for r in rows]
    if stopped or SKIPPED in outcomes:
        return EXIT_STOPPED
    if any(o not in GOOD and o not in NO_ANSWER for o in outcomes):
        return EXIT_FAILED
    if any(o in NO_ANSWER for o in outcomes):
        return EXIT_UNREACHABLE
    return EXIT_OK


def counts(rows: Iterable[Row]) -> dict[str, int]:
    """Rows per outcome, the good ones first, then the rest by name."""
    found = Counter(r.outcome for r in rows)
    order = ["ok", "warning", *sorted(k for k in found if k not in GOOD)]
    return {k: found[k] for k in order if found[k]}


def summary_line(rows: list[Row], stopped: bool = False) -> str:
    """`5 hosts: 3 ok, 1 failed, 1 unreachable`."""
    n = len(rows)
    parts = ", ".join(f"{v} {k}" for k, v in counts(rows).items())
    text = f"{n} host{'s' if n != 1 else ''}" + (f": {parts}" if parts else "")
    if stopped:
        text += " (rollout stopped at its failure budget)"
    return text


def summary_json(rows: list[Row], stopped: bool, code: int) -> dict[str, Any]:
    """The last NDJSON line."""
    return {
        "summary": {
            "total": len(rows),
            "outcomes": counts(rows),
            "stopped": stopped,
            "exitCode": code,
        }
    }


# -------------------------------------------------------------------------------- renderings


def render_json(result_map: Mapping[str, Any]) -> str:
    """The original client's output, unchanged."""
    return json.dumps(result_map, indent=3, ensure_ascii=False)


def ndjson_line(data: Mapping[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
