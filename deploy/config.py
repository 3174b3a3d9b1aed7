"""INI loading in the original's dialect (`key[] = v` arrays, `;`/`#` comments,
`[a::b::c]` sections), typed settings for agent and proxy, and validation errors that name
file:line."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from deploy.auth import DEFAULT_KEY_CIPHER  # noqa: F401  (re-exported for callers)

LOG_LEVELS = ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")
# syslog's own spellings, which operators of the original may have used
_LEVEL_ALIASES = {"err": "error", "warning": "warn"}

MAX_LINE_BYTES = 64 * 1024
MAX_LINES = 100_000
# A config is read whole; this bounds what a wrong path (a log file, a device) can cost.
MAX_CONFIG_BYTES = 16 * 1024 * 1024

_MAX_INT = 2**31 - 1
# Perl's \s, not Python's str.strip() default that also eats Unicode spaces and \x1c-\x1f.
_BLANKS = " \t\r\f\v"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_TRUE = frozenset({"true", "on", "yes", "1"})
_FALSE = frozenset({"false", "off", "no", "0"})
_GROUP_PREFIX = "rsync::group::"


class ConfigError(Exception):
    """A config that cannot be used; the message is for the operator, located at path:line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message, path, line)
        self.message = message
        self.path = path
        self.line = line

    def __str__(self) -> str:
        if self.path is None:
            return self.message if self.line is None else f"line {self.line}: {self.message}"
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


# --------------------------------------------------------------------------- generic INI layer


@dataclass
class IniEntry:
    key: str
    value: str | list[str]
    # the line of the value in force: the last one for a repeated scalar, the first for an array
    line: int
    # every line that set this key, in order: one per item of an array, each repeat of a scalar
    lines: list[int] = field(default_factory=list)


@dataclass
class IniSection:
    name: str
    line: int
    entries: dict[str, IniEntry]


def parse_ini(text: str, path: str = "<string>") -> dict[str, IniSection]:
    """Parse *text* in the original's INI dialect; raise ConfigError naming *path*:line."""
    if text.startswith("\ufeff"):
        text = text[1:]
    count = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    if count > MAX_LINES:
        raise ConfigError(f"more than {MAX_LINES} lines", path, MAX_LINES + 1)

    sections: dict[str, IniSection] = {}
    current: IniSection | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        # 4 bytes per character at most, so only long lines need the exact count
        if len(raw) > MAX_LINE_BYTES // 4 and _utf8_size(raw) > MAX_LINE_BYTES:
            raise ConfigError(f"line longer than {MAX_LINE_BYTES} bytes", path, number)
        line = raw.strip(_BLANKS)
        # Comment lines are skipped before any check, so a legacy-encoded comment still loads.
        if not line or line[0] in ";#":
            continue
        if _SURROGATE.search(line):
            raise ConfigError("line is not valid UTF-8", path, number)
        if _CONTROL.search(line):
            raise ConfigError("control character in line", path, number)
        if line[0] == "[":
            name = _section_name(line, path, number)
            current = sections.setdefault(name, IniSection(name, number, {}))
            continue
        if current is None:
            # jobs files may define commands before any header; the original filed them as "list"
            current = sections.setdefault("", IniSection("", number, {}))
        key, value, is_array = _key_value(line, path, number)
        _add_entry(current, key, value, is_array, path, number)
    return sections


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _section_name(line: str, path: str, number: int) -> str:
    if not line.endswith("]"):
        raise ConfigError(f"unterminated section header {_shown(line)}", path, number)
    name = line[1:-1].strip(_BLANKS)
    if not name:
        raise ConfigError("empty section name", path, number)
    if "[" in name or "]" in name:
        raise ConfigError(f"bad section header {_shown(line)}", path, number)
    return name


def _key_value(line: str, path: str, number: int) -> tuple[str, str, bool]:
    key, sep, value = line.partition("=")
    if not sep:
        raise ConfigError(
            f"expected 'key = value' or '[section]', got {_shown(line)}", path, number
        )
    key = key.strip(_BLANKS)
    is_array = key.endswith("[]")
    if is_array:
        key = key[:-2].rstrip(_BLANKS)
    if not key:
        raise ConfigError("empty key before '='", path, number)
    if "[" in key or "]" in key:
        raise ConfigError(f"bad key {key!r}: only a trailing '[]' may use brackets", path, number)
    # No inline comments, as in the original: a ';' or '#' inside a value is part of the value
    # (exec templates and rsync options may need them).
    value = value.strip(_BLANKS)
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    return key, value, is_array


def _add_entry(
    section: IniSection, key: str, value: str, is_array: bool, path: str, number: int
) -> None:
    entry = section.entries.get(key)
    if entry is None:
        section.entries[key] = IniEntry(key, [value] if is_array else value, number, [number])
    elif isinstance(entry.value, list) != is_array:
        raise ConfigError(
            f"{key!r} is set both as '{key} = ...' and '{key}[] = ...' in [{section.name}]",
            path,
            number,
        )
    elif isinstance(entry.value, list):
        entry.value.append(value)
        entry.lines.append(number)
    else:
        entry.value = value
        entry.line = number
        entry.lines.append(number)


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _read_text(path: str) -> str:
    """Read a config file as text; OSError passes through for the caller to locate."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES} bytes", path)
    # surrogateescape keeps bytes of a legacy encoding; parse_ini refuses them outside comments
    return data.decode("utf-8-sig", "surrogateescape")


def _load_ini(
    path: str, what: str = "config", ref: tuple[str, int] | None = None
) -> dict[str, IniSection]:
    """Read and parse *path*; a read failure is located at *ref* (the line naming it) if given."""
    try:
        text = _read_text(path)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        if ref is None:
            raise ConfigError(f"cannot read {what}: {reason}", path) from None
        raise ConfigError(f"cannot read {what} {path!r}: {reason}", *ref) from None
    return parse_ini(text, path)


def _items(entry: IniEntry) -> list[tuple[str, int]]:
    """(value, line) pairs of an entry, a scalar counting as a one-item list."""
    if isinstance(entry.value, list):
        return list(zip(entry.value, entry.lines, strict=True))
    return [(entry.value, entry.line)]


# --------------------------------------------------------------------------- typed settings


@dataclass
class ServerSettings:
    addr: str = "0.0.0.0"
    port: int = 3440
    backlog: int = 128
    socket_timeout: float = 5.0
    socket_accept_filter: bool = False
    max_prefork: int = 0
    max_requests_per_child: int = 0
    max_process_timeout: float = 0.0
    log_write: bool = False
    log_error_level: str = "info"
    log_error_path: str | None = None
    log_access_path: str | None = None
    audit_log_path: str | None = None
    # agent: None means DEFAULT_KEY_CIPHER; proxy: None means no agent-style auth is required
    key_cipher: str | None = None
    legacy_auth: bool = False
    auth_window: float = 60.0
    ssl: bool = False
    ssl_private_key: str | None = None
    ssl_certificate: str | None = None
    ssl_client_ca: str | None = None
    process_name: str | None = None
    user: str | None = None
    group: str | None = None
    state_path: str | None = None
    rkill_grace: float = 5.0
    # accepted for the original's configs; an event loop has no use for them
    worker_method: str | None = None
    ipc_path: str | None = None


@dataclass
class RsyncGroup:
    name: str
    dest: str
    src: str
    line: int
    rsync: str = "rsync"
    rsh: str | None = None
    options: list[str] | None = None
    excludes: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)
    queue_path: str | None = None
    max_delete: int | None = None
    allow_empty_source: bool = False


@dataclass
class AgentConfig:
    path: str | None
    server: ServerSettings
    allow_hosts: list[str]
    allow_paths: list[str]
    groups: dict[str, RsyncGroup]
    jobs_path: str | None
    jobs: dict[str, str]


@dataclass
class ClientSettings:
    port: int = 3440
    thread_timeout: float = 10.0
    socket_timeout: float = 5.0
    key_cipher: str | None = None
    legacy_auth: bool = False
    ssl: bool = False
    ssl_public_key: str | None = None
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    max_parallel: int = 64
    ipc_path: str | None = None
    worker_method: str | None = None

    @property
    def uses_tls(self) -> bool:
        """The proxy talks TLS to its agents (a pin or a CA alone turns it on)."""
        return bool(self.ssl or self.ssl_public_key or self.ssl_ca)


@dataclass
class ProxyConfig:
    path: str | None
    server: ServerSettings
    client: ClientSettings
    allow_hosts: list[str]
    api_path: str | None
    keys: dict[str, list[str]]
    servers: dict[str, list[str]]


def agent_key_cipher(server: ServerSettings) -> str:
    """The key an agent checks requests with: the configured one, else the original's default."""
    return DEFAULT_KEY_CIPHER if server.key_cipher is None else server.key_cipher


class _BadValue(Exception):
    """A value of the wrong type; the caller adds where it came from."""


# A converter takes the name to show (`port` or `--port`) and a raw value: a string from a file
# or the command line, or an already-typed value from an override.
_Converter = Callable[[str, object], Any]


def _bad(label: str, expected: str, raw: object) -> _BadValue:
    return _BadValue(f"{label}: expected {expected}, got {_shown(raw)}")


def _int_between(low: int, high: int) -> _Converter:
    expected = f"an integer {low}-{high}"

    def convert(label: str, raw: object) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            number = raw
        elif isinstance(raw, str) and _DIGITS.fullmatch(text := raw.strip(_BLANKS)):
            # the length check keeps int() away from huge digit strings
            if len(text) > 10:
                raise _bad(label, expected, raw)
            number = int(text)
        else:
            raise _bad(label, expected, raw)
        if not low <= number <= high:
            raise _bad(label, expected, raw)
        return number

    return convert


_to_port = _int_between(1, 65535)
_to_int = _int_between(0, _MAX_INT)


def _to_optint(label: str, raw: object) -> int | None:
    return None if raw == "" else _to_int(label, raw)


def _to_float(label: str, raw: object) -> float:
    expected = "a number >= 0"
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        number = float(raw)
    elif isinstance(raw, str) and _DECIMAL.fullmatch(text := raw.strip(_BLANKS)):
        number = float(text)
    else:
        raise _bad(label, expected, raw)
    if not math.isfinite(number) or number < 0:
        raise _bad(label, expected, raw)
    return number


def _to_bool(label: str, raw: object) -> bool:
    # ints too: twisted.python.usage flags are 0/1
    if isinstance(raw, bool | int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        word = raw.strip(_BLANKS).lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _bad(label, "one of true/false/on/off/yes/no/1/0", raw)


def _to_level(label: str, raw: object) -> str:
    expected = f"one of {'/'.join(LOG_LEVELS)} or 0-7"
    if isinstance(raw, int) and not isinstance(raw, bool):
        if 0 <= raw < len(LOG_LEVELS):
            return LOG_LEVELS[raw]
        raise _bad(label, expected, raw)
    if isinstance(raw, str):
        word = raw.strip(_BLANKS).lower()
        word = _LEVEL_ALIASES.get(word, word)
        if word in LOG_LEVELS:
            return word
        if len(word) == 1 and "0" <= word <= "7":
            return LOG_LEVELS[int(word)]
    raise _bad(label, expected, raw)


def _to_str(label: str, raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise _bad(label, "a non-empty value", raw)
    return raw


def _to_optstr(label: str, raw: object) -> str | None:
    # an empty value means unset, like a commented-out line
    if not isinstance(raw, str):
        raise _bad(label, "a string", raw)
    return raw or None


_BY_TYPE: dict[str, _Converter] = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "str": _to_str,
    "str | None": _to_optstr,
}
_BY_NAME: dict[str, _Converter] = {"port": _to_port, "log_error_level": _to_level}


def _converters(cls: type) -> dict[str, _Converter]:
    # annotations are strings here (from __future__ import annotations)
    return {f.name: _BY_NAME.get(f.name) or _BY_TYPE[str(f.type)] for f in fields(cls)}


_SERVER_KEYS = _converters(ServerSettings)
_CLIENT_KEYS = _converters(ClientSettings)
_GROUP_SCALARS: dict[str, _Converter] = {
    "dest": _to_str,
    "src": _to_str,
    "rsync": _to_str,
    "rsh": _to_optstr,
    "queue_path": _to_optstr,
    "max_delete": _to_optint,
    "allow_empty_source": _to_bool,
}
_GROUP_LISTS = {"option": "options", "exclude": "excludes", "include": "includes"}


def _unknown_key(section: IniSection, entry: IniEntry, path: str) -> ConfigError:
    return ConfigError(f"unknown key {entry.key!r} in [{section.name}]", path, entry.line)


def _scalar(entry: IniEntry, convert: _Converter, path: str) -> Any:
    if isinstance(entry.value, list):
        raise ConfigError(
            f"{entry.key}: expected one value ('{entry.key} = ...'), not '{entry.key}[]'",
            path,
            entry.line,
        )
    try:
        return convert(entry.key, entry.value)
    except _BadValue as exc:
        raise ConfigError(str(exc), path, entry.line) from None


def _settings(
    section: IniSection, converters: Mapping[str, _Converter], path: str
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
    for value, line in _items(entry):
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
        for value, line in _items(entry):
            if not value.startswith("/"):
                raise ConfigError(f"path[]: {_shown(value)} is not an absolute path", path, line)
    return paths


def _only_path(section: IniSection, path: str, base: str) -> tuple[str | None, int | None]:
    """The `path` of an [api]/[jobs] section, resolved against the config's directory."""
    value: str | None = None
    line: int | None = None
    for entry in section.entries.values():
        if entry.key != "path":
            raise _unknown_key(section, entry, path)
        value = _scalar(entry, _to_optstr, path)
        line = entry.line
    if value is not None:
        value = os.path.join(base, value)
    return value, line


def _rsync_group(section: IniSection, path: str) -> RsyncGroup:
    name = section.name[len(_GROUP_PREFIX) :].strip(_BLANKS)
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
        except _BadValue as exc:
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
    sections = {} if path is None else _load_ini(path)
    base = os.path.dirname(os.path.abspath(path)) if path is not None else ""
    server_values: dict[str, Any] = {}
    server_lines: dict[str, int | None] = {}
    allow_hosts: list[str] = []
    allow_paths: list[str] = []
    groups: dict[str, RsyncGroup] = {}
    jobs_path: str | None = None
    jobs_line: int | None = None
    for name, section in sections.items():
        assert path is not None
        if name == "server":
            server_values, lines = _settings(section, _SERVER_KEYS, path)
            server_lines.update(lines)
        elif name == "allow::hosts":
            allow_hosts = _list_section(section, "host", path)
        elif name == "allow::paths":
            allow_paths = _absolute_paths(section, path)
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
        jobs = _jobs(_load_ini(jobs_path, "jobs file", (path, jobs_line)), jobs_path)
    return AgentConfig(
        path=path,
        server=server,
        allow_hosts=allow_hosts,
        allow_paths=allow_paths,
        groups=groups,
        jobs_path=jobs_path,
        jobs=jobs,
    )


def load_jobs(path: str) -> dict[str, str]:
    """Job name -> command template from a jobs file: `name = template` in any section."""
    return _jobs(_load_ini(path, "jobs file"), path)


def _jobs(sections: Mapping[str, IniSection], path: str) -> dict[str, str]:
    # Section names only group jobs for the reader; names share one namespace, so a name set
    # twice anywhere is refused at its second line rather than silently overridden.
    definitions = sorted(
        (line, entry)
        for section in sections.values()
        for entry in section.entries.values()
        for line in entry.lines
    )
    jobs: dict[str, str] = {}
    first: dict[str, int] = {}
    for line, entry in definitions:
        name = entry.key
        if isinstance(entry.value, list):
            raise ConfigError(f"job {name!r}: write '{name} = command', not '{name}[]'", path, line)
        if name in first:
            raise ConfigError(
                f"job {name!r} is defined twice (first at line {first[name]})", path, line
            )
        first[name] = line
        jobs[name] = entry.value
    for name, template in jobs.items():
        if not template:
            raise ConfigError(f"job {name!r}: empty command", path, first[name])
    return jobs


def load_proxy_config(
    path: str | None, overrides: Mapping[str, object] | None = None
) -> ProxyConfig:
    """Load a proxy config (and the API file it names); *overrides* are command-line values."""
    sections = {} if path is None else _load_ini(path)
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
    if api_path is not None:
        assert path is not None and api_line is not None
        api = _load_ini(api_path, "api file", (path, api_line))
        keys, servers = _api(api, api_path)
    return ProxyConfig(
        path=path,
        server=_server_settings(ServerSettings(port=3441), *server, path),
        client=replace(ClientSettings(), **client[0]),
        allow_hosts=allow_hosts,
        api_path=api_path,
        keys=keys,
        servers=servers,
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
                for value, _line in _items(entry):
                    groups = (group.strip(_BLANKS) for group in value.split(","))
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
