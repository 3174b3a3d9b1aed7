"""Converting the daemons' setting values to their types (ports, counts, seconds, booleans, log
levels, strings) from a file's text or a command-line override; a wrong one is a `BadValue`."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from deploy.ini import BLANKS, shown

LOG_LEVELS = ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")
# syslog's own spellings, which operators of the original may have used
_LEVEL_ALIASES = {"err": "error", "warning": "warn"}

_MAX_INT = 2**31 - 1
_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_TRUE = frozenset({"true", "on", "yes", "1"})
_FALSE = frozenset({"false", "off", "no", "0"})


class BadValue(Exception):
    """A value of the wrong type; the caller adds where it came from."""


# A converter takes the name to show (`port` or `--port`) and a raw value: a string from a file
# or the command line, or an already-typed value from an override.
Converter = Callable[[str, object], Any]


def _bad(label: str, expected: str, raw: object) -> BadValue:
    return BadValue(f"{label}: expected {expected}, got {shown(raw)}")


def _int_between(low: int, high: int) -> Converter:
    expected = f"an integer {low}-{high}"

    def convert(label: str, raw: object) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            number = raw
        elif isinstance(raw, str) and _DIGITS.fullmatch(text := raw.strip(BLANKS)):
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


to_port = _int_between(1, 65535)
to_int = _int_between(0, _MAX_INT)


def to_optint(label: str, raw: object) -> int | None:
    return None if raw == "" else to_int(label, raw)


def to_float(label: str, raw: object) -> float:
    expected = "a number >= 0"
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        number = float(raw)
    elif isinstance(raw, str) and _DECIMAL.fullmatch(text := raw.strip(BLANKS)):
        number = float(text)
    else:
        raise _bad(label, expected, raw)
    if not math.isfinite(number) or number < 0:
        raise _bad(label, expected, raw)
    return number


def to_bool(label: str, raw: object) -> bool:
    # ints too: twisted.python.usage flags are 0/1
    if isinstance(raw, bool | int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        word = raw.strip(BLANKS).lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _bad(label, "one of true/false/on/off/yes/no/1/0", raw)


def to_level(label: str, raw: object) -> str:
    expected = f"one of {'/'.join(LOG_LEVELS)} or 0-7"
    if isinstance(raw, int) and not isinstance(raw, bool):
        if 0 <= raw < len(LOG_LEVELS):
            return LOG_LEVELS[raw]
        raise _bad(label, expected, raw)
    if isinstance(raw, str):
        word = raw.strip(BLANKS).lower()
        word = _LEVEL_ALIASES.get(word, word)
        if word in LOG_LEVELS:
            return word
        if len(word) == 1 and "0" <= word <= "7":
            return LOG_LEVELS[int(word)]
    raise _bad(label, expected, raw)


def to_str(label: str, raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise _bad(label, "a non-empty value", raw)
    return raw


def to_optstr(label: str, raw: object) -> str | None:
    # an empty value means unset, like a commented-out line
    if not isinstance(raw, str):
        raise _bad(label, "a string", raw)
    return raw or None


_BY_TYPE: dict[str, Converter] = {
    "int": to_int,
    "float": to_float,
    "bool": to_bool,
    "str": to_str,
    "str | None": to_optstr,
}
_BY_NAME: dict[str, Converter] = {
    "port": to_port,
    "log_error_level": to_level,
    "metrics_port": _int_between(0, 65535),  # 0: no metrics
}


def converters_for(cls: type) -> dict[str, Converter]:
    """field name → converter for the settings dataclass `cls`."""
    # annotations are strings here (from __future__ import annotations)
    return {f.name: _BY_NAME.get(f.name) or _BY_TYPE[str(f.type)] for f in fields(cls)}
