"""What monitoring probes and fleet tools ask a daemon: curl and `openssl s_client -alpn`
against a TLS agent (ALPN offered), `--version` of the client and both daemons, and
`agentVersion` in a status answer."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import deploy
from deploy.tls import ALPN_PROTOCOL, select_alpn
from tests.conftest import JOBS
from tests.harness import free_port, run_client, tool


def test_alpn_selects_http11_or_nothing():
    """http/1.1 when offered (among others); no protocol, rather than a failed handshake, when
    the client offers only others."""
    from OpenSSL import SSL

    assert select_alpn(None, [b"h2", b"http/1.1"]) == ALPN_PROTOCOL == b"http/1.1"
    assert select_alpn(None, [b"h2"]) is SSL.NO_OVERLAPPING_PROTOCOLS


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("openssl")), reason="curl, openssl")
def test_curl_and_openssl_with_alpn_get_an_answer_from_a_tls_agent(daemons, tmp_path):
    """curl -k (which offers h2 and http/1.1) gets the agent's 401 answer; `openssl s_client
    -alpn http/1.1` negotiates http/1.1 and `-alpn h2` completes without ALPN: no
    `tlsv1 alert internal error`; the metrics count the three 401s."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "private.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    jobs = tmp_path / "jobs.ini"
    jobs.write_text(JOBS)
    metrics_port = free_port()
    agent = daemons.agent(
        jobs=jobs,
        server={"ssl": "true", "ssl_private_key": pem, "metrics_port": metrics_port},
    )
    url = f"https://{agent.address}/agent/status"
    curl = subprocess.run(
        ["curl", "-sk", "-o", "-", "-w", "\n%{http_code} %{http_version}", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout.splitlines() == ["missing Authorization header", "401 1.1"]
    for offer, negotiated in (("http/1.1", "ALPN protocol: http/1.1"), ("h2", "No ALPN")):
        request = f"GET /agent/status HTTP/1.1\r\nHost: {agent.host}\r\n\r\n"
        done = subprocess.run(
            ["openssl", "s_client", "-ign_eof", "-alpn", offer, "-connect", agent.address],
            input=request,
            capture_output=True,
            text=True,
            timeout=30,
        )
        both = done.stdout + done.stderr
        assert "alert" not in both, both
        assert negotiated in both, both
        assert "HTTP/1.1 401 Unauthorized" in done.stdout, both
    # Counted through TLS too (the connection counter wraps the factory under TLS).
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'deploy_orders_total{code="401",order="status"} 3.0' in text, text
    assert 'deploy_auth_failures_total{reason="missing"} 3.0' in text, text


def test_versions_of_the_client_and_both_daemons():
    """deploy-client --version, twistd deploy-agent --version and twistd deploy-proxy
    --version print deploy's version and Twisted's, and exit 0."""
    import twisted

    for argv, program in (
        ([tool("deploy-client"), "--version"], "deploy-client"),
        ([tool("twistd"), "deploy-agent", "--version"], "twistd deploy-agent"),
        ([tool("twistd"), "deploy-proxy", "--version"], "twistd deploy-proxy"),
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f"{program} (deploy) {deploy.__version__}", done.stdout
        assert lines[1] == f"Twisted {twisted.__version__}", done.stdout


def test_a_fleet_status_shows_each_agents_version(site):
    """status answers carry agentVersion, idle and while a sync runs."""
    r = run_client(f"--hosts={site.agent.address}", "--order=status", "--options=web")
    assert r.content(site.agent.address, "status")["agentVersion"] == deploy.__version__
    r = run_client(f"--hosts={site.agent.address}", "--order=rsync", "--options=webslow")
    assert r.rc == 0, r.stdout + r.stderr
    r = run_client(f"--hosts={site.agent.address}", "--order=status", "--options=webslow")
    answer = r.content(site.agent.address, "status")
    assert answer["agentVersion"] == deploy.__version__
    run_client(f"--hosts={site.agent.address}", "--order=rkill", "--options=webslow")
