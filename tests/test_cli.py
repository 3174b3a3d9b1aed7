"""Tests of `deploy-client` as a user runs it: the real command against scripted fake agents on
loopback; its JSON output (the original's shape) and its exit codes."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from deploy.auth import check_legacy_auth_key
from deploy.cli import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from deploy.wire import decode_form
from tests.harness import ClientRun, tool
from tests.test_client import (
    FakeAgent,
    Script,
    answer,
    hang,
    json_response,
    refused_address,
    response,
    split_request,
)

OK = json_response({"return": "true", "alreadyRsync": "false", "transferFilesCount": "0"})
FALSE = json_response({"return": "false", "content": "", "message": "rsync failed"})
NOT_FOUND = response(400, b"exec[x] not found!", "text/plain; charset=utf-8")


@dataclass
class Run(ClientRun):
    elapsed: float


class FullBacklog:
    """A listening socket whose accept queue is full, so SYNs to it are dropped: a connect
    neither succeeds nor is refused, like a host that is down (on loopback)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        self.port = self.server.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(s)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", self.port))
        except TimeoutError:
            pass
        else:
            raise AssertionError("the accept queue did not fill: cannot fake a host that is down")
        finally:
            probe.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.server.close()


async def client(*args: str) -> Run:
    """Run the real deploy-client without blocking the reactor the fake agents run in."""
    started = time.monotonic()
    out, err, rc = await getProcessOutputAndValue(
        tool("deploy-client"), args, env=dict(os.environ), reactor=reactor
    )
    return Run(rc, out.decode(), err.decode(), time.monotonic() - started)


async def with_agents(*scripts: Script) -> list[FakeAgent]:
    return [FakeAgent(s) for s in scripts]


async def stop(agents: list[FakeAgent]) -> None:
    for agent in agents:
        await agent.stop()


@pytest_twisted.ensureDeferred
async def test_every_host_ok_exits_0_with_the_original_shape() -> None:
    """Every host answered 200 with return "true": exit 0, JSON host → order → answer."""
    agents = await with_agents(answer(OK), answer(OK))
    try:
        run = await client(
            "--order=status", "--options=web", "--hosts=" + ",".join(a.address for a in agents)
        )
    finally:
        await stop(agents)
    assert run.rc == EXIT_OK, run.stderr
    out = run.json
    assert list(out) == [a.address for a in agents]
    for agent in agents:
        assert out[agent.address] == {
            "status": {
                "return": 1,
                "serverStatus": 1,
                "returnCode": "200",
                "returnString": "OK",
                "content": {"return": "true", "alreadyRsync": "false", "transferFilesCount": "0"},
            }
        }
        start, headers, body = split_request(agent.requests[0])
        assert start == "POST /agent/status HTTP/1.1"
        assert headers["authorization"].startswith("Deploy-HMAC-SHA256 ")
        assert decode_form(body)["options"] == "web"


@pytest_twisted.ensureDeferred
async def test_a_host_answering_return_false_exits_2() -> None:
    """One host answered 200 but with return "false": exit 2, the others still reported."""
    agents = await with_agents(answer(OK), answer(FALSE))
    try:
        run = await client(
            "--order=rsync", "--options=web", "--hosts=" + ",".join(a.address for a in agents)
        )
    finally:
        await stop(agents)
    assert run.rc == EXIT_FAILED
    assert run.json[agents[0].address]["rsync"]["content"]["return"] == "true"
    assert run.json[agents[1].address]["rsync"]["content"]["return"] == "false"


@pytest_twisted.ensureDeferred
async def test_a_host_answering_400_exits_2() -> None:
    """A 4xx answer is a failure: exit 2, returnCode "400", content the agent's text."""
    agents = await with_agents(answer(NOT_FOUND))
    try:
        run = await client("--order=exec", "--options=x", f"--hosts={agents[0].address}")
    finally:
        await stop(agents)
    assert run.rc == EXIT_FAILED
    entry = run.json[agents[0].address]["exec"]
    assert entry == {
        "return": 0,
        "serverStatus": 1,
        "returnCode": "400",
        "returnString": "Bad Request",
        "content": "exec[x] not found!",
    }


@pytest_twisted.ensureDeferred
async def test_unreachable_only_exits_3_and_names_the_host() -> None:
    """Nothing listens on the host: exit 3, serverStatus 0, `can't connect to HOST:PORT`."""
    address = refused_address()
    run = await client("--order=status", "--options=web", f"--hosts={address}")
    assert run.rc == EXIT_UNREACHABLE
    entry = run.json[address]["status"]
    assert entry["serverStatus"] == 0 and entry["return"] == 0
    assert entry["content"] == f"can't connect to {address}"


@pytest_twisted.ensureDeferred
async def test_unreachable_host_reported_while_others_answer() -> None:
    """One host down among answering ones: every host is in the output, exit 3."""
    agents = await with_agents(answer(OK), answer(OK))
    down = refused_address()
    hosts = [agents[0].address, down, agents[1].address]
    try:
        run = await client("--order=status", "--options=web", "--hosts=" + ",".join(hosts))
    finally:
        await stop(agents)
    assert run.rc == EXIT_UNREACHABLE
    out = run.json
    assert list(out) == hosts
    assert out[down]["status"]["content"] == f"can't connect to {down}"
    assert out[agents[0].address]["status"]["serverStatus"] == 1
    assert out[agents[1].address]["status"]["content"]["return"] == "true"


@pytest_twisted.ensureDeferred
async def test_failure_wins_over_unreachable() -> None:
    """A failed host and an unreachable one: exit 2 (a failure is the worse news)."""
    agents = await with_agents(answer(FALSE))
    try:
        run = await client(
            "--order=status", "--options=web", f"--hosts={agents[0].address},{refused_address()}"
        )
    finally:
        await stop(agents)
    assert run.rc == EXIT_FAILED


@pytest_twisted.ensureDeferred
async def test_slow_host_is_process_timeout_while_others_answer() -> None:
    """A host silent past --thread-timeout is `Process Timeout(N)!` (exit 3); others answer."""
    agents = await with_agents(hang, answer(OK))
    try:
        run = await client(
            "--order=status",
            "--options=web",
            "--thread-timeout=1",
            "--hosts=" + ",".join(a.address for a in agents),
        )
    finally:
        await stop(agents)
    assert run.rc == EXIT_UNREACHABLE
    assert run.json[agents[0].address]["status"]["content"] == "Process Timeout(1)!"
    assert run.json[agents[0].address]["status"]["serverStatus"] == 0
    assert run.json[agents[1].address]["status"]["content"]["return"] == "true"
    assert run.elapsed < 8


@pytest_twisted.ensureDeferred
async def test_unreachable_within_socket_timeout() -> None:
    """A host that never completes the connection is given up after --socket-timeout."""
    down = FullBacklog()
    try:
        run = await client(
            "--order=status",
            "--options=web",
            "--socket-timeout=0.5",
            "--thread-timeout=30",
            f"--hosts={down.address}",
        )
    finally:
        down.close()
    assert run.rc == EXIT_UNREACHABLE
    assert run.json[down.address]["status"]["content"] == f"can't connect to {down.address}"
    assert run.elapsed < 10


@pytest_twisted.ensureDeferred
async def test_legacy_auth_sends_the_one_time_key() -> None:
    """--legacy-auth sends the original's auth_key (made with --key-cipher), no signature."""
    agents = await with_agents(answer(OK))
    try:
        run = await client(
            "--order=rkill",
            "--options=web",
            "--legacy-auth",
            "--key-cipher=k3y",
            f"--hosts={agents[0].address}",
        )
    finally:
        await stop(agents)
    assert run.rc == EXIT_OK
    _, headers, body = split_request(agents[0].requests[0])
    assert "authorization" not in headers
    check_legacy_auth_key("k3y", decode_form(body)["auth_key"], now=time.time())


@pytest_twisted.ensureDeferred
async def test_options_reach_the_agent_unchanged() -> None:
    """--options with `+`, spaces, commas and non-ASCII reaches the agent as typed."""
    agents = await with_agents(answer(OK))
    options = "service:echo,1+1,a b,caf\u00e9"
    try:
        await client("--order=exec", f"--options={options}", f"--hosts={agents[0].address}")
    finally:
        await stop(agents)
    assert decode_form(split_request(agents[0].requests[0])[2])["options"] == options


@pytest_twisted.ensureDeferred
async def test_output_is_valid_json_for_awkward_content() -> None:
    """Quotes, backslashes, newlines and non-ASCII from an agent are printed as valid JSON."""
    names = ['q"uote', "back\\slash", "new\nline", "caf\u00e9", "bin\\#377name"]
    agents = await with_agents(answer(json_response({"return": "true", "transferNewFiles": names})))
    try:
        run = await client("--order=rlist", "--options=web", f"--hosts={agents[0].address}")
    finally:
        await stop(agents)
    assert run.rc == EXIT_OK
    assert run.json[agents[0].address]["rlist"]["content"]["transferNewFiles"] == names


@pytest.mark.parametrize(
    "args", [("--hosts=127.0.0.1",), ("--order=status",), ("--order=nosuch", "--hosts=h")]
)
@pytest_twisted.ensureDeferred
async def test_usage_errors_exit_1(args: tuple[str, ...]) -> None:
    """A missing --order/--hosts or an unknown order: exit 1 with a message, nothing on stdout."""
    run = await client(*args)
    assert run.rc == EXIT_USAGE
    assert run.stdout == ""
    assert "error" in run.stderr


@pytest_twisted.ensureDeferred
async def test_help_lists_the_original_options() -> None:
    """--help lists every option of the original client."""
    run = await client("--help")
    assert run.rc == 0
    for option in (
        "--order",
        "--hosts",
        "--port",
        "--args",
        "--options",
        "--key-cipher",
        "--api-key",
        "--ssl-public-key",
        "--thread-timeout",
        "--socket-timeout",
        "--debug",
        "--verbose",
    ):
        assert option in run.stdout, option
