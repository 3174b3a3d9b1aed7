"""`--check-config`: a loaded agent or proxy config checked beyond what each value means alone
(paths inside the jail, jobs that exist, hosts and networks that parse, grants of groups that
exist, usable TLS files), each problem a `FILE:LINE: problem` line."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from deploy.access import AllowedPaths, PathNotAllowed
from deploy.config import (
    AgentConfig,
    ConfigError,
    ProxyConfig,
    ServerSettings,
    TLSConfigError,
)
from deploy.ini import BLANKS, IniSection, load_ini, shown
from deploy.logs import api_key_id
from deploy.orders import split_host

Config = TypeVar("Config")

_GROUP_PREFIX = "rsync::group::"
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_IPV4_LIKE = re.compile(r"[0-9.]+")
# Group keys naming jobs of the jobs file (release mode's), checked when a group has them.
JOB_KEYS = ("after_activate", "check")


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a config, located where it is written. A problem that is not `fatal`
    is reported by --check-config but only logged at start (the original accepted it)."""

    message: str
    path: str | None = None
    line: int | None = None
    fatal: bool = True

    def __str__(self) -> str:
        return str(ConfigError(self.message, self.path, self.line))


class Lines:
    """Where keys and values are written in one INI file (none for a file that is not there)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.sections: Mapping[str, IniSection] = {}
        if path is not None:
            try:
                self.sections = load_ini(path)
            except ConfigError:
                pass  # the loader read it a moment ago; a file that changed since has no lines

    def section(self, name: str) -> IniSection | None:
        for section in self.sections.values():
            if section.name.strip(BLANKS) == name:
                return section
        return None

    def of(self, section: str, key: str, value: str | None = None) -> int | None:
        """The line of `key` in `[section]` (of the item `value`, for an array)."""
        found = self.section(section)
        if found is None:
            return None
        entry = found.entries.get(key)
        if entry is None:
            return found.line
        for item, line in entry.pairs():
            if value is None or item == value:
                return line
        return entry.line

    def problem(self, message: str, section: str, key: str, value: str | None = None) -> Problem:
        return Problem(message, self.path, self.of(section, key, value))


def load_checked(
    load: Callable[[str, dict[str, Any]], Config],
    check: Callable[[Config], list[Problem]],
    path: str,
    overrides: dict[str, Any],
) -> tuple[Config | None, list[Problem]]:
    """The config at `path` and its problems; no config when it does not even load."""
    try:
        config = load(path, overrides)
    except ConfigError as e:
        return None, [Problem(e.message, e.path, e.line)]
    return config, check(config)


# --------------------------------------------------------------------------- hosts


def host_problem(host: str) -> str | None:
    """Why `host` is neither an IP address nor a host name, or None."""
    try:
        ipaddress.ip_address(host.partition("%")[0])
        return None
    except ValueError as e:
        if ":" in host or _IPV4_LIKE.fullmatch(host):
            return f"{shown(host)} is not a valid IP address ({e})"
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(p) for p in name.split(".")):
        return f"{shown(host)} is not a host name or an IP address"
    return None


def allow_host_problem(entry: str) -> str | None:
    """Why an `[allow::hosts]` entry is no address, network or host name, or None. A name that
    does not resolve is not a problem here: the daemon warns about it when it starts."""
    text = entry.strip(BLANKS)
    if "/" in text:
        try:
            ipaddress.ip_network(text.partition("%")[0], strict=False)
        except ValueError as e:
            return f"host[]: {shown(entry)} is not a valid network ({e})"
        return None
    problem = host_problem(text)
    return f"host[]: {problem}" if problem else None


def _allow_hosts(lines: Lines, hosts: Iterable[str]) -> list[Problem]:
    problems = []
    for entry in hosts:
        message = allow_host_problem(entry)
        if message:
            problems.append(lines.problem(message, "allow::hosts", "host", entry))
    return problems


# --------------------------------------------------------------------------- TLS


def _option(lines: Lines, section: str, key: str) -> tuple[str | None, int | None, str]:
    """Where a setting was given: (file, line, "") from the file, else (None, None, "--key: ")."""
    line = lines.of(section, key)
    found = lines.section(section)
    if found is not None and key in found.entries:
        return lines.path, line, ""
    prefix = "--client-" if section == "client" else "--"
    return None, None, prefix + key.replace("_", "-") + ": "


def server_tls_problems(lines: Lines, server: ServerSettings) -> list[Problem]:
    """The `[server]` key, certificate and client CA: readable, usable and matching."""
    if not server.ssl or not server.ssl_private_key:
        return []
    from deploy.tls import server_context_from_settings
    from deploy.tls_keys import load_certificates, load_private_key, spki_der

    def at(key: str, message: str) -> Problem:
        path, line, prefix = _option(lines, "server", key)
        return Problem(prefix + message, path, line)

    problems = []
    key = None
    try:
        key = load_private_key(server.ssl_private_key)
    except TLSConfigError as e:
        problems.append(at("ssl_private_key", str(e)))
    if server.ssl_certificate:
        try:
            chain = load_certificates(server.ssl_certificate, "server certificate")
        except TLSConfigError as e:
            problems.append(at("ssl_certificate", str(e)))
        else:
            if key is not None and spki_der(chain[0].public_key()) != spki_der(key.public_key()):
                message = (
                    f"server certificate {server.ssl_certificate} does not match private key "
                    f"{server.ssl_private_key}"
                )
                problems.append(at("ssl_certificate", message))
    if server.ssl_client_ca:
        try:
            load_certificates(server.ssl_client_ca, "client CA")
        except TLSConfigError as e:
            problems.append(at("ssl_client_ca", str(e)))
    if not problems:
        try:
            server_context_from_settings(server)
        except TLSConfigError as e:
            problems.append(at("ssl_private_key", str(e)))
    return problems


def client_tls_problems(lines: Lines, config: ProxyConfig) -> list[Problem]:
    """The proxy's `[client]` TLS files (what it pins or trusts, its own certificate)."""
    client = config.client
    if not client.uses_tls:
        return []
    from deploy.tls import client_context_factories

    try:
        client_context_factories(
            public_key_path=client.ssl_public_key,
            ca_path=client.ssl_ca,
            cert_path=client.ssl_cert,
            key_path=client.ssl_key,
        )
    except TLSConfigError as e:
        key = "ssl"
        for name in ("ssl_public_key", "ssl_ca", "ssl_cert", "ssl_key"):
            value = getattr(client, name)
            if value and value in str(e):
                key = name
                break
        path, line, prefix = _option(lines, "client", key)
        return [Problem(f"[client] {prefix}{e}", path, line)]
    return []


def _daemon_problems(
    lines: Lines, hosts: list[str], server: ServerSettings, reloading: bool
) -> list[Problem]:
    """What agent and proxy configs share: [allow::hosts], the [server] TLS (not on a reload:
    the running daemon keeps its TLS context until it restarts, and after dropping privileges
    it may no longer read its own key), the metrics port."""
    problems = _allow_hosts(lines, hosts)
    if not reloading:
        problems += server_tls_problems(lines, server)
    return problems + _metrics_port(lines, server)


# --------------------------------------------------------------------------- agent


def check_agent(config: AgentConfig, *, reloading: bool = False) -> list[Problem]:
    """Everything wrong with an agent config that loaded (for a reload: what it can take)."""
    lines = Lines(config.path)
    problems = _daemon_problems(lines, config.allow_hosts, config.server, reloading)
    allowed = AllowedPaths(config.allow_paths)
    jobs_path = config.jobs_path or "(no [jobs] file)"
    for name, group in config.groups.items():
        section = _group_section(lines, name)
        for key in ("src", "releases_path"):
            value = getattr(group, key, None)
            if not value:
                continue
            try:
                allowed.check(value)
            except PathNotAllowed:
                # The original accepted it and refused each order on it: only a warning at start.
                message = f"[{section}] {key}: {value} is outside [allow::paths]"
                problems.append(Problem(message, lines.path, lines.of(section, key), fatal=False))
        for key in JOB_KEYS:
            for job in _job_names(getattr(group, key, None)):
                if job not in config.jobs:
                    message = f"[{section}] {key}: job {job!r} is not in the jobs file {jobs_path}"
                    problems.append(lines.problem(message, section, key))
    return problems


def _group_section(lines: Lines, name: str) -> str:
    for section in lines.sections.values():
        if section.name.startswith(_GROUP_PREFIX):
            if section.name[len(_GROUP_PREFIX) :].strip(BLANKS) == name:
                return section.name
    return _GROUP_PREFIX + name


def _job_names(value: Any) -> list[str]:
    """Job names of an `after_activate`/`check` value (`NAME` or `NAME,args`, one or a list)."""
    if not value:
        return []
    values = value if isinstance(value, list | tuple) else [value]
    return [str(v).partition(",")[0].strip(BLANKS) for v in values if str(v).strip(BLANKS)]


def _metrics_port(lines: Lines, server: ServerSettings) -> list[Problem]:
    port = getattr(server, "metrics_port", 0)
    if (
        port
        and port == server.port
        and getattr(server, "metrics_addr", "")
        in (
            server.addr,
            "0.0.0.0",
            "::",
        )
    ):
        path, line, prefix = _option(lines, "server", "metrics_port")
        return [Problem(f"{prefix}metrics_port {port} is the daemon's own port", path, line)]
    return []


# --------------------------------------------------------------------------- proxy


def check_proxy(config: ProxyConfig, *, reloading: bool = False) -> list[Problem]:
    """Everything wrong with a proxy config that loaded (for a reload: what it can take)."""
    lines = Lines(config.path)
    problems = _daemon_problems(lines, config.allow_hosts, config.server, reloading)
    problems += client_tls_problems(lines, config)
    api = Lines(config.api_path)
    for key, groups in config.keys.items():
        for group in groups:
            if group not in config.servers:
                message = (
                    f"key {api_key_id(key)} (sha256 prefix) grants group {group!r}, "
                    "which [servers] lacks"
                )
                problems.append(Problem(message, api.path, _grant_line(api, key, group)))
    for group, hosts in config.servers.items():
        for spec in hosts:
            wrong = server_problem(spec, config.client.port)
            if wrong:
                problems.append(api.problem(f"{group}[]: {wrong}", "servers", group, spec))
    return problems


def _grant_line(api: Lines, key: str, group: str) -> int | None:
    section = api.section("keys")
    entry = section.entries.get(key) if section is not None else None
    if entry is None:
        return None
    for value, line in entry.pairs():
        if group in (g.strip(BLANKS) for g in value.split(",")):
            return line
    return entry.line


def server_problem(spec: str, default_port: int) -> str | None:
    """Why a `[servers]` entry (`host`, `host:port`, `[v6]:port`) names no agent, or None."""
    try:
        host, port = split_host(spec, default_port)
    except ValueError as e:
        return str(e)
    if not 1 <= port <= 65535:
        return f"port {port} of {shown(spec)} is out of range (1-65535)"
    return host_problem(host)
