"""`--retry-failed`: reading a saved result (`--format json` or NDJSON) back into rows, and the
`RetryPlan` of which hosts, and which agents behind which proxy, did not succeed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from deploy import output
from deploy.output import Row


@dataclass
class RetryPlan:
    """What `--retry-failed` re-runs: hosts ordered directly (or proxies whose own answer
    failed), and per proxy the agents that failed behind it."""

    orders: list[str] = field(default_factory=list)
    direct: list[str] = field(default_factory=list)
    via: dict[str, list[str]] = field(default_factory=dict)

    @property
    def hosts(self) -> list[str]:
        return list(dict.fromkeys([*self.direct, *self.via]))


def read_result_rows(path: str) -> list[Row]:
    """The rows of a saved result: the JSON map (`--format json`) or NDJSON lines."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as e:
        raise ValueError(f"--retry-failed: cannot read {path}: {e.strerror or e}") from None
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict) and not isinstance(whole.get("host"), str):
        if "summary" in whole:
            return []
        try:
            return output.rows_from_result_map(whole)
        except ValueError as e:
            raise ValueError(f"--retry-failed: {path}: {e}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            raise ValueError(
                f"--retry-failed: {path}:{number}: neither a JSON result nor NDJSON"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"--retry-failed: {path}:{number}: expected a JSON object")
        if "summary" in data or "event" in data:
            continue  # the summary line, and --wait's progress events
        host, order = data.get("host"), data.get("order")
        if not isinstance(host, str) or not isinstance(order, str):
            raise ValueError(f"--retry-failed: {path}:{number}: a line without host and order")
        entry = {k: v for k, v in data.items() if k not in ("host", "via", "order", "outcome")}
        outcome = data.get("outcome")
        if not isinstance(outcome, str):
            outcome = output.outcome_of(order, entry)
        via = data.get("via") if isinstance(data.get("via"), str) else None
        rows.append(Row(host, order, outcome, entry, via=via))
    return rows


def retry_plan(rows: list[Row]) -> RetryPlan:
    """The hosts of `rows` that did not succeed (failed, unreachable, timed out, skipped)."""
    plan = RetryPlan()
    for row in rows:
        if row.order not in plan.orders:
            plan.orders.append(row.order)
        if row.good:
            continue
        if row.via is None:
            if row.host not in plan.direct:
                plan.direct.append(row.host)
        else:
            agents = plan.via.setdefault(row.via, [])
            if row.host not in agents:
                agents.append(row.host)
    return plan
