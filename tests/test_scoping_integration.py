"""Scoped and rotatable access end to end: real `twistd deploy-agent`s and a `deploy-proxy` on
127.0.0.2-6 with named keys, per-key policies and `server_names`, ordered by the real
`deploy-client`: a CI key limited to status, a deploy key limited to a group, a job glob, a
signature replayed to another agent, hashed API keys, and a key rotation and a TLS key rotation
that lose no request."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.keyring import api_key_hash
from deploy.orders import ClientOptions, Order, build_request
from deploy.tls_keys import spki_der
from tests.conftest import Daemons
from tests.harness import (
    ClientRun,
    agent_ini,
    parsed_answer,
    raw_request,
    run_client,
    shared_free_port,
    wait_until,
)

A, B = "127.0.0.2", "127.0.0.3"  # B has server_names = its own address
KEYS = {"old": "k-old-0123456789", "ci": "k-ci-0123456789", "dep": "k-dep-0123456789"}
KEYS["ops"] = "k-ops-0123456789"
POLICIES = """
[policy::ci]
orders[] = status
groups[] = *

[policy::dep]
orders[] = status, rsync
groups[] = web

[policy::ops]
orders[] = exec
jobs[] = service:nginx*
"""
JOBS = "[service]\nservice:nginx = /bin/echo %s\nservice:mysql = /bin/echo %s\n"
API_KEY = "the-proxy-api-key"
TIMEOUTS = ("--thread-timeout=20", "--socket-timeout=5")


def keys_section(keys: dict[str, str]) -> str:
    return "\n[keys]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


@dataclass
class Fleet:
    daemons: Daemons
    workdir: Path
    port: int
    proxy_port: int


def scoped_agent(
    daemons: Daemons,
    host: str,
    port: int,
    keys: dict[str, str],
    *,
    extra: str = "",
    server: dict[str, object] | None = None,
    name: str = "",
) -> object:
    work = daemons.workdir
    (work / "jobs.ini").write_text(JOBS)
    state = work / f"state-{host}{name}"
    targets = work / "targets"
    targets.mkdir(exist_ok=True)
    groups = {g: {"dest": "127.0.0.1::NONE/", "src": targets / g} for g in ("web", "api")}
    text = agent_ini(
        host=host,
        port=port,
        state=state,
        allow_paths=[targets],
        groups=groups,
        jobs=work / "jobs.ini",
        server={"socket_timeout": 5, **(server or {})},
    )
    daemons.state_dirs.append(state)
    return daemons.agent_from_text(text + keys_section(keys) + extra, host, port)


@pytest.fixture(scope="module")
def fleet(module_daemons: Daemons) -> Iterator[Fleet]:
    """Agents A and B (B checks server_names) with the scoped keys, and a proxy in front."""
    work = module_daemons.workdir
    port = shared_free_port([A, B])
    audit = {"audit_log_path": work / "audit-a.log"}
    scoped_agent(module_daemons, A, port, KEYS, extra=POLICIES, server=audit)
    scoped_agent(module_daemons, B, port, KEYS, extra=POLICIES, server={"server_names[]": B})
    api = work / "api.ini"
    api.write_text(
        f"[keys]\n{api_key_hash(API_KEY)} = web,api\nplain-key = web\n"
        f"[servers]\nweb[] = {A}\nweb[] = {B}\napi[] = {B}\n"
        f"[policy::deploy]\nkey = {api_key_hash(API_KEY)}\norders[] = status\ngroups[] = web\n"
    )
    proxy_port = shared_free_port(["127.0.0.1"])
    proxy = f"""\
[server]
addr = 127.0.0.1
port = {proxy_port}
[client]
port = {port}
key_cipher = {KEYS["old"]}
key_id = old
thread_timeout = 20
[allow::hosts]
host[] = 127.0.0.0/8
[api]
path = {api}
"""
    module_daemons.proxy(proxy, "127.0.0.1", proxy_port)
    yield Fleet(module_daemons, work, port, proxy_port)


def order(fleet: Fleet, host: str, key_id: str, *args: str) -> ClientRun:
    return run_client(
        f"--hosts={host}",
        f"--port={fleet.port}",
        f"--key-id={key_id}",
        f"--key-cipher={KEYS[key_id]}",
        *TIMEOUTS,
        *args,
    )


def answer(run: ClientRun, host: str, order_name: str) -> tuple[int, object]:
    entry = run.json[host][order_name]
    return int(entry["returnCode"] or 0), entry["content"]


def test_ci_key_limited_to_status(fleet: Fleet) -> None:
    """A CI key limited to status gets status, and 403 naming the order on rsync and exec."""
    run = order(fleet, A, "ci", "--order=status", "--options=web")
    assert answer(run, A, "status")[0] == 200, run
    for name, options in (("rsync", "web"), ("exec", "service:nginx,reload")):
        run = order(fleet, A, "ci", f"--order={name}", f"--options={options}")
        code, content = answer(run, A, name)
        assert code == 403 and f"order {name} is not allowed for key ci" in str(content), run


def test_group_limited_key_cannot_touch_another_group(fleet: Fleet) -> None:
    """A deploy key limited to group web gets web's status and 403 on api, on the agent."""
    assert answer(order(fleet, A, "dep", "--order=status", "--options=web"), A, "status")[0] == 200
    run = order(fleet, A, "dep", "--order=rsync", "--options=api")
    code, content = answer(run, A, "rsync")
    assert code == 403 and "group api is not allowed for key dep" in str(content), run


def test_job_glob(fleet: Fleet) -> None:
    """jobs[] = service:nginx* admits service:nginx,reload but not service:mysql,stop."""
    run = order(fleet, A, "ops", "--order=exec", "--options=service:nginx,reload")
    code, content = answer(run, A, "exec")
    assert code == 200 and base64.b64decode(content["content"]) == b"reload\n", run
    run = order(fleet, A, "ops", "--order=exec", "--options=service:mysql,stop")
    code, content = answer(run, A, "exec")
    assert code == 403 and "job service:mysql is not allowed for key ops" in str(content), run


def test_audit_log_records_key_id_and_decision(fleet: Fleet) -> None:
    """The agent's audit record carries the key id and allow/deny."""
    order(fleet, A, "ci", "--order=rsync", "--options=web")
    log = fleet.workdir / "audit-a.log"

    def denied() -> list[dict[str, object]]:
        if not log.exists():
            return []
        records = [json.loads(line) for line in log.read_text().splitlines() if line]
        return [r for r in records if r.get("keyId") == "ci" and r.get("decision") == "deny"]

    record = wait_until(denied, 20, what="an audit record of the refusal")[-1]
    assert record["order"] == "rsync" and record["status"] == 403


def test_signature_replayed_to_another_agent_is_401(fleet: Fleet) -> None:
    """A request signed for A is 200 at A and 401 'signed for another host' at B."""
    options = ClientOptions(port=fleet.port, key_cipher=KEYS["old"], key_id="old")
    request = build_request(Order("status", "web"), options, A, time.time(), fleet.port)
    assert parsed_answer(raw_request(A, fleet.port, request))[0] == 200
    status, text = parsed_answer(raw_request(B, fleet.port, request))
    assert status == 401 and "signed for another host" in str(text)
    # B takes what is signed for it, bound or through the client.
    assert answer(order(fleet, B, "old", "--order=status", "--options=web"), B, "status")[0] == 200


def test_unbound_signature_refused_by_server_names(fleet: Fleet) -> None:
    """An agent with server_names refuses the old unbound form (401)."""
    options = ClientOptions(port=fleet.port, key_cipher=KEYS["old"])
    request = build_request(Order("status", "web"), options, B, time.time(), fleet.port)
    # The named but unbound form (kid= is not in the signed string).
    request = request.replace(b"Deploy-HMAC-SHA256 ", b"Deploy-HMAC-SHA256 kid=old, ")
    status, text = parsed_answer(raw_request(B, fleet.port, request))
    assert status == 401 and "not bound to a host" in str(text)
    assert (
        parsed_answer(
            raw_request(A, fleet.port, request.replace(b"Host: 127.0.0.3", b"Host: 127.0.0.2"))
        )[0]
        == 200
    )


def proxy_order(fleet: Fleet, api_key: str, *args: str) -> ClientRun:
    return run_client(
        "--hosts=127.0.0.1", f"--port={fleet.proxy_port}", f"--api-key={api_key}", *TIMEOUTS, *args
    )


def test_hashed_api_key_through_the_proxy(fleet: Fleet) -> None:
    """A key stored as sha256: works; the proxy signs each agent request for that agent (B
    checks server_names); its policy refuses group api and order rsync; a wrong key is 403."""
    run = proxy_order(fleet, API_KEY, "--order=status", "--options=web", "--args=groups:web")
    content = run.json["127.0.0.1"]["status"]["content"]
    assert {A, B} <= set(content), run
    for host in (A, B):
        assert content[host]["status"]["returnCode"] == 200, run
    refused = proxy_order(fleet, API_KEY, "--order=status", "--options=web", "--args=groups:api")
    entry = refused.json["127.0.0.1"]["status"]
    assert entry["returnCode"] == "403" and "[api]" in entry["content"], refused
    refused = proxy_order(fleet, API_KEY, "--order=rsync", "--options=web", "--args=groups:web")
    entry = refused.json["127.0.0.1"]["rsync"]
    assert entry["returnCode"] == "403" and "order rsync" in entry["content"], refused
    wrong = proxy_order(
        fleet, "not-the-key", "--order=status", "--options=web", "--args=groups:web"
    )
    assert wrong.json["127.0.0.1"]["status"]["returnCode"] == "403", wrong


def test_key_rotation_across_agents_loses_no_request(daemons: Daemons) -> None:
    """Add the new key everywhere, switch the client, remove the old one: every request of the
    rotation succeeds, and the old key is refused at the end."""
    hosts = ["127.0.0.4", "127.0.0.5"]
    port = shared_free_port(hosts)
    old, new = {"v1": "rotate-old-secret"}, {"v2": "rotate-new-secret"}
    agents = {h: scoped_agent(daemons, h, port, old, name="rot") for h in hosts}
    client = "v1"
    failures: list[ClientRun] = []

    def ask_all(key_id: str) -> ClientRun:
        secret = {**old, **new}[key_id]
        return run_client(
            f"--hosts={','.join(hosts)}",
            f"--port={port}",
            f"--key-id={key_id}",
            f"--key-cipher={secret}",
            "--order=exec",
            "--options=service:nginx,ok",
            *TIMEOUTS,
        )

    def check() -> None:
        run = ask_all(client)
        if run.rc != 0:
            failures.append(run)

    def restart(keys: dict[str, str]) -> None:
        for host in hosts:  # one agent at a time, the other one serving
            agents[host].stop()  # type: ignore[attr-defined]
            agents[host] = scoped_agent(daemons, host, port, keys, name="rot")
            check()

    check()
    restart({**old, **new})  # 1. the new key everywhere
    client = "v2"  # 2. switch the client
    check()
    restart(new)  # 3. the old key removed
    assert failures == []
    gone = ask_all("v1")
    assert gone.rc != 0 and "unknown key id v1" in gone.stdout


def _private_pem(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return key


def test_tls_key_rotation_with_a_backup_pin_loses_no_request(daemons: Daemons) -> None:
    """A client pinning the current key and a backup (a sha256// line) keeps working when the
    agent moves to the backup key; a client with only the old pin is refused."""
    work = daemons.workdir
    host = "127.0.0.6"
    port = shared_free_port([host])
    current, backup = _private_pem(work / "current.pem"), _private_pem(work / "backup.pem")
    current_pub = current.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    backup_pin = base64.b64encode(hashlib.sha256(spki_der(backup.public_key())).digest())
    pins = work / "pins.pem"
    pins.write_bytes(current_pub + b"sha256//" + backup_pin + b"\n")
    only_current = work / "current.pub"
    only_current.write_bytes(current_pub)

    def status(pin: Path) -> ClientRun:
        return run_client(
            f"--hosts={host}",
            f"--port={port}",
            f"--ssl-public-key={pin}",
            "--key-cipher=tls-secret",
            "--order=exec",
            "--options=service:nginx,ok",
            *TIMEOUTS,
        )

    tls = {"ssl": "true", "key_cipher": "tls-secret"}
    agent = scoped_agent(
        daemons, host, port, {}, server={**tls, "ssl_private_key": work / "current.pem"}
    )
    first = status(pins)
    assert first.rc == 0, first
    agent.stop()  # type: ignore[attr-defined]
    scoped_agent(
        daemons, host, port, {}, server={**tls, "ssl_private_key": work / "backup.pem"}, name="b"
    )
    after = status(pins)
    assert after.rc == 0, after
    refused = status(only_current)
    assert refused.rc != 0 and "does not match pinned public key" in refused.stdout, refused
