"""Tests of `deploy.plainclient`, the Twisted-free client `deploy-client` uses over plain TCP: it
must say exactly what the Twisted client says (same JSON bytes, same exit code), try every
address a name resolves to, honour max_parallel, and keep Twisted out of the process."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.utils import getProcessOutputAndValue

from deploy import orders
from deploy.client import MAX_HEAD, ClientOptions, HostResult, Order, OrderClient, fan_out
from deploy.plainclient import fan_out_plain
from tests.harness import run_client, tool
from tests.test_client import (
    FakeAgent,
    Script,
    ScriptedAgent,
    answer,
    answer_in_pieces,
    hang,
    hang_up,
    json_response,
    refused_address,
    response,
)

NESTED = b"[" * 200_000  # once a RecursionError that lost every host's answer
OK = json_response({"return": "true", "alreadyRsync": "false", "transferFilesCount": "0"})
NOT_FOUND = response(400, b"exec[x] not found!", "text/plain; charset=utf-8")
PROXY_OK = response(
    200,
    json.dumps({"127.0.0.9": {"status": {"return": 1, "content": {"return": "true"}}}}).encode(),
    "text/plain; charset=utf-8",
)


async def client(*args: str) -> tuple[int, bytes, bytes]:
    """The real deploy-client, run without blocking the reactor the fake agents run in."""
    out, err, rc = await getProcessOutputAndValue(
        tool("deploy-client"), args, env=dict(os.environ), reactor=reactor
    )
    return rc, out, err


# `--debug` is one of the options that keep `deploy-client` on the Twisted client (it logs
# Twisted's events): the same command with and without it compares the two clients.
CASES: dict[str, tuple[Script | None, str, tuple[str, ...], str]] = {
    # name: (script, agent host, extra args, what the plain run's content must hold)
    "ok": (answer(OK), "127.0.0.1", (), '"return": "true"'),
    "refused": (None, "127.0.0.1", (), "can't connect to 127.0.0.1:"),
    "silent": (hang, "127.0.0.1", ("--thread-timeout=0.5",), "Process Timeout(0.5)!"),
    "garbage": (answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "127.0.0.1", (), "not an HTTP answer"),
    "hang-up": (hang_up, "127.0.0.1", (), "is it a TLS port?"),
    "via-proxy": (
        answer(PROXY_OK),
        "127.0.0.1",
        ("--args=groups:fleet", "--api-key=k1"),
        '"127.0.0.9"',
    ),
    "400": (answer(NOT_FOUND), "127.0.0.1", (), "exec[x] not found!"),
    "nested": (answer(response(200, NESTED)), "127.0.0.1", (), "nested more than 64 levels"),
    "ipv6": (answer(OK), "::1", (), '"return": "true"'),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest_twisted.ensureDeferred
async def test_plain_and_twisted_clients_print_the_same_bytes_and_exit_code(case: str) -> None:
    """For each kind of host the plain client's JSON is byte for byte the Twisted client's,
    and so is the exit code."""
    script, host, extra, expected = CASES[case]
    agent = FakeAgent(script, host=host) if script is not None else None
    address = agent.address if agent is not None else refused_address()
    args = ("--order=status", "--options=web", f"--hosts={address}", *extra)
    try:
        plain = await client(*args)
        twisted = await client(*args, "--debug")
    finally:
        if agent is not None:
            await agent.stop()
    assert expected in plain[1].decode(), plain
    assert plain[1] == twisted[1]
    assert plain[0] == twisted[0]


# Garbage and limits, compared in process: the two clients' HostResults for the same answer.
ANSWERS = {
    "ok-in-pieces": answer_in_pieces(OK, 7),
    "no-content-length": answer(b"HTTP/1.1 200 OK\r\n\r\nplain text"),
    "bad-length": answer(response(200, b"{}", length="abc")),
    "cut": answer(response(200, b'{"return": "true"}', length="500")),
    "huge-head": answer(b"HTTP/1.1 200 OK\r\nX: " + b"x" * (MAX_HEAD + 10)),
    "beyond-length": answer(response(200, b'{"return": "true"}') + b"GARBAGE"),
    "nested": answer(response(200, NESTED)),
    "json-that-is-not": answer(response(200, b'{"return": ')),
}


def plain(hosts: list[str], order: Order, options: ClientOptions) -> defer.Deferred[Any]:
    """fan_out_plain blocks: run it in a thread while the fake agents answer in the reactor."""
    return threads.deferToThread(fan_out_plain, hosts, lambda _h: order, options)


async def both_clients(script: Script, options: ClientOptions) -> tuple[HostResult, HostResult]:
    """What the Twisted client and the plain client make of one agent's answer to a status."""
    agent = FakeAgent(script)
    order = Order("status", "web")
    try:
        twisted = await OrderClient(reactor, options).send(agent.address, order)
        fan = await plain([agent.address], order, options)
    finally:
        await agent.stop()
    return twisted, fan.results[agent.address]


@pytest.mark.parametrize("name", list(ANSWERS))
@pytest_twisted.ensureDeferred
async def test_plain_client_reads_answers_as_the_twisted_client_does(name: str) -> None:
    """Answers in pieces, without Content-Length, cut, too large or with trailing bytes: the
    same HostResult from both clients."""
    twisted, plain_result = await both_clients(
        ANSWERS[name], ClientOptions(thread_timeout=5, socket_timeout=2)
    )
    assert plain_result == twisted


@pytest_twisted.ensureDeferred
async def test_both_clients_keep_an_answer_within_its_orders_limit() -> None:
    """With per-order limits (the proxy's), an answer over its order's limit is the same
    `bad answer` from both clients."""
    script = answer(json_response({"return": "true", "content": "x" * 2000}))
    twisted, plain_result = await both_clients(
        script, ClientOptions(answer_limits={"status": 1000})
    )
    assert plain_result == twisted
    assert twisted.server_status == 0
    assert twisted.content.endswith(": a status answer larger than 1000 bytes")


@pytest_twisted.ensureDeferred
async def test_a_bug_reading_one_answer_is_that_hosts_error_in_both_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception while making one host's result (a bug in the client, not the host's
    fault) is that host's result in both clients, in the same words; the other host's answer
    is kept."""
    decode = orders.decode_measured

    def buggy(headers: dict[str, str], body: bytes) -> tuple[Any, int]:
        if b"BUG" in body:
            raise KeyError("boom")
        return decode(headers, body)

    monkeypatch.setattr(orders, "decode_measured", buggy)
    agents = [FakeAgent(answer(json_response({"return": "BUG"}))), FakeAgent(answer(OK))]
    addresses = [a.address for a in agents]
    order = Order("status", "web")
    try:
        twisted = await fan_out(OrderClient(reactor, ClientOptions()), addresses, order)
        fan = await plain(addresses, order, ClientOptions())
    finally:
        for a in agents:
            await a.stop()
    assert fan.results == twisted.results
    assert fan.results[addresses[0]].content == f"{addresses[0]}: 'boom'"
    assert fan.results[addresses[1]].succeeded


@pytest_twisted.ensureDeferred
async def test_every_resolved_address_is_tried_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name whose first address refuses is reached on its next one, as HostnameEndpoint does;
    when every address refuses, the host is `can't connect` once."""
    agent = FakeAgent(answer(OK))
    refused = int(refused_address().rpartition(":")[2])
    stream = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
    table = {
        "two.test": [
            (socket.AF_INET, *stream, ("127.0.0.1", refused)),
            (socket.AF_INET, *stream, ("127.0.0.1", agent.port)),
        ],
        "none.test": [(socket.AF_INET, *stream, ("127.0.0.1", refused))] * 2,
    }
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: table[host])
    try:
        fan = await plain(
            [f"two.test:{agent.port}", f"none.test:{refused}"],
            Order("status", "web"),
            ClientOptions(thread_timeout=5, socket_timeout=2),
        )
    finally:
        await agent.stop()
    assert fan.results[f"two.test:{agent.port}"].succeeded
    assert len(agent.requests) == 1
    assert fan.results[f"none.test:{refused}"].content == f"can't connect to none.test:{refused}"


@pytest_twisted.ensureDeferred
async def test_unresolvable_name_is_cant_connect() -> None:
    """A name that does not resolve is that host's `can't connect`, as with the Twisted client."""
    fan = await plain(["no-such-host.invalid:1"], Order("status", "web"), ClientOptions())
    result: HostResult = fan.results["no-such-host.invalid:1"]
    assert result.content == "can't connect to no-such-host.invalid:1"
    assert result.unreachable


@pytest_twisted.ensureDeferred
async def test_max_parallel_bounds_the_open_exchanges() -> None:
    """With max_parallel 2, never more than 2 hosts hold an open exchange, and every host
    answers."""
    state = {"open": 0, "most": 0}

    def slow_answer(proto: ScriptedAgent) -> None:
        state["open"] += 1
        state["most"] = max(state["most"], state["open"])

        def reply() -> None:
            state["open"] -= 1
            proto.transport.write(OK)
            proto.transport.loseConnection()

        reactor.callLater(0.05, reply)

    agents = [FakeAgent(slow_answer) for _ in range(6)]
    try:
        fan = await plain(
            [a.address for a in agents], Order("status", "web"), ClientOptions(max_parallel=2)
        )
    finally:
        for a in agents:
            await a.stop()
    assert all(r.succeeded for r in fan.results.values())
    assert state["most"] == 2


WRAPPER = """
import sys
from deploy.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    loaded = [m for m, module in sys.modules.items() if module is not None
              and (m.split(".")[0] in ("twisted", "OpenSSL", "cryptography"))]
    sys.stderr.write("\\nTWISTED-LOADED=%s\\n" % sorted(loaded)[:3])
sys.exit(rc)
"""


@pytest.mark.parametrize(("extra", "loads_twisted"), [((), False), (("--debug",), True)])
@pytest_twisted.ensureDeferred
async def test_plain_tcp_client_does_not_import_twisted(
    extra: tuple[str, ...], loads_twisted: bool
) -> None:
    """`deploy-client` over plain TCP never imports Twisted (nor OpenSSL); with --debug, which
    needs Twisted's logging, it does (the check can see an import)."""
    agent = FakeAgent(answer(OK))
    try:
        out, err, rc = await getProcessOutputAndValue(
            sys.executable,
            ("-c", WRAPPER, "--order=status", "--options=web", f"--hosts={agent.address}", *extra),
            env=dict(os.environ),
            reactor=reactor,
        )
    finally:
        await agent.stop()
    assert rc == 0, err
    assert json.loads(out)[agent.address]["status"]["content"]["return"] == "true"
    loaded = err.decode().rpartition("TWISTED-LOADED=")[2].strip()
    assert (loaded != "[]") is loads_twisted, loaded


# ------------------------------------------------------------------------ names (issue 15, 13)


def stream_addresses(port: int) -> list[tuple[Any, ...]]:
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]


@pytest_twisted.ensureDeferred
async def test_a_slow_name_stalls_only_its_own_host() -> None:
    """Names resolve beside the loop: a lookup that takes 3 s leaves the other host's answer
    untouched and costs only its own host its deadline; a literal address is never looked up."""
    agent = FakeAgent(answer(OK))
    looked_up: list[str] = []

    def resolver(host: str, port: int) -> list[tuple[Any, ...]]:
        looked_up.append(host)
        time.sleep(3)
        return stream_addresses(agent.port)

    options = ClientOptions(thread_timeout=1, socket_timeout=1)
    started = time.monotonic()
    try:
        fan = await threads.deferToThread(
            fan_out_plain,
            [agent.address, f"slow.test:{agent.port}"],
            lambda _h: Order("status", "web"),
            options,
            resolver=resolver,
        )
    finally:
        await agent.stop()
    took = time.monotonic() - started
    assert fan.results[agent.address].succeeded
    assert fan.results[f"slow.test:{agent.port}"].content == "Process Timeout(1)!"
    assert looked_up == ["slow.test"]
    assert took < 2.5, took


SLOW_RESOLVER = """
import socket, time
_getaddrinfo = socket.getaddrinfo

def getaddrinfo(host, *args, **kwargs):
    if host == "slow.invalid" and not kwargs.get("flags", 0) & socket.AI_NUMERICHOST:
        time.sleep(5)
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)

socket.getaddrinfo = getaddrinfo
"""


def test_the_real_client_keeps_other_hosts_deadlines_while_a_name_is_slow(site, tmp_path):
    """Issue 15 item 13, end to end: with a name whose lookup takes 5 s (the machine's resolver
    slowed down in the real deploy-client), the real agent ordered before it still answers ok
    within a 2 s deadline, and the slow host alone times out, at 2 s."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_RESOLVER)
    env = {k: v for k, v in os.environ.items() if k not in ("DEPLOY_KEY_CIPHER", "DEPLOY_API_KEY")}
    env["PYTHONPATH"] = str(tmp_path)
    env["HOME"] = str(tmp_path)
    slow = f"slow.invalid:{site.agent.port}"
    started = time.monotonic()
    run = run_client(
        f"--hosts={site.agent.address},{slow}",
        "--order=status",
        "--options=web",
        "--thread-timeout=2",
        "--format=ndjson",
        env=env,
    )
    took = time.monotonic() - started
    first, second, summary = (json.loads(line) for line in run.stdout.splitlines())
    assert (first["host"], first["outcome"]) == (site.agent.address, "ok"), run.stdout
    assert (second["host"], second["outcome"]) == (slow, "timeout")
    assert second["content"] == "Process Timeout(2)!"
    assert summary["summary"]["exitCode"] == 3 and run.rc == 3
    assert took < 4.5, took  # not the 5 s lookup
