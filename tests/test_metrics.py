"""Prometheus metrics and /healthz: what the observers count (orders by code, auth failures by
reason, syncs by group, the proxy's per-agent results), the exposition, and a real Prometheus
server scraping a real agent and proxy (Debian's `prometheus` and `promtool`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from deploy import __version__
from deploy.auth import AuthError, RequestAuthenticator, legacy_auth_key, sign_request
from deploy.config import RsyncGroup
from deploy.jobstate import write_state
from deploy.metrics import (
    AgentMetrics,
    DaemonMetrics,
    ProxyMetrics,
    auth_failure_reason,
    host_result,
    live_releases,
)
from deploy.metrics_web import HealthResource, listening_check, writable_check
from deploy.rsync import RsyncTarget
from deploy.wire import Request, Response
from tests.conftest import JOBS
from tests.harness import ChildProcess, free_port, make_tree, run_client, wait_until

REPO = Path(__file__).parent.parent


def sample(metrics: DaemonMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@dataclass
class FakeProto:
    request: Request | None
    opened_at: float = field(default_factory=time.monotonic)


def proto(path: str) -> FakeProto:
    return FakeProto(Request("POST", path))


# --------------------------------------------------------------------------- the observers


def test_orders_are_counted_by_order_and_code_and_timed():
    """Each answer counts once under its order and status; a path naming no order counts as
    `other` (a client cannot add series); the duration histogram sees each answer."""
    m = DaemonMetrics()
    m.response_sent(proto("/agent/status"), Response(200))
    m.response_sent(proto("/agent/status"), Response(200))
    m.response_sent(proto("/agent/exec"), Response(400))
    m.response_sent(proto("/agent/whatever-a-client-sends"), Response(404))
    m.response_sent(FakeProto(None), Response(403))
    assert sample(m, "deploy_orders_total", order="status", code="200") == 2
    assert sample(m, "deploy_orders_total", order="exec", code="400") == 1
    assert sample(m, "deploy_orders_total", order="other", code="404") == 1
    assert sample(m, "deploy_orders_total", order="other", code="403") == 1
    assert sample(m, "deploy_order_duration_seconds_count", order="status") == 2
    build = {"version": __version__}
    assert any(
        s.labels.items() >= build.items() and s.value == 1
        for f in m.registry.collect()
        if f.name == "deploy_build_info"
        for s in f.samples
    )


def test_every_authentication_refusal_has_a_reason_label():
    """Each way RequestAuthenticator refuses a request maps to a reason of its own, not
    `other`: the table follows auth.py's messages."""
    clock = Clock()
    clock.advance(1_000_000)
    auth = RequestAuthenticator("key", clock=clock, legacy=False, legacy_refusal="legacy refused")
    legacy = RequestAuthenticator("key", clock=clock, legacy=True)

    def refusal(authenticator: RequestAuthenticator, headers: dict, fields: dict) -> str:
        request = Request("POST", "/agent/status", headers=headers)
        try:
            authenticator.authenticate(request, fields)
        except AuthError as e:
            return str(e)
        raise AssertionError("accepted")

    signed = sign_request("key", "POST", "/agent/status", b"", now=clock.seconds(), nonce="a" * 32)
    auth.authenticate(Request("POST", "/agent/status", headers={"authorization": signed}), {})
    cases = {
        "missing": (auth, {}, {}),
        "malformed": (auth, {"authorization": "Deploy-HMAC-SHA256 nonsense"}, {}),
        "time": (
            auth,
            {"authorization": sign_request("key", "POST", "/agent/status", b"", now=5)},
            {},
        ),
        "signature": (
            auth,
            {"authorization": sign_request("nope", "POST", "/agent/status", b"", now=1e6)},
            {},
        ),
        "replay": (auth, {"authorization": signed}, {}),
        "legacy": (legacy, {}, {"auth_key": legacy_auth_key("nope", clock.seconds())}),
    }
    for reason, (authenticator, headers, fields) in cases.items():
        message = refusal(authenticator, headers, fields)
        assert auth_failure_reason(message) == reason, message
    m = DaemonMetrics()
    m.response_sent(proto("/agent/status"), Response.text(401, "bad signature"))
    assert sample(m, "deploy_auth_failures_total", reason="signature") == 1


def test_proxy_counts_each_agents_result():
    """The proxy's answer is read host by host: ok, failed (return false), error (not 200),
    unreachable, timed out; the proxy's own order is counted under deploy_proxy_orders_total."""
    answer = {
        "a": {"exec": {"serverStatus": 1, "returnCode": 200, "content": {"return": "true"}}},
        "b": {"exec": {"serverStatus": 1, "returnCode": 200, "content": {"return": "false"}}},
        "c": {"exec": {"serverStatus": 1, "returnCode": 403, "content": "no"}},
        "d": {"exec": {"serverStatus": 0, "returnCode": 0, "content": "can't connect to d:1"}},
        "e": {"exec": {"serverStatus": 0, "returnCode": 0, "content": "Process Timeout(10)!"}},
    }
    m = ProxyMetrics()
    m.response_sent(proto("/api/exec"), Response(200, json.dumps(answer).encode()))
    for result in ("ok", "failed", "error", "unreachable", "timeout"):
        assert sample(m, "deploy_proxy_host_results_total", order="exec", result=result) == 1
    assert sample(m, "deploy_proxy_orders_total", order="exec", code="200") == 1
    assert host_result({"skipped": True}) == "skipped"


def test_sync_ends_are_counted_by_group_and_the_last_one_kept(tmp_path):
    """A sync's end: its duration, bytes and end time under its group; only the last outcome
    of a group is a series (an alert on `failed` clears after a good sync); the last end is
    read back from the state records when the agent starts."""
    group = RsyncGroup("web", "h::M/", str(tmp_path / "web"), line=1)
    checksum = RsyncTarget(dest=group.dest, src=group.src).checksum
    write_state(
        str(tmp_path / f"{checksum}.json"),
        {"state": "ended", "outcome": "failed", "ended": 1000.0, "checksum": checksum},
    )
    jobs = SimpleNamespace(
        running_count=lambda: 3,
        ended_observers=[],
        state_file=lambda c, d=None: str(tmp_path / f"{c}.json"),
    )
    agent = SimpleNamespace(jobs=jobs, config=SimpleNamespace(groups={"web": group}))
    factory = SimpleNamespace(observers=[])
    m = AgentMetrics()
    m.watch_agent(agent, factory)
    assert factory.observers and jobs.ended_observers
    assert sample(m, "deploy_syncs_running") == 3
    assert sample(m, "deploy_last_sync_timestamp_seconds", group="web", outcome="failed") == 1000
    state = {"started": 1100.0, "ended": 1130.0, "outcome": "ok", "transferFilesSize": "2,048"}
    jobs.ended_observers[0](SimpleNamespace(checksum=checksum, state=state))
    jobs.ended_observers[0](SimpleNamespace(checksum="0" * 32, state=state))  # inline target
    assert sample(m, "deploy_sync_duration_seconds_count", group="web") == 1
    assert sample(m, "deploy_sync_duration_seconds_sum", group="web") == 30
    assert sample(m, "deploy_sync_bytes_total", group="web") == 2048
    assert sample(m, "deploy_sync_bytes_total", group="") == 2048
    assert sample(m, "deploy_last_sync_timestamp_seconds", group="web", outcome="ok") == 1130
    assert sample(m, "deploy_last_sync_timestamp_seconds", group="web", outcome="failed") is None


def test_release_info_names_the_live_release() -> None:
    """Each release-mode group's live release (and label), as its history records it, is
    deploy_release_info 1; an in-place group, a group with no live release yet and a group
    whose history cannot be read have none."""
    groups = {
        "web": SimpleNamespace(releases=3),
        "api": SimpleNamespace(releases=None),
        "new": SimpleNamespace(releases=2),
        "bad": SimpleNamespace(releases=2),
    }
    live = {"web": {"id": "20260101T000000Z-ab12", "label": "v1.2"}, "new": None}

    def live_release(target: str, group: object) -> object:
        if target == "bad":
            raise OSError("permission denied")
        return live[target]

    agent = SimpleNamespace(
        config=SimpleNamespace(groups=groups),
        targets=SimpleNamespace(resolve=lambda name: (name, groups[name])),
        release_orders=SimpleNamespace(live_release=live_release),
    )
    assert live_releases(agent) == [("web", "20260101T000000Z-ab12", "v1.2")]
    m = AgentMetrics()
    m.live_releases = lambda: live_releases(agent)
    labels = {"group": "web", "release": "20260101T000000Z-ab12", "label": "v1.2"}
    assert sample(m, "deploy_release_info", **labels) == 1
    assert sample(m, "deploy_release_info", group="api") is None


def test_healthz_says_ok_or_the_first_problem(tmp_path):
    """200 `ok` while the port listens and the state directory takes a record; 503 with the
    reason when it cannot (here: a file where the directory should be) or nothing listens."""
    listening = [True]
    state = tmp_path / "state"
    state.mkdir()  # made (and judged) by the agent's start-up
    health = HealthResource(
        [listening_check(lambda: listening[0], "127.0.0.1:3440"), writable_check(str(state))]
    )

    def get() -> tuple[int, str]:
        request = DummyRequest([b""])
        body = health.render_GET(request)
        return request.responseCode or 200, body.decode()

    assert get() == (200, "ok\n")
    state.rmdir()
    state.write_text("not a directory")
    code, text = get()
    assert code == 503 and f"{state} is not a writable directory" in text
    listening[0] = False
    assert get() == (503, "not listening on 127.0.0.1:3440\n")


# --------------------------------------------------------------------------- real daemons


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def promql(base: str, query: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        status, text = http_get(url, timeout=2)
    except OSError:
        return []
    if status != 200:
        return []
    result: list[dict[str, Any]] = json.loads(text)["data"]["result"]
    return result


def promtool_check(text: str, name: str) -> None:
    """`promtool check metrics` finds no problem in an exposition."""
    done = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and not done.stdout.strip(), (name, done.stdout, done.stderr)


@pytest.mark.skipif(not shutil.which("prometheus"), reason="needs Debian's prometheus package")
def test_a_real_prometheus_scrapes_a_real_agent_and_proxy(daemons, tmp_path):
    """Prometheus (scraping every second) sees both daemons up and deploy_orders_total rising
    after orders through the proxy; promtool finds no problem in either exposition; the
    agent's exposition shows the sync it ran; /healthz answers ok."""
    tree = make_tree(tmp_path / "tree", files=5, size=1000)
    rsyncd = daemons.rsyncd({"DEST": tree})
    targets = tmp_path / "targets"
    targets.mkdir()
    jobs = tmp_path / "jobs.ini"
    jobs.write_text(JOBS)
    aport, amport, pport, pmport = (free_port() for _ in range(4))
    agent = daemons.agent(
        port=aport,
        groups={"web": rsyncd.group(targets / "web", "--archive")},
        jobs=jobs,
        allow_paths=[targets],
        server={"metrics_addr": "127.0.0.1", "metrics_port": amport},
    )
    api = tmp_path / "api.ini"
    api.write_text("[keys]\nk1[] = g\n[servers]\ng[] = 127.0.0.1\n")
    daemons.proxy(
        f"[server]\naddr = 127.0.0.1\nport = {pport}\nmetrics_port = {pmport}\n"
        f"[client]\nport = {aport}\n[allow::hosts]\nhost[] = 127.0.0.0/8\n[api]\npath = {api}\n",
        "127.0.0.1",
        pport,
    )
    web = free_port()
    base = f"http://127.0.0.1:{web}"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: deploy-agent\n    static_configs: [{{targets: ['127.0.0.1:{amport}']}}]\n"
        f"  - job_name: deploy-proxy\n    static_configs: [{{targets: ['127.0.0.1:{pmport}']}}]\n"
    )
    prometheus = ChildProcess(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
            "--log.level=warn",
        ],
        tmp_path / "prometheus.log",
        cwd=tmp_path,
        name="prometheus",
    )
    daemons.started.append(prometheus)
    prometheus.wait_listening("127.0.0.1", web, timeout=30)

    def both_up() -> bool:
        up = {r["metric"]["job"]: r["value"][1] for r in promql(base, "up")}
        return up == {"deploy-agent": "1", "deploy-proxy": "1"}

    wait_until(both_up, 30, 0.2, "Prometheus to see both daemons up")

    def orders_seen() -> float:
        result = promql(base, 'sum(deploy_orders_total{order="exec"})')
        return float(result[0]["value"][1]) if result else 0.0

    before = orders_seen()
    for _ in range(3):
        r = run_client(
            f"--hosts=127.0.0.1:{pport}",
            "--api-key=k1",
            "--args=groups:g",
            "--order=exec",
            "--options=service:echo,hi",
        )
        assert r.rc == 0, r.stdout + r.stderr
    wait_until(lambda: orders_seen() >= before + 3, 30, 0.2, "deploy_orders_total to rise")
    wait_until(
        lambda: promql(base, 'deploy_proxy_host_results_total{order="exec",result="ok"} >= 3'),
        30,
        0.2,
        "the proxy's per-agent results",
    )
    r = run_client(f"--hosts={agent.address}", "--order=rsync", "--options=web", "--wait")
    assert r.rc == 0, r.stdout + r.stderr
    wait_until(
        lambda: (
            'deploy_last_sync_timestamp_seconds{group="web",outcome="ok"}'
            in http_get(f"http://127.0.0.1:{amport}/metrics")[1]
        ),
        20,
        what="the sync's end in the agent's metrics",
    )
    _, agent_text = http_get(f"http://127.0.0.1:{amport}/metrics")
    _, proxy_text = http_get(f"http://127.0.0.1:{pmport}/metrics")
    assert 'deploy_sync_bytes_total{group="web"} 5000.0' in agent_text
    assert "process_resident_memory_bytes" in agent_text and "deploy_syncs_running" in agent_text
    assert 'deploy_proxy_orders_total{code="200",order="exec"} 3.0' in proxy_text
    promtool_check(agent_text, "agent")
    promtool_check(proxy_text, "proxy")
    assert http_get(f"http://127.0.0.1:{amport}/healthz") == (200, "ok\n")
    assert http_get(f"http://127.0.0.1:{pmport}/healthz") == (200, "ok\n")
    prometheus.stop()


@pytest.mark.skipif(not shutil.which("promtool"), reason="needs Debian's prometheus package")
def test_the_shipped_alert_rules_fire_as_documented(tmp_path):
    """etc/prometheus/deploy-alerts.yml passes `promtool check rules`, and `promtool test
    rules` shows its alerts firing for an agent that is down and a group whose last sync
    failed, and not for a healthy one."""
    rules = REPO / "etc" / "prometheus" / "deploy-alerts.yml"
    done = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tests = REPO / "tests" / "data" / "prometheus" / "deploy-alerts.test.yml"
    copy = tmp_path / "deploy-alerts.test.yml"
    copy.write_text(tests.read_text().replace("RULES", str(rules)))
    done = subprocess.run(
        ["promtool", "test", "rules", str(copy)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_exposition_of_a_fresh_registry_passes_promtool():
    """Names follow Prometheus conventions: promtool check metrics finds nothing to say about
    either daemon's metrics, counted once each."""
    if not shutil.which("promtool"):
        pytest.skip("needs Debian's prometheus package")
    agent, proxy = AgentMetrics(), ProxyMetrics()
    for m in (agent, proxy):
        m.response_sent(proto("/agent/status"), Response.text(401, "bad signature"))
    promtool_check(generate_latest(agent.registry).decode(), "agent")
    promtool_check(generate_latest(proxy.registry).decode(), "proxy")


def test_open_connections_are_counted_until_they_close():
    """deploy_connections_open follows connections through the wrapped factory."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    m = DaemonMetrics()
    factory = m.counting(Factory.forProtocol(Protocol))
    assert sample(m, "deploy_connections_open") == 0
    protos = [factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)) for _ in range(2)]
    for p in protos:
        p.makeConnection(StringTransport())
    assert sample(m, "deploy_connections_open") == 2
    protos[0].connectionLost(Failure(ConnectionError()))
    assert sample(m, "deploy_connections_open") == 1


def test_proxy_rollouts_are_counted_by_how_they_ended() -> None:
    """deploy_proxy_rollouts_total{outcome}: each ended rollout by outcome (stopped, failed, ok),
    and those a previous proxy left, as interrupted."""
    from types import SimpleNamespace

    from deploy.metrics import ProxyMetrics
    from deploy.proxy_rollouts import rollout_outcome

    rollouts = SimpleNamespace(interrupted=2, ended_observers=[])
    m = ProxyMetrics()
    m.watch_rollouts(rollouts)
    for record in ({"stopped": True, "failures": 3}, {"failures": 1}, {"failures": 0}, {}):
        for observer in rollouts.ended_observers:
            observer(rollout_outcome(record))
    assert sample(m, "deploy_proxy_rollouts_total", outcome="interrupted") == 2
    assert sample(m, "deploy_proxy_rollouts_total", outcome="stopped") == 1
    assert sample(m, "deploy_proxy_rollouts_total", outcome="failed") == 1
    assert sample(m, "deploy_proxy_rollouts_total", outcome="ok") == 2
