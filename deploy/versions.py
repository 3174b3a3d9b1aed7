"""Which deploy answers: `agentVersion` added to an order's JSON answer (status), so that a
fleet's status shows agents of mixed versions. `--version` texts are `deploy.version_text`."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer

from deploy import __version__
from deploy.wire import JSON_TYPE, Response, encode_json

Handler = TypeVar("Handler", bound=Callable[..., Any])


def with_agent_version(response: Response) -> Response:
    """`response` with `agentVersion` beside its keys, when it is a JSON object."""
    if response.content_type != JSON_TYPE:
        return response
    try:
        body = json.loads(response.body.decode("utf-8", "surrogateescape"))
    except ValueError:
        return response
    if not isinstance(body, dict):
        return response
    body["agentVersion"] = __version__
    return Response(response.status, encode_json(body), response.content_type)


def answers_with_agent_version(handler: Handler) -> Handler:
    """An order handler (answering a Response or a Deferred of one) whose answers say the
    agent's version."""

    @functools.wraps(handler)
    def answer(*args: Any, **kwargs: Any) -> Any:
        result = handler(*args, **kwargs)
        if isinstance(result, defer.Deferred):
            return result.addCallback(with_agent_version)
        return with_agent_version(result)

    return answer  # type: ignore[return-value]
