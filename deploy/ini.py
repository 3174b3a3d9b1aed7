"""The INI dialect of the original's config files: `key[] = v` arrays, `;`/`#` comment lines,
`[a::b::c]` sections, the last of a repeated scalar winning, and `ConfigError`s that name
FILE:LINE. What the sections and keys mean is `deploy.config`'s."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_LINE_BYTES = 64 * 1024
MAX_LINES = 100_000
# A config is read whole; this bounds what a wrong path (a log file, a device) can cost.
MAX_CONFIG_BYTES = 16 * 1024 * 1024

# Perl's \s, not Python's str.strip() default that also eats Unicode spaces and \x1c-\x1f.
BLANKS = " \t\r\f\v"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


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


@dataclass
class IniEntry:
    key: str
    value: str | list[str]
    # the line of the value in force: the last one for a repeated scalar, the first for an array
    line: int
    # every line that set this key, in order: one per item of an array, each repeat of a scalar
    lines: list[int] = field(default_factory=list)

    def pairs(self) -> list[tuple[str, int]]:
        """(value, line) pairs, a scalar counting as a one-item list."""
        if isinstance(self.value, list):
            return list(zip(self.value, self.lines, strict=True))
        return [(self.value, self.line)]


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
        line = raw.strip(BLANKS)
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
        raise ConfigError(f"unterminated section header {shown(line)}", path, number)
    name = line[1:-1].strip(BLANKS)
    if not name:
        raise ConfigError("empty section name", path, number)
    if "[" in name or "]" in name:
        raise ConfigError(f"bad section header {shown(line)}", path, number)
    return name


def _key_value(line: str, path: str, number: int) -> tuple[str, str, bool]:
    key, sep, value = line.partition("=")
    if not sep:
        raise ConfigError(f"expected 'key = value' or '[section]', got {shown(line)}", path, number)
    key = key.strip(BLANKS)
    is_array = key.endswith("[]")
    if is_array:
        key = key[:-2].rstrip(BLANKS)
    if not key:
        raise ConfigError("empty key before '='", path, number)
    if "[" in key or "]" in key:
        raise ConfigError(f"bad key {key!r}: only a trailing '[]' may use brackets", path, number)
    # No inline comments, as in the original: a ';' or '#' inside a value is part of the value
    # (exec templates and rsync options may need them).
    value = value.strip(BLANKS)
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


def shown(value: object, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut to `limit` characters."""
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


def load_ini(
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
