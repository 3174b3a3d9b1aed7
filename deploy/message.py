"""The parts of the message format both ends share that need no event loop: the order names,
status texts and form encoding. `deploy.wire` re-exports the last two; the plain client imports
only this."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

ORDERS = (
    "status",
    "rlist",
    "rsync",
    "rkill",
    "exec",
    "activate",
    "rollback",
    "releases",
    "check",
)
# Orders a client gives a proxy (or, for deploy, orchestrates itself): never sent to an agent.
ROLLOUT_ORDERS = ("deploy", "rollout")
# What a proxy (and so deploy-client) takes: the agents' orders and the rollouts it runs.
PROXY_ORDERS = (*ORDERS, *ROLLOUT_ORDERS)

# A sync run's id (`runId`): the agent makes them as uuid4 hex.
_RUN_ID = re.compile(r"[0-9a-f]{1,64}")


def is_run_id(value: Any) -> bool:
    """`value` has the form of a sync run's id (what a client may name in `run=`)."""
    return isinstance(value, str) and _RUN_ID.fullmatch(value) is not None

STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Permission Denied",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    # Only in logs: a client that hung up before its answer (nginx's code for it).
    499: "Client Closed Request",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def encode_form(fields: Mapping[str, str]) -> bytes:
    """The inverse of `decode_form`, in the original client's field order."""
    from urllib.parse import quote_plus

    return "&".join(
        f"{quote_plus(k)}={quote_plus(v, safe=':,/')}" for k, v in fields.items()
    ).encode("ascii")
