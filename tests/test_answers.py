"""What a client keeps of a host's answer (deploy/answers.py): the per-order limit, the budget
shared by all the hosts of a proxy's orders, answers that cannot be decoded safely (200,000
nested `[`), and how deploy-client shows whatever JSON an agent sends — never a traceback."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor

from deploy import output, table
from deploy.answers import (
    MAX_NESTING,
    AnswerAccount,
    AnswerBudget,
    AnswerReader,
    ResponseError,
    decode_content,
    measure,
)
from deploy.client import ClientOptions, HostResult, Order, OrderClient, fan_out, result_of
from deploy.progressline import RUNNING, SyncBoard, SyncEvent, progress_event
from tests.test_client import FakeAgent, answer, json_response, response

STATUS = Order("status", "web")
NESTED = b"[" * 200_000


def head(length: int | None, content_type: str = "application/json") -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --------------------------------------------------------------------------- limits


def test_an_answer_announced_larger_than_its_orders_limit_is_refused_before_its_body():
    """Content-Length above the order's limit: refused at the head, nothing of the body kept."""
    reader = AnswerReader(1000, order="status")
    with pytest.raises(ResponseError, match="a status answer larger than 1000 bytes"):
        reader.feed(head(1001))
    assert not reader.buffer


def test_an_answer_without_length_is_cut_at_its_orders_limit():
    """Without Content-Length, the body is refused as soon as it passes the limit."""
    reader = AnswerReader(1000, order="rlist")
    assert reader.feed(head(None) + b"x" * 1000) is None
    with pytest.raises(ResponseError, match="a rlist answer larger than 1000 bytes"):
        reader.feed(b"x")


def test_the_budget_bounds_the_bytes_of_all_hosts_and_is_given_back():
    """Two hosts' answers in one budget: the one that would pass it is refused; bytes come back
    when an answer is whole, dropped or refused, and when the order's account closes."""
    budget = AnswerBudget(1000)
    account = AnswerAccount(budget)
    first, second = AnswerReader(account=account), AnswerReader(account=account)
    assert first.feed(head(600) + b"x" * 300) is None
    taken = budget.held
    assert taken > 300
    with pytest.raises(ResponseError, match="the answers held at once would pass 1000 bytes"):
        second.feed(head(600) + b"y" * 600)
    assert budget.held == taken, "the refused answer's bytes were not given back"
    assert first.feed(b"x" * 300) is not None
    assert budget.held == 0, "a whole answer's raw bytes are handed on, not held"
    third = AnswerReader(account=account)
    third.feed(head(600) + b"z" * 10)
    third.release()  # a host dropped at its timeout
    assert budget.held == 0
    assert account.take(400) and budget.held == 400
    account.close()
    assert budget.held == 0 and account.held == 0


# --------------------------------------------------------------------------- decoding


def test_two_hundred_thousand_nested_brackets_are_a_bad_answer():
    """The answer that crashed deploy-client: a ResponseError, not a RecursionError."""
    with pytest.raises(ResponseError, match=f"nested more than {MAX_NESTING} levels"):
        decode_content({"content-type": "application/json"}, NESTED)
    with pytest.raises(ResponseError):
        decode_content({}, NESTED + b"]" * 200_000)  # well-formed, as deep


def test_nesting_is_refused_beyond_the_limit_only():
    """MAX_NESTING levels decode; one more is refused (before printing it could recurse)."""
    deep = json.dumps(json.loads("[" * MAX_NESTING + "]" * MAX_NESTING)).encode()
    assert decode_content({}, deep) == json.loads(deep)
    with pytest.raises(ResponseError):
        decode_content({}, b"[" + deep + b"]")
    obj = b'{"a":' * (MAX_NESTING + 1) + b"1" + b"}" * (MAX_NESTING + 1)
    with pytest.raises(ResponseError):
        decode_content({}, obj)


def test_json_that_says_it_is_json_and_is_not_is_a_bad_answer():
    """application/json that does not parse is refused; text that looks like JSON stays text."""
    with pytest.raises(ResponseError, match="undecodable JSON"):
        decode_content({"content-type": "application/json; charset=utf-8"}, b'{"return": ')
    assert decode_content({"content-type": "text/plain"}, b"{not json") == "{not json"


def test_measure_counts_what_decoding_built():
    """A decoded list of many small strings weighs more than its JSON text."""
    names = [f"d{i % 100:02d}/f{i:06d}.dat" for i in range(10_000)]
    raw = json.dumps({"transferNewFiles": names}).encode()
    assert measure(json.loads(raw)) > len(raw)


def test_an_undecodable_answer_is_that_hosts_bad_answer():
    """result_of: the host answered, but what it sent is its error (serverStatus 0)."""
    answer_ = (200, "OK", {"content-type": "application/json"}, NESTED)
    result = result_of("web1:3440", STATUS, answer_, "web1", 3440)
    assert result.server_status == 0 and not result.succeeded
    assert result.content == (
        f"bad answer from web1:3440: JSON nested more than {MAX_NESTING} levels deep"
    )
    row = output.rows_for("web1:3440", "status", result.to_json())[0]
    assert row.outcome == "failed" and output.exit_code([row]) == output.EXIT_FAILED


# --------------------------------------------------------------------------- over loopback


def big_status(size: int) -> bytes:
    return json_response({"return": "true", "content": "x" * size})


@pytest_twisted.ensureDeferred
async def test_an_oversized_answer_is_that_hosts_error_and_the_others_arrive() -> None:
    """Per-order limits (a status answer at most 64 KiB here): the host over it is its error."""
    agents = [FakeAgent(answer(big_status(100_000))), FakeAgent(answer(big_status(1000)))]
    options = ClientOptions(answer_limits={"status": 64 * 1024})
    try:
        fan = await fan_out(OrderClient(reactor, options), [a.address for a in agents], STATUS)
    finally:
        for a in agents:
            await a.stop()
    big, small = (fan.results[a.address] for a in agents)
    assert big.server_status == 0
    assert (
        big.content
        == f"bad answer from {agents[0].address}: a status answer larger than 65536 bytes"
    )
    assert small.succeeded and len(small.content["content"]) == 1000


@pytest_twisted.ensureDeferred
async def test_the_budget_of_an_order_refuses_the_answer_that_would_pass_it() -> None:
    """Four hosts answering 0.9 MiB each within a 3 MiB budget: three are kept, one is refused
    (that host's error), and closing the order's account gives every byte back."""
    size = 900 * 1024
    agents = [FakeAgent(answer(big_status(size))) for _ in range(4)]
    budget = AnswerBudget(3 * 1024 * 1024)
    account = AnswerAccount(budget)
    try:
        fan = await fan_out(
            OrderClient(reactor, ClientOptions(), account), [a.address for a in agents], STATUS
        )
    finally:
        for a in agents:
            await a.stop()
    results = list(fan.results.values())
    refused = [r for r in results if not r.succeeded]
    assert len(refused) == 1, [r.content if not r.succeeded else "ok" for r in results]
    assert refused[0].content.endswith("the answers held at once would pass 3145728 bytes")
    assert all(len(r.content["content"]) == size for r in results if r.succeeded)
    assert budget.held >= 3 * size
    account.close()
    assert budget.held == 0


@pytest_twisted.ensureDeferred
async def test_nested_answer_through_the_twisted_client_is_that_hosts_error() -> None:
    """OrderClient: 200,000 nested `[` from one agent is its bad answer, the other succeeds."""
    nested = FakeAgent(answer(response(200, NESTED)))
    good = FakeAgent(answer(json_response({"return": "true"})))
    try:
        fan = await fan_out(
            OrderClient(reactor, ClientOptions()), [nested.address, good.address], STATUS
        )
    finally:
        await nested.stop()
        await good.stop()
    assert "nested more than" in fan.results[nested.address].content
    assert fan.results[good.address].succeeded


# --------------------------------------------------------------------------- showing any JSON

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=30,
)
KEYS = st.sampled_from(
    [
        "return",
        "alreadyRsync",
        "progress",
        "lastRsync",
        "message",
        "content",
        "checksum",
        "outcome",
        "exitCode",
        "transferFilesCount",
        "transferFilesSize",
        "percent",
        "serverStatus",
    ]
)
AGENT_JSON = st.dictionaries(KEYS, JSON | st.sampled_from(["true", "false"]), max_size=8)


def entry_for(content: Any, server_status: int = 1, code: Any = "200") -> dict[str, Any]:
    return {
        "return": 1,
        "serverStatus": server_status,
        "returnCode": code,
        "returnString": "OK",
        "content": content,
    }


@given(
    content=AGENT_JSON | JSON,
    order=st.sampled_from(["status", "rlist", "rsync", "rkill", "exec"]),
    server_status=st.sampled_from([0, 1]),
    via_proxy=st.booleans(),
)
def test_any_json_from_an_agent_is_shown_without_a_traceback(
    content: Any, order: str, server_status: int, via_proxy: bool
) -> None:
    """Whatever JSON an agent (or a proxy for it) sends, every rendering of it works."""
    entry = entry_for(content, server_status)
    if via_proxy:
        entry = entry_for({"agent1": {order: entry}, "agent2": {order: entry_for("x")}})
    rows = output.rows_for("host1", order, entry, seconds=0.5)
    table.render_table(rows)
    for row in rows:
        output.ndjson_line(row.to_json())
        table.message_of(row)
    output.render_json({"host1": {order: entry}})
    output.summary_line(rows)
    output.exit_code(rows)
    progress = content.get("progress") if isinstance(content, dict) else content
    running = SyncEvent("host1", None, RUNNING, progress)
    SyncBoard(1).update(running)
    output.ndjson_line(progress_event(running))


def test_odd_values_where_figures_and_progress_go():
    """A `progress` that is no object and a 400-digit byte count are shown, not raised."""
    running = {"return": "true", "alreadyRsync": "true", "progress": 5}
    row = output.rows_for("h", "status", entry_for(running))[0]
    assert table.message_of(row) == "running"
    huge = {"return": "true", "transferFilesSize": 10**400, "transferFilesCount": [1]}
    shown = table.render_table(output.rows_for("h", "status", entry_for(huge)))
    assert shown.splitlines()[1].split()[:5] == ["h", "status", "ok", "[1]", "-"]
    odd = SyncEvent("h", None, RUNNING, ["50%"])  # type: ignore[arg-type]
    board = SyncBoard(1)
    board.update(odd)
    assert board.parts() == ["1/1 syncing", "0 done", "0 failed"]
    assert progress_event(odd)["percent"] is None


def test_host_result_size_is_not_part_of_its_value():
    """`size` is bookkeeping: results compare equal whatever it says."""
    assert HostResult("h", "status", 1, 200, size=10) == HostResult("h", "status", 1, 200)
