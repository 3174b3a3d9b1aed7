"""The incremental parser of rsync's output: `--itemize-changes` names (with rsync's `\\#ooo`
escapes), the `--stats` block (3.0 and 3.1+ formats) and `--info=progress2` records, fed in chunks
as the child writes them, the tail of its stderr, and its environment. No Twisted, and no
dataclasses (their import costs ~10 ms): the sync supervisor uses it too (it starts once per
sync)."""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable
from typing import NamedTuple

OTHER_LINES_KEPT = 50

# rsync escapes a non-printable byte as \#ooo, and a literal backslash that would read as
# such an escape as \#134, so every \#ooo in its output is an escape.
_ESCAPE = re.compile(rb"\\#([0-3][0-7]{2})")
_ESCAPED_BYTES = {b"%03o" % value: bytes((value,)) for value in range(256)}


def _unescape_match(match: re.Match[bytes]) -> bytes:
    return _ESCAPED_BYTES[match.group(1)]


def unescape_name(raw: bytes) -> str:
    """Decode rsync's \\#ooo escapes; bytes that are not UTF-8 survive as surrogates."""
    return unescape_bytes(raw).decode("utf-8", "surrogateescape")


def unescape_bytes(raw: bytes) -> bytes:
    """The name's own bytes: rsync's \\#ooo escapes decoded."""
    return _ESCAPE.sub(_unescape_match, raw) if b"\\#" in raw else raw


_SURROGATES = re.compile("[\udc80-\udcff]")


def display_name(name: str) -> str:
    """A file name for JSON: as is when it is UTF-8, else with rsync's own `\\#ooo` escapes for
    the bytes that are not (JSON cannot carry them)."""
    if not _SURROGATES.search(name):
        return name
    return _SURROGATES.sub(lambda m: f"\\#{ord(m.group()) - 0xDC00:03o}", name)


def _display(name: str) -> str:
    return display_name(unescape_name(name.encode("utf-8", "surrogateescape")))


class RsyncStats:
    """The numbers of rsync's --stats block (3.0 and 3.1+ formats); None when not printed."""

    NAMES = (
        "files",
        "files_transferred",
        "created",
        "deleted",
        "total_file_size",
        "transferred_size",
        "literal_data",
        "matched_data",
        "bytes_sent",
        "bytes_received",
    )
    files: int | None
    files_transferred: int | None
    created: int | None
    deleted: int | None
    total_file_size: int | None
    transferred_size: int | None
    literal_data: int | None
    matched_data: int | None
    bytes_sent: int | None
    bytes_received: int | None

    def __init__(self, **numbers: int | None) -> None:
        for name in self.NAMES:
            setattr(self, name, numbers.pop(name, None))
        if numbers:
            raise TypeError(f"not an rsync stat: {', '.join(numbers)}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RsyncStats) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return f"RsyncStats({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def clock_seconds(text: str | None) -> int | None:
    """rsync's `H:MM:SS` as seconds; None for anything else (it prints `??:??:??` past 99 h)."""
    parts = (text or "").split(":")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    hours, minutes, seconds = (int(p) for p in parts)
    return hours * 3600 + minutes * 60 + seconds


def clock(seconds: float) -> str:
    """Seconds as rsync prints a time: `H:MM:SS`."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


_RATE = re.compile(r"(\d+(?:\.\d+)?)([kMG])B/s")
_RATE_UNITS = {"k": 1024, "M": 1024**2, "G": 1024**3}


def bytes_per_second(rate: str) -> float | None:
    """rsync's `2.06MB/s` (units of 1024) in bytes per second; None for anything else."""
    match = _RATE.fullmatch(rate)
    if match is None:
        return None
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


class Progress(NamedTuple):
    """One --info=progress2 record: whole-transfer bytes and percent, the rate as printed, and
    its time as rsync means it. In the middle of a transfer rsync prints the time remaining
    (`eta`); on the record that ends a file, the one followed by `(xfr#N, to-chk=M/T)`, the time
    elapsed since the transfer began (`elapsed`). The other one is None."""

    bytes: int
    percent: int
    rate: str
    eta: str | None
    elapsed: str | None = None

    def remaining(self) -> str | None:
        """The time left: as rsync printed it, else the bytes left at the average rate so far
        (what rsync prints on a record that ends a file), or at the pace of the elapsed time
        when the rate does not parse; None before a whole percent is done."""
        if self.eta is not None:
            return self.eta if clock_seconds(self.eta) is not None else None
        if self.percent <= 0:
            return None
        left = (100 - min(self.percent, 100)) / self.percent  # of what is done so far
        rate = bytes_per_second(self.rate)
        if rate:
            return clock(self.bytes * left / rate)
        elapsed = clock_seconds(self.elapsed)
        return None if elapsed is None else clock(elapsed * left)


_SEPARATORS = re.compile(rb"[\r\n]")

# YXcstpoguax: Y the update type, X the file type, then 9 attribute columns (7 in
# rsync 2.6); an identical item prints its columns as spaces.
_ITEMIZE = re.compile(rb"([<>ch.])([fdLDS])[-.+ ?a-zA-Z]{7,9} (.*)", re.DOTALL)
_PROGRESS = re.compile(rb"\s*(\d[\d,]*)\s+(\d{1,3})%\s+(\S+)\s+(\S+)(\s+\(xfr#)?")
_STATS = re.compile(
    rb"(Number of files|Number of created files|Number of deleted files"
    rb"|Number of regular files transferred|Number of files transferred"
    rb"|Total file size|Total transferred file size|Literal data|Matched data"
    rb"|Total bytes sent|Total bytes received): (\d[\d,]*)"
)
_KINDS = re.compile(rb"(\w+): (\d[\d,]*)")
# Lines of the stats block and of -v that carry nothing the callers use.
_NOISE = re.compile(
    rb"File list (?:size|generation time|transfer time): "
    rb"|sent \d[\d,]* bytes +received "
    rb"|total size is \d"
    rb"|(?:sending|receiving) incremental file list$"
)
_STATS_FIELDS = {
    b"Number of files": "files",
    b"Number of created files": "created",
    b"Number of deleted files": "deleted",
    b"Number of regular files transferred": "files_transferred",
    b"Number of files transferred": "files_transferred",
    b"Total file size": "total_file_size",
    b"Total transferred file size": "transferred_size",
    b"Literal data": "literal_data",
    b"Matched data": "matched_data",
    b"Total bytes sent": "bytes_sent",
    b"Total bytes received": "bytes_received",
}
_DELETING = b"*deleting"
_CREATED_DIRECTORY = b"created directory "
_NEW_TYPES = frozenset(b"<>ch")
_DIRECTORY = ord("d")
_SYMLINK = ord("L")
_HARDLINK = ord("h")
_SPACE = ord(" ")
_STAR = ord("*")


def _number(digits: bytes) -> int:
    return int(digits.replace(b",", b""))


class RsyncOutputParser:
    """Fed stdout bytes in arbitrary chunks; splits records at both \\n and \\r; keeps a
    partial last record between feeds; never raises on any input."""

    def __init__(
        self,
        *,
        keep_lists: bool = True,
        max_line: int = 65536,
        on_progress: Callable[[Progress], None] | None = None,
        on_item: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        self.keep_lists = keep_lists
        self.max_line = max(1, max_line)
        self.on_progress = on_progress
        # each itemized line: its code (`*deleting` for a deletion) and its name, unescaped
        self.on_item = on_item
        self.stats = RsyncStats()
        self.progress: Progress | None = None
        # Raw (still escaped) names, each ended by \n: a 150,000-file list stays one ~5 MB
        # buffer instead of 150,000 str objects (~3x the memory), and decoding waits for the end.
        self._new_names = bytearray()
        self.deleted_files: list[str] = []
        # What a sync deletes that is not a directory, as rlist lists it, kept lists or not.
        self.delete_count = 0
        self.created_directory: str | None = None
        # `Number of files` by kind (reg, dir, link, ...), as rsync 3.1+ prints it
        self.file_kinds: dict[str, int] | None = None
        self.other_lines: collections.deque[str] = collections.deque(maxlen=OTHER_LINES_KEPT)
        self._partial = bytearray()
        # Width of the itemize code last seen: "*deleting" is padded to it.
        self._code_width = 11

    @property
    def new_files(self) -> list[str]:
        """The created/updated names, decoded (bytes that are not UTF-8 as surrogates)."""
        return [unescape_name(raw) for raw in bytes(self._new_names).split(b"\n")[:-1]]

    def display_new_files(self) -> list[str]:
        """`new_files` as JSON can carry them (see `display_name`), decoded in one pass: only
        the names with an escape or a byte that is not UTF-8 take the slow road."""
        text = self._new_names.decode("utf-8", "surrogateescape")
        names = text.split("\n")
        names.pop()
        if _SURROGATES.search(text):
            return [_display(n) if "\\#" in n or _SURROGATES.search(n) else n for n in names]
        if "\\#" in text:
            return [_display(n) if "\\#" in n else n for n in names]
        return names

    def feed(self, data: bytes) -> None:
        """Parse every record `data` completes; keep the rest for the next feed."""
        parts = _SEPARATORS.split(data)
        if len(parts) == 1:
            self._keep_partial(data)
            return
        limit = self.max_line
        first = parts[0]
        if self._partial:
            self._partial += first[: limit - len(self._partial)]
            first = bytes(self._partial)
            self._partial.clear()
        self._record(first[:limit])
        for record in parts[1:-1]:
            self._record(record[:limit])
        self._keep_partial(parts[-1])

    def close(self) -> None:
        """Parse the partial last record, if any (the child ended without a newline)."""
        if self._partial:
            record = bytes(self._partial)
            self._partial.clear()
            self._record(record)

    def _keep_partial(self, data: bytes) -> None:
        # A record longer than max_line is truncated, so memory stays bounded.
        room = self.max_line - len(self._partial)
        if room > 0 and data:
            self._partial += data[:room]

    def _record(self, line: bytes) -> None:
        if not line:
            return
        first = line[0]
        if first == _SPACE:
            match = _PROGRESS.match(line)
            if match is not None:
                self._progress(match)
                return
        elif first == _STAR:
            if line.startswith(_DELETING):
                name = line[self._code_width + 1 :]
                if name and not name.endswith(b"/"):
                    self.delete_count += 1
                if self.keep_lists and name:
                    self.deleted_files.append(unescape_name(name))
                if self.on_item is not None and name:
                    self.on_item(_DELETING, unescape_bytes(name))
                return
        else:
            match = _ITEMIZE.match(line)
            if match is not None:
                self._itemized(line, match)
                return
            match = _STATS.match(line)
            if match is not None:
                field = _STATS_FIELDS[match.group(1)]
                setattr(self.stats, field, _number(match.group(2)))
                if field == "files":  # 3.1+: "Number of files: 201 (reg: 200, dir: 1)"
                    kinds = _KINDS.findall(line, match.end())
                    self.file_kinds = {k.decode(): _number(n) for k, n in kinds} or None
                return
            if line.startswith(_CREATED_DIRECTORY):
                self.created_directory = unescape_name(line[len(_CREATED_DIRECTORY) :])
                return
            if _NOISE.match(line):
                return
        self.other_lines.append(line.decode("utf-8", "replace"))

    def _itemized(self, line: bytes, match: re.Match[bytes]) -> None:
        name_start = match.start(3)
        self._code_width = name_start - 1
        if self.on_item is not None:
            self.on_item(line[: name_start - 1], unescape_bytes(match.group(3)))
        if not self.keep_lists:
            return
        update_type = line[0]
        file_type = line[1]
        if update_type not in _NEW_TYPES or file_type == _DIRECTORY:
            return
        name = match.group(3)
        # rsync appends " -> target" to a symlink and " => target" to a hard link; a
        # name that itself holds that arrow is ambiguous, the first arrow wins.
        if file_type == _SYMLINK:
            name = name.split(b" -> ", 1)[0]
        elif update_type == _HARDLINK:
            name = name.split(b" => ", 1)[0]
        self._new_names += name
        self._new_names += b"\n"  # rsync escapes a newline in a name (\#012): a safe separator

    def _progress(self, match: re.Match[bytes]) -> None:
        time = match.group(4).decode("ascii", "replace")
        ends_a_file = match.group(5) is not None
        progress = Progress(
            bytes=_number(match.group(1)),
            percent=int(match.group(2)),
            rate=match.group(3).decode("ascii", "replace"),
            eta=None if ends_a_file else time,
            elapsed=time if ends_a_file else None,
        )
        self.progress = progress
        if self.on_progress is not None:
            self.on_progress(progress)


class TailBuffer:
    """Keeps the last `limit` bytes of a stream, split into lines on demand."""

    def __init__(self, limit: int = 8192) -> None:
        self.limit = max(1, limit)
        self.truncated = False
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        # Trim only once the buffer doubles, so feeding stays linear in the input.
        if len(self._buffer) > 2 * self.limit:
            del self._buffer[: -self.limit]
            self.truncated = True

    def _tail(self) -> bytes:
        tail = bytes(self._buffer[-self.limit :])
        if self.truncated or len(self._buffer) > self.limit:
            # The first line was cut (maybe mid-character): drop it if a whole line follows.
            newline = tail.find(b"\n")
            if 0 <= newline < len(tail) - 1:
                tail = tail[newline + 1 :]
        return tail

    def text(self) -> str:
        return self._tail().decode("utf-8", "replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()


def rsync_environment() -> dict[str, str]:
    """The agent's environment with LC_ALL=C, so rsync does not localise numbers."""
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env
