"""`deploy-client`'s defaults: the `[client]` section of `~/.config/deploy/client.ini` (or
`--config FILE`) in the original's INI dialect, the `DEPLOY_KEY_CIPHER`/`DEPLOY_API_KEY`
environment variables, and the precedence command line > environment > config file > default."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deploy.output import FORMATS

SECTION = "client"
ENVIRONMENT = {"key_cipher": "DEPLOY_KEY_CIPHER", "api_key": "DEPLOY_API_KEY"}
SECRETS = ("key_cipher", "api_key")
# Paths in the file are relative to the file, so one config works from any directory.
PATH_KEYS = ("ssl_public_key", "ssl_ca", "ssl_cert", "ssl_key")
MAX_CLIENT_CONFIG_BYTES = 1024 * 1024

# Every setting the client resolves, with its default (None: decided later, e.g. the port).
DEFAULTS: dict[str, Any] = {
    "hosts": None,
    "port": None,
    "args": "",
    "key_cipher": "65535",
    "key_id": None,
    "bind_host": False,
    "api_key": "",
    "legacy_auth": False,
    "ssl_public_key": None,
    "ssl_ca": None,
    "ssl_cert": None,
    "ssl_key": None,
    "format": "json",
    "thread_timeout": None,  # 10 s to an agent, 60 s to a proxy: see deploy.cli
    "socket_timeout": 5.0,
    "max_parallel": 64,
    "wait_timeout": 3600.0,
}


class ClientConfigError(Exception):
    """A client config that cannot be used; the message names file:line."""


def _positive_int(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536 * 1024:
        raise ValueError
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < 10**7:
        raise ValueError
    return value


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "on", "yes", "1"):
        return True
    if lowered in ("false", "off", "no", "0"):
        return False
    raise ValueError


def _format(text: str) -> str:
    if text not in FORMATS:
        raise ValueError
    return text


_CONVERTERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "hosts": (str, "host list"),
    "port": (_port, "port number 1-65535"),
    "args": (str, "(groups|hosts):names"),
    "key_cipher": (str, "string"),
    "key_id": (str, "key id"),
    "bind_host": (_bool, "true or false"),
    "api_key": (str, "string"),
    "legacy_auth": (_bool, "true or false"),
    "ssl_public_key": (str, "path"),
    "ssl_ca": (str, "path"),
    "ssl_cert": (str, "path"),
    "ssl_key": (str, "path"),
    "format": (_format, " or ".join(FORMATS)),
    "thread_timeout": (_seconds, "seconds > 0"),
    "socket_timeout": (_seconds, "seconds > 0"),
    "max_parallel": (_positive_int, "number > 0"),
    "wait_timeout": (_seconds, "seconds > 0"),
}


@dataclass
class ClientFileConfig:
    """The values a client config file sets, and what it is worth warning about."""

    path: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def default_path(env: Mapping[str, str]) -> str:
    """`$XDG_CONFIG_HOME/deploy/client.ini`, else `~/.config/deploy/client.ini`."""
    base = env.get("XDG_CONFIG_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".config"
    )
    return os.path.join(base, "deploy", "client.ini")


def load(path: str | None, env: Mapping[str, str]) -> ClientFileConfig:
    """Read `path` (`--config`, which must exist), else the default file if there is one."""
    explicit = path is not None
    path = path if explicit else default_path(env)
    assert path is not None
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(21, "Is a directory")
            data = handle.read(MAX_CLIENT_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if explicit:
            raise ClientConfigError(f"{path}: no such config file") from None
        return ClientFileConfig()
    except OSError as e:
        raise ClientConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    if len(data) > MAX_CLIENT_CONFIG_BYTES:
        raise ClientConfigError(f"{path}: larger than {MAX_CLIENT_CONFIG_BYTES} bytes")
    return parse(data.decode("utf-8-sig", "surrogateescape"), path, mode)


def parse(text: str, path: str, mode: int = 0o600) -> ClientFileConfig:
    """The `[client]` section of a config text; any other section or key is an error."""
    # Imported here: only a run that has a config file pays for the INI module.
    from deploy.config import ConfigError, parse_ini

    try:
        sections = parse_ini(text, path)
    except ConfigError as e:
        raise ClientConfigError(str(e)) from None
    config = ClientFileConfig(path=path)
    base = os.path.dirname(os.path.abspath(path))
    for name, section in sections.items():
        if name != SECTION:
            raise ClientConfigError(
                f"{path}:{section.line}: unknown section [{name}] (expected [{SECTION}])"
            )
        for key, entry in section.entries.items():
            where = f"{path}:{entry.line}"
            if key not in _CONVERTERS:
                known = ", ".join(_CONVERTERS)
                raise ClientConfigError(f"{where}: unknown key {key!r} (known: {known})")
            if isinstance(entry.value, list):
                raise ClientConfigError(f"{where}: write '{key} = value', not '{key}[]'")
            convert, expected = _CONVERTERS[key]
            try:
                value = convert(entry.value)
            except ValueError:
                raise ClientConfigError(
                    f"{where}: {key}: expected {expected}, got {entry.value!r}"
                ) from None
            if key in PATH_KEYS and value:
                value = os.path.join(base, os.path.expanduser(value))
            config.values[key] = value
    present = [k for k in SECRETS if config.values.get(k)]
    readers = [
        who for bit, who in ((stat.S_IRGRP, "its group"), (stat.S_IROTH, "others")) if mode & bit
    ]
    if present and readers:
        config.warnings.append(
            f"{path} holds {' and '.join(present)} and is readable by {' and '.join(readers)}"
            f" (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    return config


def resolve(
    command_line: Mapping[str, Any], env: Mapping[str, str], file: ClientFileConfig
) -> dict[str, Any]:
    """Every setting of DEFAULTS, each from the first place that sets it: the command line
    (a value other than None), the environment (secrets only, when not empty), the config
    file, the default.
    `sources` says where each came from."""
    resolved: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, default in DEFAULTS.items():
        if command_line.get(key) is not None:
            resolved[key], sources[key] = command_line[key], "command line"
        elif key in ENVIRONMENT and env.get(ENVIRONMENT[key]):
            resolved[key], sources[key] = env[ENVIRONMENT[key]], ENVIRONMENT[key]
        elif key in file.values:
            resolved[key], sources[key] = file.values[key], file.path or "config"
        else:
            resolved[key], sources[key] = default, "default"
    resolved["sources"] = sources
    return resolved
