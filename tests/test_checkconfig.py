"""`--check-config` for both daemons: every problem the issue names is found and located
(`FILE:LINE: problem`), exit 0 or 1 like `nginx -t`; a daemon started with such a config
refuses to start with those lines and nothing else (no usage text, no traceback)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from deploy.checkconfig import (
    allow_host_problem,
    check_agent,
    check_proxy,
    host_problem,
    server_problem,
)
from deploy.config import load_agent_config, load_proxy_config
from deploy.logs import api_key_id
from deploy.tls_keys import self_signed_certificate
from tests.harness import free_port, tool


def write_key(path: Path) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def numbered(text: str) -> dict[str, int]:
    """The line number of each line's first word (`key` or `[section]`), for expectations."""
    out = {}
    for number, line in enumerate(text.splitlines(), start=1):
        word = line.split("=")[0].strip()
        out.setdefault(word, number)
    return out


def agent_text(tmp_path: Path, port: int, server: str = "") -> str:
    return (
        f"[server]\naddr = 127.0.0.1\nport = {port}\nstate_path = {tmp_path / 'state'}\n"
        f"{server}"
        "[allow::hosts]\nhost[] = 127.0.0.0/8\nhost[] = 10.1.2.0/33\nhost[] = 10.0.0.300\n"
        "host[] = not a host\nhost[] = localhost\n"
        f"[allow::paths]\npath[] = {tmp_path / 'targets'}\n"
        f"[rsync::group::outside]\ndest = h::M/\nsrc = /srv/elsewhere/web\n"
        f"[rsync::group::web]\ndest = h::M/\nsrc = {tmp_path / 'targets' / 'web'}\n"
    )


def test_agent_problems_are_found_and_located(tmp_path):
    """Invalid CIDR and addresses in [allow::hosts] (a name is fine), a group outside
    [allow::paths] (only a warning at start), an unreadable TLS key and a certificate of
    another key, each at its own line; a reload does not read the TLS files again."""
    key = tmp_path / "key.pem"
    write_key(key)
    other = write_key(tmp_path / "other.pem")
    cert = tmp_path / "cert.pem"
    cert.write_bytes(self_signed_certificate(other).public_bytes(serialization.Encoding.PEM))
    tls = (
        f"ssl = true\nssl_private_key = {key}\nssl_certificate = {cert}\n"
        f"ssl_client_ca = {tmp_path / 'missing-ca.pem'}\n"
    )
    path = tmp_path / "agent.ini"
    text = agent_text(tmp_path, 3440, tls)
    path.write_text(text)
    found = [str(p) for p in check_agent(load_agent_config(str(path)))]
    line = numbered(text)
    host_lines = [n for n, t in enumerate(text.splitlines(), 1) if t.startswith("host[]")]
    src_line = [n for n, t in enumerate(text.splitlines(), 1) if t.startswith("src")][0]
    assert found == [
        f"{path}:{host_lines[1]}: host[]: '10.1.2.0/33' is not a valid network "
        "('10.1.2.0/33' does not appear to be an IPv4 or IPv6 network)",
        f"{path}:{host_lines[2]}: host[]: '10.0.0.300' is not a valid IP address "
        "('10.0.0.300' does not appear to be an IPv4 or IPv6 address)",
        f"{path}:{host_lines[3]}: host[]: 'not a host' is not a host name or an IP address",
        f"{path}:{line['ssl_certificate']}: server certificate {cert} does not match private "
        f"key {key}",
        f"{path}:{line['ssl_client_ca']}: cannot read client CA {tmp_path / 'missing-ca.pem'}: "
        "No such file or directory",
        f"{path}:{src_line}: [rsync::group::outside] src: /srv/elsewhere/web is outside "
        "[allow::paths]",
    ]
    # A reload keeps the TLS context it has (and may no longer read the key as --user).
    reloaded = [str(p) for p in check_agent(load_agent_config(str(path)), reloading=True)]
    assert reloaded == found[:3] + found[5:]
    (missing,) = check_agent(
        dataclasses.replace(
            load_agent_config(str(path)),
            server=dataclasses.replace(
                load_agent_config(str(path)).server,
                ssl_private_key=str(tmp_path / "nokey.pem"),
                ssl_certificate=None,
                ssl_client_ca=None,
            ),
            allow_hosts=[],
            groups={},
        )
    )
    assert str(missing) == (
        f"{path}:{line['ssl_private_key']}: cannot read private key {tmp_path / 'nokey.pem'}: "
        "No such file or directory"
    )


def test_jobs_named_by_a_group_must_exist_and_releases_stay_in_the_jail(tmp_path):
    """A group's after_activate or check naming a job the jobs file lacks is an error; a
    releases_path outside [allow::paths] is reported like src."""
    jobs = tmp_path / "jobs.ini"
    jobs.write_text("[service]\nservice:reload = /bin/true %s\n")
    path = tmp_path / "agent.ini"
    text = (
        f"[server]\nstate_path = {tmp_path / 'state'}\n[allow::paths]\npath[] = {tmp_path}\n"
        f"[rsync::group::web]\ndest = h::M/\nsrc = {tmp_path / 'web'}\nreleases = 3\n"
        "releases_path = /var/elsewhere/releases\nafter_activate = service:reload,nginx\n"
        f"check = health:web\n[jobs]\npath = {jobs}\n"
    )
    path.write_text(text)
    config = load_agent_config(str(path))
    line = numbered(text)
    assert [str(p) for p in check_agent(config)] == [
        f"{path}:{line['releases_path']}: [rsync::group::web] releases_path: "
        "/var/elsewhere/releases is outside [allow::paths]",
        f"{path}:{line['check']}: [rsync::group::web] check: job 'health:web' is not in the "
        f"jobs file {jobs}",
    ]


def test_proxy_problems_are_found_and_located(tmp_path):
    """A key granting a group [servers] lacks (the key itself never shown), a [servers] entry
    that is not a host and one whose port is out of range, each at its line of the API file;
    an unreadable [client] pin at its line of the config."""
    api = tmp_path / "api.ini"
    api_text = (
        "[keys]\nsecret-key-1[] = web,db\nsecret-key-2[] = web\n"
        "[servers]\nweb[] = 127.0.0.1\nweb[] = not a host\nweb[] = web2:70000\n"
        "web[] = [::1]:3440\n"
    )
    api.write_text(api_text)
    path = tmp_path / "proxy.ini"
    text = (
        f"[server]\naddr = 127.0.0.1\n[client]\nssl_public_key = {tmp_path / 'pin.pem'}\n"
        f"[allow::hosts]\nhost[] = 10.0.0.0/8/1\n[api]\npath = {api}\n"
    )
    path.write_text(text)
    found = [str(p) for p in check_proxy(load_proxy_config(str(path)))]
    assert all("secret-key" not in line for line in found)
    assert found == [
        f"{path}:6: host[]: '10.0.0.0/8/1' is not a valid network "
        "('10.0.0.0/8/1' does not appear to be an IPv4 or IPv6 network)",
        f"{path}:4: [client] cannot read public key {tmp_path / 'pin.pem'}: "
        "No such file or directory",
        f"{api}:2: key {api_key_id('secret-key-1')} (sha256 prefix) grants group 'db', "
        "which [servers] lacks",
        f"{api}:6: web[]: 'not a host' is not a host name or an IP address",
        f"{api}:7: web[]: port 70000 of 'web2:70000' is out of range (1-65535)",
    ]


def test_host_and_server_rules():
    """Addresses, networks and host names are accepted; what looks like an address but is not
    one, and names with spaces or empty labels, are problems."""
    for good in ("127.0.0.1", "::1", "fe80::1%eth0", "web-1.example.net", "web_2", "host."):
        assert host_problem(good) is None, good
    for bad in ("10.0.0.256", "::g", "a..b", "-web", "has space", ""):
        assert host_problem(bad), bad
    assert allow_host_problem("10.0.0.0/8") is None and allow_host_problem("::/0") is None
    assert allow_host_problem("10.0.0.0/40")
    assert server_problem("[::1]:3440", 3440) is None and server_problem("h:0", 3440)
    assert server_problem("h:x", 3440) == "bad port in host 'h:x'"


def twistd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("twistd"), "-n", "--pidfile=", "--logfile=-", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_check_config_and_refusal_print_the_same_lines_and_nothing_else(tmp_path):
    """`twistd deploy-agent --check-config`: exit 1 and one line per problem; the daemon
    started with that config exits 1 with the fatal lines alone (the group outside the jail is
    only a warning); a fixed config checks OK (exit 0); a file that does not even parse gives
    its one line, no usage text."""
    port = free_port()
    path = tmp_path / "agent.ini"
    path.write_text(agent_text(tmp_path, port))
    check = twistd("deploy-agent", f"--path={path}", "--check-config", cwd=tmp_path)
    lines = check.stderr.splitlines()
    assert check.returncode == 1 and len(lines) == 4, check.stdout + check.stderr
    assert all(line.startswith(f"{path}:") for line in lines)
    start = twistd("deploy-agent", f"--path={path}", cwd=tmp_path)
    assert start.returncode == 1
    assert start.stderr.splitlines() == lines[:3], start.stdout + start.stderr
    assert "Usage" not in start.stdout + start.stderr
    assert "Traceback" not in start.stdout + start.stderr
    text = path.read_text()
    for bad in ("host[] = 10.1.2.0/33\n", "host[] = 10.0.0.300\n", "host[] = not a host\n"):
        text = text.replace(bad, "")
    text = text.replace("/srv/elsewhere/web", str(tmp_path / "targets" / "app"))
    path.write_text(text)
    good = twistd("deploy-agent", f"--path={path}", "--check-config", cwd=tmp_path)
    assert (good.returncode, good.stdout, good.stderr) == (0, f"{path}: config OK\n", "")
    path.write_text("[server]\nport = 99999\n")
    broken = twistd("deploy-proxy", f"--path={path}", cwd=tmp_path)
    assert broken.returncode == 1
    assert broken.stdout + broken.stderr == (
        f"{path}:2: port: expected an integer 1-65535, got '99999'\n"
    )
