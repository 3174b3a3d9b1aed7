"""Reading the typed settings of agent and proxy (`deploy.settings`; and the jobs and API files
they name) from the original's INI files (`deploy.ini`) and command-line overrides; a wrong value
is a ConfigError naming file:line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from deploy.converters import (  # noqa: F401  (LOG_LEVELS re-exported for callers)
    LOG_LEVELS,
    BadValue,
    Converter,
    converters_for,
    to_bool,
    to_float,
    to_int,
    to_optint,
    to_optstr,
    to_str,
)
from deploy.ini import (  # noqa: F401  (ConfigError and parse_ini re-exported for callers)
    BLANKS,
    ConfigError,
    IniEntry,
    IniSection,
    load_ini,
    parse_ini,
    shown,
)
from deploy.jobsfile import jobs_from_sections, load_jobs  # noqa: F401  (load_jobs re-exported)
from deploy.keyring import AgentAccess, check_api_keys, split_agent_access
from deploy.policy import Policy, split_policies
from deploy.settings import (  # noqa: F401  (the settings, re-exported for callers)
    AgentConfig,
    ClientSettings,
    ProxyConfig,
    RsyncGroup,
    ServerSettings,
    agent_key_cipher,
)
from deploy.sources import SourceRule

_GROUP_PREFIX = "rsync::group::"


_SERVER_KEYS = converters_for(ServerSettings)
_CLIENT_KEYS = converters_for(ClientSettings)
_GROUP_SCALARS: dict[str, Converter] = {
    "dest": to_str,
    "src": to_str,
    "rsync": to_str,
    "rsh": to_optstr,
    "queue_path": to_optstr,
    "max_delete": to_optint,
    "allow_empty_source": to_bool,
    # release mode
    "releases": to_optint,
    "releases_path": to_optstr,
    "activate": to_str,
    "link_dest": to_bool,
    "two_pass_min_files": to_int,
    "after_activate": to_optstr,
    "check": to_optstr,
    "check_timeout": to_float,
    "rollback_on_failed_check": to_bool,
    "source_retry": to_float,
}
_GROUP_LISTS = {"option": "options", "exclude": "excludes", "include": "includes"}


def _unknown_key(section: IniSection, entry: IniEntry, path: str) -> ConfigError:
    return ConfigError(f"unknown key {entry.key!r} in [{section.name}]", path, entry.line)


def _scalar(entry: IniEntry, convert: Converter, path: str) -> Any:
    if isinstance(entry.value, list):
        raise ConfigError(
            f"{entry.key}: expected one value ('{entry.key} = ...'), not '{entry.key}[]'",
            path,
            entry.line,
        )
    try:
        return convert(entry.key, entry.value)
    except BadValue as exc:
        raise ConfigError(str(exc), path, entry.line) from None


def _settings(
    section: IniSection, converters: Mapping[str, Converter], path: str
) -> tuple[dict[str, Any], dict[str, int]]:
    """Typed values of a [server]/[client] section, and the line each came from."""
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key, entry in section.entries.items():
        convert = converters.get(key)
        if convert is None:
            raise _unknown_key(section, entry, path)
        values[key] = _scalar(entry, convert, path)
        lines[key] = entry.line
    return values, lines


def _string_list(entry: IniEntry, path: str) -> list[str]:
    result = []
    for value, line in entry.pairs():
        if not value:
            raise ConfigError(f"{entry.key}[]: empty value", path, line)
        result.append(value)
    return result


def _list_section(section: IniSection, key: str, path: str) -> list[str]:
    result: list[str] = []
    for entry in section.entries.values():
        if entry.key != key:
            raise _unknown_key(section, entry, path)
        # the original requires `key[] = v`; a plain `key = v` is taken as a one-item list
        result = _string_list(entry, path)
    return result


def _absolute_paths(section: IniSection, path: str) -> list[str]:
    """[allow::paths]: the jail compares resolved absolute paths, so a relative one is an error
    here rather than a traceback when the agent starts."""
    paths = _list_section(section, "path", path)
    for entry in section.entries.values():
        for value, line in entry.pairs():
            if not value.startswith("/"):
                raise ConfigError(f"path[]: {shown(value)} is not an absolute path", path, line)
    return paths


def _allowed_sources(section: IniSection, path: str) -> list[str]:
    """[allow::sources]: each entry a host name, an address or network, or HOST::MODULE[/path];
    one that is none of these is an error here, not an inline source silently refused later."""
    sources = _list_section(section, "source", path)
    for entry in section.entries.values():
        for value, line in entry.pairs():
            try:
                SourceRule.parse(value)
            except ValueError as e:
                raise ConfigError(f"source[]: {e}", path, line) from None
    return sources


def _only_path(section: IniSection, path: str, base: str) -> tuple[str | None, int | None]:
    """The `path` of an [api]/[jobs] section, resolved against the config's directory."""
    value: str | None = None
    line: int | None = None
    for entry in section.entries.values():
        if entry.key != "path":
            raise _unknown_key(section, entry, path)
        value = _scalar(entry, to_optstr, path)
        line = entry.line
    if value is not None:
        value = os.path.join(base, value)
    return value, line


def _rsync_group(section: IniSection, path: str) -> RsyncGroup:
    name = section.name[len(_GROUP_PREFIX) :].strip(BLANKS)
    if not name:
        raise ConfigError("empty rsync group name", path, section.line)
    values: dict[str, Any] = {}
    for key, entry in section.entries.items():
        if key in _GROUP_LISTS:
            values[_GROUP_LISTS[key]] = _string_list(entry, path)
        elif key in _GROUP_SCALARS:
            values[key] = _scalar(entry, _GROUP_SCALARS[key], path)
        else:
            raise _unknown_key(section, entry, path)
    missing = [key for key in ("dest", "src") if key not in values]
    if missing:
        raise ConfigError(f"[{section.name}] needs {' and '.join(missing)}", path, section.line)
    return RsyncGroup(name=name, line=section.line, **values)


def _section_error(section: IniSection, path: str) -> ConfigError:
    if not section.name:
        return ConfigError("entry outside any [section]", path, section.line)
    return ConfigError(f"unknown section [{section.name}]", path, section.line)


def _apply_overrides(
    overrides: Mapping[str, object] | None,
    server: tuple[dict[str, Any], dict[str, int | None]],
    client: tuple[dict[str, Any], dict[str, int | None]] | None = None,
) -> None:
    """Write command-line values over file values; None means the option was not given."""
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        option = "--" + name.replace("_", "-")
        if client is not None and name.startswith("client_") and name[7:] in _CLIENT_KEYS:
            key, converters, (values, lines) = name[7:], _CLIENT_KEYS, client
        elif name in _SERVER_KEYS:
            key, converters, (values, lines) = name, _SERVER_KEYS, server
        else:
            raise ConfigError(f"unknown option {option}")
        try:
            values[key] = converters[key](option, raw)
        except BadValue as exc:
            raise ConfigError(str(exc)) from None
        lines[key] = None


def _server_settings(
    defaults: ServerSettings, values: dict[str, Any], lines: dict[str, int | None], path: str | None
) -> ServerSettings:
    server = replace(defaults, **values)
    if server.ssl and server.ssl_private_key is None:
        raise ConfigError("ssl = true needs ssl_private_key", path, lines.get("ssl"))
    return server


def load_agent_config(
    path: str | None, overrides: Mapping[str, object] | None = None
) -> AgentConfig:
    """Load an agent config (and the jobs file it names); *overrides* are command-line values."""
    sections = {} if path is None else load_ini(path)
    base = os.path.dirname(os.path.abspath(path)) if path is not None else ""
    server_values: dict[str, Any] = {}
    server_lines: dict[str, int | None] = {}
    allow_hosts: list[str] = []
    allow_paths: list[str] = []
    allow_sources: list[str] = []
    groups: dict[str, RsyncGroup] = {}
    jobs_path: str | None = None
    jobs_line: int | None = None
    access = AgentAccess()
    if path is not None:
        sections, access = split_agent_access(sections, path)
    for name, section in sections.items():
        assert path is not None
        if name == "server":
            server_values, lines = _settings(section, _SERVER_KEYS, path)
            server_lines.update(lines)
        elif name == "allow::hosts":
            allow_hosts = _list_section(section, "host", path)
        elif name == "allow::paths":
            allow_paths = _absolute_paths(section, path)
        elif name == "allow::sources":
            allow_sources = _allowed_sources(section, path)
        elif name.startswith(_GROUP_PREFIX):
            # The original's sample ships `[rsync::group::groupname]` with every key commented
            # out; a group section with no entries is such a placeholder, not a group.
            if section.entries:
                group = _rsync_group(section, path)
                groups[group.name] = group
        elif name == "jobs":
            jobs_path, jobs_line = _only_path(section, path, base)
        else:
            raise _section_error(section, path)
    _apply_overrides(overrides, (server_values, server_lines))
    server = _server_settings(ServerSettings(), server_values, server_lines, path)
    jobs: dict[str, str] = {}
    if jobs_path is not None:
        assert path is not None and jobs_line is not None
        jobs = jobs_from_sections(load_ini(jobs_path, "jobs file", (path, jobs_line)), jobs_path)
    return AgentConfig(
        path=path,
        server=server,
        allow_hosts=allow_hosts,
        allow_paths=allow_paths,
        groups=groups,
        jobs_path=jobs_path,
        jobs=jobs,
        access=access,
        allow_sources=allow_sources,
    )


def load_proxy_config(
    path: str | None, overrides: Mapping[str, object] | None = None
) -> ProxyConfig:
    """Load a proxy config (and the API file it names); *overrides* are command-line values."""
    sections = {} if path is None else load_ini(path)
    base = os.path.dirname(os.path.abspath(path)) if path is not None else ""
    server: tuple[dict[str, Any], dict[str, int | None]] = ({}, {})
    client: tuple[dict[str, Any], dict[str, int | None]] = ({}, {})
    allow_hosts: list[str] = []
    api_path: str | None = None
    api_line: int | None = None
    for name, section in sections.items():
        assert path is not None
        if name == "server":
            values, lines = _settings(section, _SERVER_KEYS, path)
            server = (values, dict(lines))
        elif name == "client":
            values, lines = _settings(section, _CLIENT_KEYS, path)
            client = (values, dict(lines))
        elif name == "allow::hosts":
            allow_hosts = _list_section(section, "host", path)
        elif name == "api":
            api_path, api_line = _only_path(section, path, base)
        else:
            raise _section_error(section, path)
    _apply_overrides(overrides, server, client)
    keys: dict[str, list[str]] = {}
    servers: dict[str, list[str]] = {}
    policies: dict[str, Policy] = {}
    if api_path is not None:
        assert path is not None and api_line is not None
        api = load_ini(api_path, "api file", (path, api_line))
        api, policies = split_policies(api, api_path, with_key=True)
        keys, servers = _api(api, api_path)
        check_api_keys(keys, policies, api_path)
    return ProxyConfig(
        path=path,
        server=_server_settings(ServerSettings(port=3441), *server, path),
        client=replace(ClientSettings(), **client[0]),
        allow_hosts=allow_hosts,
        api_path=api_path,
        keys=keys,
        servers=servers,
        policies=policies,
    )


def _api(
    sections: Mapping[str, IniSection], path: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    keys: dict[str, list[str]] = {}
    servers: dict[str, list[str]] = {}
    for name, section in sections.items():
        if name == "keys":
            for key, entry in section.entries.items():
                granted = keys.setdefault(key, [])
                for value, _line in entry.pairs():
                    groups = (group.strip(BLANKS) for group in value.split(","))
                    granted.extend(group for group in groups if group)
        elif name == "servers":
            # names and hosts keep their case: the proxy matches them as written
            for group, entry in section.entries.items():
                servers.setdefault(group, []).extend(_string_list(entry, path))
        else:
            raise _section_error(section, path)
    return keys, servers


class TLSConfigError(Exception):
    """A key, certificate or option cannot be used; the message names the file and what to fix.
    (Here, not in deploy.tls, so that a daemon without TLS can catch it without OpenSSL.)"""
