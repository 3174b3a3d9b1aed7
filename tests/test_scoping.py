"""Scoped and rotatable access without processes: per-key policies (deploy.policy), named keys,
`server_names` and hashed API keys (deploy.keyring), the named/bound signature form (deploy.auth),
the request the clients build with a key id, and pin files holding several keys (deploy.tls_keys).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock

from deploy.auth import AuthError, HmacVerifier, parse_authorization, sign_request
from deploy.config import ConfigError, TLSConfigError, load_agent_config, load_proxy_config
from deploy.errors import NotPermitted, status_for
from deploy.ini import parse_ini
from deploy.keyring import ApiKeys, api_key_hash, split_agent_access
from deploy.orders import ClientOptions, Order, build_request
from deploy.policy import Policies, Policy, request_scope, split_policies
from deploy.tls_keys import fingerprint, load_pins, spki_der

NOW = 1_700_000_000
BODY = b"auth_key=&options=web&args=&api_key="
CI = Policy("ci", orders=("status",), groups=("*",))
DEPLOYER = Policy("deployer", orders=("status", "rsync"), groups=("web",))
OPS = Policy("ops", orders=("exec",), jobs=("service:nginx*",))
POLICIES = Policies({p.key_id: p for p in (CI, DEPLOYER, OPS)})


# --------------------------------------------------------------------------- policy


def test_key_without_policy_may_do_everything() -> None:
    """A key with no policy (and the unnamed key) keeps today's meaning: everything."""
    assert POLICIES.decide(None, "exec", job="anything").allowed
    assert POLICIES.decide("other", "rsync", group="api").allowed


def test_ci_key_limited_to_status() -> None:
    """`orders[] = status` refuses rsync and exec, naming the order."""
    assert POLICIES.decide_options("ci", "status", "web").allowed
    for order, options in (("rsync", "web"), ("exec", "service:echo,hi")):
        decision = POLICIES.decide_options("ci", order, options)
        assert not decision.allowed and decision.verdict == "deny"
        assert decision.reason == f"order {order} is not allowed for key ci"


def test_group_limited_key() -> None:
    """`groups[] = web` admits web, refuses api and inline targets."""
    assert POLICIES.decide_options("deployer", "rsync", "web").allowed
    refused = POLICIES.decide_options("deployer", "rsync", "api")
    assert not refused.allowed and "group api" in refused.reason
    inline = POLICIES.decide_options("deployer", "rsync", "h::m/x,/srv/x")
    assert not inline.allowed and "inline target" in inline.reason


def test_job_glob() -> None:
    """`jobs[] = service:nginx*` admits service:nginx,reload but not service:mysql,stop."""
    assert POLICIES.decide_options("ops", "exec", "service:nginx,reload").allowed
    refused = POLICIES.decide_options("ops", "exec", "service:mysql,stop")
    assert refused.reason == "job service:mysql is not allowed for key ops"


def test_policy_without_lists_denies_everything() -> None:
    """Default deny: a policy that lists nothing admits nothing."""
    empty = Policies({"k": Policy("k")})
    assert not empty.decide_options("k", "status", "web").allowed


def test_request_scope() -> None:
    """What an order's options name: a job, a group, or an inline target ("")."""
    assert request_scope("exec", "service:nginx,reload") == (None, "service:nginx")
    assert request_scope("rsync", "web") == ("web", None)
    assert request_scope("rlist", "src,/dst") == ("", None)
    assert request_scope("deploy", "web,v2") == ("web", None)


def test_not_permitted_is_403() -> None:
    """A refused order is answered 403 with what was refused."""
    error = NotPermitted("order rsync is not allowed for key ci")
    assert status_for(error) == 403 and "order rsync" in str(error)


def test_policy_sections_parse() -> None:
    """`[policy::ID]` with orders[], groups[], jobs[] (comma lists too) becomes a Policy."""
    text = "[policy::ci]\norders[] = status,rlist\ngroups[] = web\njobs[] = service:nginx*\n"
    rest, policies = split_policies(parse_ini(text), "x.ini")
    assert rest == {}
    assert policies["ci"] == Policy("ci", ("status", "rlist"), ("web",), ("service:nginx*",))


@pytest.mark.parametrize(
    "text",
    [
        "[policy::bad id]\norders[] = status\n",
        "[policy::ci]\norders[] = Status!\n",
        "[policy::ci]\nhosts[] = web\n",
        "[policy::ci]\ngroups[] = [abc]\n",
    ],
)
def test_bad_policy_sections_are_config_errors(text: str) -> None:
    """A bad key id, order, key or glob is refused at load, naming the file."""
    with pytest.raises(ConfigError, match="x.ini"):
        split_policies(parse_ini(text), "x.ini")


# --------------------------------------------------------------------------- agent keys


def test_agent_keys_policies_and_server_names(tmp_path: Path) -> None:
    """[keys] (inline and file:), [policy::ID] and server_names[] load into config.access."""
    secret = tmp_path / "ci.key"
    secret.write_text("from-a-file\n")
    secret.chmod(0o600)
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[server]\nport = 3440\nserver_names[] = web1.example.com\nserver_names[] = 10.0.0.1\n"
        "[keys]\nold = s3cret-old\nci = file:ci.key\n"
        "[policy::ci]\norders[] = status\ngroups[] = *\n"
    )
    config = load_agent_config(str(ini))
    assert config.access.keys == {"old": "s3cret-old", "ci": "from-a-file"}
    assert config.access.server_names == ["web1.example.com", "10.0.0.1"]
    assert config.access.policies["ci"].orders == ("status",)
    assert config.server.port == 3440


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A key file others can read is a config error that says chmod 600."""
    secret = tmp_path / "ci.key"
    secret.write_text("x\n")
    os.chmod(secret, 0o644)
    sections = parse_ini("[keys]\nci = file:ci.key\n")
    with pytest.raises(ConfigError, match="chmod 600"):
        split_agent_access(sections, str(tmp_path / "agent.ini"))


def test_policy_for_an_unknown_key_is_refused() -> None:
    """A policy naming no [keys] entry is a typo caught at load."""
    sections = parse_ini("[keys]\nci = x\n[policy::cj]\norders[] = status\n")
    with pytest.raises(ConfigError, match="no key cj"):
        split_agent_access(sections, "agent.ini")


# --------------------------------------------------------------------------- signatures


def verifier(**kwargs: object) -> HmacVerifier:
    clock = Clock()
    clock.advance(NOW)
    return HmacVerifier(kwargs.pop("key", None), clock=clock, **kwargs)  # type: ignore[arg-type]


def signed(key: str, **kwargs: str) -> str:
    return sign_request(key, "POST", "/agent/status", BODY, now=NOW, **kwargs)


def test_old_form_is_unchanged() -> None:
    """Without a key id or host the header is the original form every agent reads."""
    header = signed("k", nonce="0" * 32)
    assert header.startswith("Deploy-HMAC-SHA256 ts=") and "kid" not in header


def test_named_keys_verify_by_kid() -> None:
    """Each live key verifies the requests that name it; the unnamed key stays key_cipher."""
    v = verifier(key="legacy", keys={"old": "k-old", "new": "k-new"})
    assert v.verify(signed("k-old", key_id="old"), "POST", "/agent/status", BODY) == "old"
    assert v.verify(signed("k-new", key_id="new"), "POST", "/agent/status", BODY) == "new"
    assert v.verify(signed("legacy"), "POST", "/agent/status", BODY) is None
    with pytest.raises(AuthError, match="bad signature"):
        v.verify(signed("k-old", key_id="new"), "POST", "/agent/status", BODY)
    with pytest.raises(AuthError, match="unknown key id gone"):
        v.verify(signed("k-old", key_id="gone"), "POST", "/agent/status", BODY)


def test_named_keys_only_refuse_unnamed_requests() -> None:
    """With [keys] and no key_cipher, a request without kid= is refused."""
    v = verifier(keys={"new": "k-new"})
    with pytest.raises(AuthError, match="named keys only"):
        v.verify(signed("65535"), "POST", "/agent/status", BODY)


def test_server_names_refuse_another_host() -> None:
    """With server_names, a signature for another host (or an unbound one) is refused."""
    v = verifier(key="k", server_names=["web1.example.com", "127.0.0.3:3440"])
    assert (
        v.verify(signed("k", host="WEB1.example.com:3440"), "POST", "/agent/status", BODY) is None
    )
    assert v.verify(signed("k", host="127.0.0.3:3440"), "POST", "/agent/status", BODY) is None
    with pytest.raises(AuthError, match="signed for another host"):
        v.verify(signed("k", host="127.0.0.3:3441"), "POST", "/agent/status", BODY)
    with pytest.raises(AuthError, match="signed for another host"):
        v.verify(signed("k", host="web2.example.com:3440"), "POST", "/agent/status", BODY)
    with pytest.raises(AuthError, match="not bound to a host"):
        v.verify(signed("k"), "POST", "/agent/status", BODY)


def test_host_is_signed() -> None:
    """Rewriting the host= parameter breaks the signature."""
    header = signed("k", host="web1:3440").replace("host=web1:3440", "host=web2:3440")
    with pytest.raises(AuthError, match="bad signature"):
        verifier(key="k").verify(header, "POST", "/agent/status", BODY)


def test_bad_kid_or_host_is_malformed() -> None:
    """A kid or host that is not a name is a malformed header, not a lookup."""
    for params in ("kid=a b", "host=a/b"):
        header = signed("k").replace("ts=", f"{params}, ts=")
        with pytest.raises(AuthError, match="malformed"):
            parse_authorization(header)


def test_client_with_key_id_signs_the_bound_form() -> None:
    """--key-id: kid= and host=HOST:PORT signed; Host: carries the same host:port."""
    options = ClientOptions(port=3440, key_cipher="k-new", key_id="new")
    raw = build_request(Order("status", "web"), options, "127.0.0.2", NOW, 3999)
    head = raw.decode("latin-1").split("\r\n\r\n")[0]
    assert "Host: 127.0.0.2:3999" in head
    auth = parse_authorization(head.split("Authorization: ")[1])
    assert (auth.kid, auth.host) == ("new", "127.0.0.2:3999")
    plain = build_request(Order("status", "web"), ClientOptions(), "::1", NOW, 3440)
    assert b"Host: [::1]\r\n" in plain and b"kid=" not in plain


# --------------------------------------------------------------------------- proxy keys


def test_hashed_api_keys_match_the_key_not_the_hash() -> None:
    """A `sha256:` entry matches the key it hashes; presenting the hash itself matches nothing."""
    stored = api_key_hash("the-api-key")
    assert stored == "sha256:" + hashlib.sha256(b"the-api-key").hexdigest()
    keys = ApiKeys({stored: ["web"], "plain-key": ["api"]})
    found = keys.find("the-api-key")
    assert found is not None and found.groups == ("web",)
    assert keys.find(stored) is None and keys.find("wrong") is None
    plain = keys.find("plain-key")
    assert plain is not None and plain.groups == ("api",)


def test_proxy_policy_narrows_groups_and_orders() -> None:
    """A proxy policy scopes its [keys] entry: groups narrowed, orders and jobs checked."""
    policy = Policy("deploy", orders=("rsync",), groups=("web",), key="k1")
    keys = ApiKeys({"k1": ["web", "api"], "k2": ["api"]}, {"deploy": policy})
    found = keys.find("k1")
    assert found is not None and found.granted_groups() == ["web"]
    assert keys.decide("k1", "rsync", "web") == ("deploy", policy.decide("rsync"))
    key_id, decision = keys.decide("k1", "exec", "service:echo")
    assert key_id == "deploy" and not decision.allowed
    assert keys.decide("k2", "exec", "x")[1].allowed


def test_proxy_api_file_with_hashes_and_policies(tmp_path: Path) -> None:
    """The API file takes sha256: keys and [policy::ID] key = ENTRY; a bad hash is refused."""
    stored = api_key_hash("k")
    api = tmp_path / "api.ini"
    api.write_text(
        f"[keys]\n{stored} = web\n[servers]\nweb[] = 127.0.0.2\n"
        f"[policy::ci]\nkey = {stored}\norders[] = status\ngroups[] = web\n"
    )
    proxy = tmp_path / "proxy.ini"
    proxy.write_text(f"[api]\npath = {api}\n[client]\nkey_id = ci\nbind_host = true\n")
    config = load_proxy_config(str(proxy))
    assert config.keys == {stored: ["web"]} and config.policies["ci"].key == stored
    assert config.client.key_id == "ci" and config.client.bind_host
    api.write_text("[keys]\nsha256:abc = web\n")
    with pytest.raises(ConfigError, match="64 hex"):
        load_proxy_config(str(proxy))


# --------------------------------------------------------------------------- pins


def _public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_pin_file_with_several_keys_and_sha256_lines(tmp_path: Path) -> None:
    """A pin file may hold several PEM keys and sha256//<base64> lines: every one is a pin."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    ders = [spki_der(k.public_key()) for k in keys]
    pin_line = b"sha256//" + base64.b64encode(hashlib.sha256(ders[2]).digest())
    path = tmp_path / "pins.pem"
    path.write_bytes(_public_pem(keys[0]) + _public_pem(keys[1]) + pin_line + b"\n")
    assert load_pins(str(path)) == [
        hashlib.sha256(ders[2]).digest(),
        bytes.fromhex(fingerprint(ders[0])),
        bytes.fromhex(fingerprint(ders[1])),
    ]
    single = tmp_path / "one.pem"
    single.write_bytes(_public_pem(keys[0]))
    assert load_pins(str(single)) == [hashlib.sha256(ders[0]).digest()]
    path.write_bytes(b"sha256//not-base64\n")
    with pytest.raises(TLSConfigError, match="pins.pem:1"):
        load_pins(str(path))


def test_proxy_api_sample_uncommented_loads(tmp_path: Path) -> None:
    """etc/deploy_proxy_api.ini with every example uncommented, plus its policy example: the
    hashed key matches its key and the policy scopes it."""
    from tests.test_samples import ETC, uncommented

    api = tmp_path / "api.ini"
    text = uncommented((ETC / "deploy_proxy_api.ini").read_text())
    example = text.split("; - Example")[1].split("\n", 1)[1].split("\n\n")[0]
    api.write_text(text + "\n" + example.replace(";   ", "") + "\n")
    proxy = tmp_path / "proxy.ini"
    proxy.write_text(f"[api]\npath = {api}\n")
    config = load_proxy_config(str(proxy))
    keys = ApiKeys(config.keys, config.policies)
    found = keys.find("secret")
    assert found is not None and found.key_id == "ci" and found.granted_groups() == ["group1"]


def test_server_names_with_ipv6_and_ports() -> None:
    """A bare or bracketed IPv6 entry matches a bracketed signed host; a port entry pins it."""
    v = verifier(key="k", server_names=["::1", "[fd00::1]:3440"])
    assert v.verify(signed("k", host="[::1]:3999"), "POST", "/agent/status", BODY) is None
    assert v.verify(signed("k", host="[fd00::1]:3440"), "POST", "/agent/status", BODY) is None
    with pytest.raises(AuthError, match="another host"):
        v.verify(signed("k", host="[fd00::1]:3441"), "POST", "/agent/status", BODY)
