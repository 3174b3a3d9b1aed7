"""Tests for deploy.rsync: argv building, the output parser, and real rsync children."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from deploy.rsync import (
    DEFAULT_FLAGS,
    FORCED_FLAGS,
    Progress,
    RsyncOutputParser,
    RsyncProcessProtocol,
    RsyncResult,
    RsyncStats,
    RsyncTarget,
    TailBuffer,
    build_argv,
    run_rsync,
    unescape_name,
)

REFERENCE = Path(__file__).parent / "data" / "rsync"
REFERENCE_FILES = sorted(REFERENCE.glob("*.out"))

ITEMIZED_NAMES = [
    "back\\slash",
    "big.bin",
    "bin\udcffname",
    "new\nline",
    'q"uote',
    "a/deleting x",
    "a/f1",
    "a/f2",
    "a/f3",
    "a/f4",
    "a/f5",
    "a/b/with space",
]
STATS_35 = {
    "files": 15,
    "files_transferred": 12,
    "created": 14,
    "deleted": 1,
    "total_file_size": 3145747,
    "transferred_size": 3145747,
    "matched_data": 0,
}


def rsync_output(name: str) -> bytes:
    """The stdout bytes of a reference sample, without its trailing "exit N" line.

    The 3.0 sample was written by hand and has no "exit N" line.
    """
    data = (REFERENCE / name).read_bytes()
    body, _, last = data.rstrip(b"\n").rpartition(b"\n")
    if re.fullmatch(rb"exit \d+", last):
        return body + b"\n"
    return data


def parse(data: bytes, chunk: int | None = None, **kwargs: Any) -> RsyncOutputParser:
    parser = RsyncOutputParser(**kwargs)
    if chunk is None:
        parser.feed(data)
    else:
        for start in range(0, len(data), chunk):
            parser.feed(data[start : start + chunk])
    parser.close()
    return parser


def snapshot(parser: RsyncOutputParser) -> tuple[Any, ...]:
    return (
        parser.stats,
        parser.progress,
        parser.new_files,
        parser.deleted_files,
        parser.created_directory,
        list(parser.other_lines),
    )


def stats_dict(stats: RsyncStats) -> dict[str, int | None]:
    return dict(vars(stats))


# --- reference samples ------------------------------------------------------------------


def test_reference_samples_exist() -> None:
    """The reference rsync outputs this module is tested against are all present."""
    assert {p.name for p in REFERENCE_FILES} >= {
        "rsync-3.0-stats-format.out",
        "rsync-3.5-daemon-down.out",
        "rsync-3.5-dryrun-itemize-stats.out",
        "rsync-3.5-dryrun-verbose-stats.out",
        "rsync-3.5-real-itemize-progress2.out",
    }


def test_dryrun_itemize_stats_sample() -> None:
    """A 3.5 dry run yields the 12 decoded file names, the one deletion and the stats."""
    parser = parse(rsync_output("rsync-3.5-dryrun-itemize-stats.out"))
    assert parser.new_files == ITEMIZED_NAMES
    assert parser.deleted_files == ["stale"]
    assert parser.created_directory is None
    assert parser.progress is None
    assert list(parser.other_lines) == []
    assert stats_dict(parser.stats) == {
        **STATS_35,
        "literal_data": 0,
        "bytes_sent": 380,
        "bytes_received": 76,
    }


def test_number_of_files_by_kind() -> None:
    """rsync 3.1+'s breakdown of `Number of files` (reg, dir, link, ...) is kept by kind, in
    any chunking; rsync 3.0 prints none (None); so does a run that printed no stats."""
    for chunk in (None, 1, 7):
        parser = parse(rsync_output("rsync-3.5-real-itemize-progress2.out"), chunk)
        assert parser.stats.files == 15 and parser.file_kinds == {"reg": 12, "dir": 3}
    parser = parse(b"Number of files: 1,204 (reg: 1,200, dir: 3, link: 1)\n")
    assert parser.file_kinds == {"reg": 1200, "dir": 3, "link": 1}
    assert parse(rsync_output("rsync-3.0-stats-format.out")).file_kinds is None
    assert parse(b"sent 10 bytes  received 20 bytes\n").file_kinds is None


def test_real_progress2_sample() -> None:
    """A real 3.5 run with progress2 interleaved by \\r gives the same names and final progress."""
    seen: list[Progress] = []
    parser = parse(rsync_output("rsync-3.5-real-itemize-progress2.out"), on_progress=seen.append)
    assert parser.new_files == ITEMIZED_NAMES
    assert parser.deleted_files == ["stale"]
    assert list(parser.other_lines) == []
    # The last record ends a file: its time is the time elapsed, and nothing remains.
    final = Progress(bytes=3145747, percent=100, rate="2.05MB/s", eta=None, elapsed="0:00:01")
    assert parser.progress == final and final.remaining() == "0:00:00"
    assert seen[0] == Progress(bytes=1, percent=0, rate="0.00kB/s", eta="0:00:00")
    assert seen[1] == Progress(1, 0, "0.00kB/s", eta=None, elapsed="0:00:00")
    assert parser.delete_count == 1
    assert len(seen) == 17
    assert [p.bytes for p in seen] == sorted(p.bytes for p in seen)
    assert stats_dict(parser.stats) == {
        **STATS_35,
        "literal_data": 3145747,
        "bytes_sent": 3147367,
        "bytes_received": 272,
    }


def test_progress_time_is_remaining_mid_file_and_elapsed_as_a_file_ends() -> None:
    """rsync prints the time remaining in the middle of a transfer and the time elapsed on the
    record that ends a file (`xfr#`): `eta` is the time left either way, and falls as the sync
    proceeds (issue 15: it used to be the elapsed time, climbing)."""
    seen: list[Progress] = []
    # 1,024,000 bytes at 10 kB/s: 100 s in all.
    records = [
        "        102,400  10%   10.00kB/s    0:01:30  ",
        "        266,240  26%   10.00kB/s    0:00:26 (xfr#3, to-chk=70/100)",
        "        512,000  50%   10.00kB/s    0:00:50 (xfr#9, ir-chk=40/100)",
        "        716,800  70%   10.00kB/s    0:00:29  ",
        "        921,600  90%   10.00kB/s    0:01:30 (xfr#90, to-chk=10/100)",
        "        972,800  95%   10.00kB/s  ??:??:??  ",
    ]
    parse(("\r" + "\r".join(records) + "\n").encode(), on_progress=seen.append)
    assert [(p.eta, p.elapsed) for p in seen] == [
        ("0:01:30", None),
        (None, "0:00:26"),
        (None, "0:00:50"),
        ("0:00:29", None),
        (None, "0:01:30"),
        ("??:??:??", None),
    ]
    assert [p.remaining() for p in seen] == [
        "0:01:30",
        "0:01:14",
        "0:00:50",
        "0:00:29",
        "0:00:10",
        None,
    ]
    # The issue's case: at 26% with about 2 MB left at 96 kB/s the time left is 20 s, not the
    # 3 s elapsed.
    issue = Progress(700_000, 26, "96.00kB/s", eta=None, elapsed="0:00:03")
    assert issue.remaining() == "0:00:20"
    assert Progress(5, 50, "?", eta=None, elapsed="0:00:10").remaining() == "0:00:10"
    assert Progress(0, 0, "0.00kB/s", eta=None, elapsed="0:00:03").remaining() is None


def test_delete_count_counts_what_rlist_lists_with_or_without_lists() -> None:
    """`*deleting` lines count, directories aside (rlist lists files only), kept lists or not:
    status reports deletions with it."""
    text = b"*deleting   old/a\n*deleting   old/b\n*deleting   old/\n>f+++++++++ new\n"
    for keep in (True, False):
        parser = parse(text, keep_lists=keep)
        assert parser.delete_count == 2
        assert parser.deleted_files == (["old/a", "old/b", "old/"] if keep else [])


def test_rsync30_stats_sample() -> None:
    """rsync 3.0's stats block (plain digits, "Number of files transferred") parses."""
    parser = parse(rsync_output("rsync-3.0-stats-format.out"))
    assert stats_dict(parser.stats) == {
        "files": 2340,
        "files_transferred": 1205,
        "created": None,
        "deleted": None,
        "total_file_size": 51255829,
        "transferred_size": 24854724,
        "literal_data": 24854724,
        "matched_data": 0,
        "bytes_sent": 30,
        "bytes_received": 40604,
    }


@pytest.mark.parametrize(
    "name", ["rsync-3.0-stats-format.out", "rsync-3.5-dryrun-verbose-stats.out"]
)
def test_verbose_listing_is_not_itemized(name: str) -> None:
    """-v output ("deleting x", bare names) is ambiguous, so it is kept as text, not as lists."""
    parser = parse(rsync_output(name))
    assert parser.new_files == []
    assert parser.deleted_files == []
    assert "deleting stale" in parser.other_lines
    assert "receiving incremental file list" not in parser.other_lines
    assert "sending incremental file list" not in parser.other_lines


def test_verbose_sample_stats() -> None:
    """The -v sample's stats block parses like the itemized one."""
    parser = parse(rsync_output("rsync-3.5-dryrun-verbose-stats.out"))
    assert stats_dict(parser.stats) == {
        **STATS_35,
        "literal_data": 0,
        "bytes_sent": 376,
        "bytes_received": 76,
    }


def test_daemon_down_sample() -> None:
    """Error text on stdout is kept in other_lines and fills no stats."""
    parser = parse(rsync_output("rsync-3.5-daemon-down.out"))
    assert stats_dict(parser.stats) == dict.fromkeys(stats_dict(RsyncStats()))
    assert parser.other_lines[0].startswith("rsync: [Receiver] failed to connect to 127.0.0.1")
    assert "(code 10)" in parser.other_lines[1]


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=lambda p: p.name)
def test_reference_chunking_is_invisible(path: Path) -> None:
    """Feeding a sample in chunks of every size 1..64 gives exactly the one-feed result."""
    data = rsync_output(path.name)
    expected = snapshot(parse(data))
    for chunk in range(1, 65):
        assert snapshot(parse(data, chunk)) == expected, chunk


def test_keep_lists_false_keeps_counts_only() -> None:
    """keep_lists=False leaves the name lists empty but still fills stats and progress."""
    parser = parse(rsync_output("rsync-3.5-real-itemize-progress2.out"), keep_lists=False)
    assert parser.new_files == []
    assert parser.deleted_files == []
    assert parser.stats.files_transferred == 12
    assert parser.progress is not None and parser.progress.percent == 100


# --- parser details -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"new\\#012line", "new\nline"),
        (b"bin\\#377name", "bin\udcffname"),
        (b"caf\\#303\\#251", "café"),
        (b"back\\slash", "back\\slash"),
        (b"back\\#134#123", "back\\#123"),
        (b"short\\#12", "short\\#12"),
        (b"notoctal\\#189", "notoctal\\#189"),
        (b"toobig\\#777", "toobig\\#777"),
        (b"tab\tname", "tab\tname"),
        ("café".encode(), "café"),
    ],
)
def test_unescape_name(raw: bytes, expected: str) -> None:
    """Only \\#ooo (octal byte) escapes are decoded; other backslashes stay literal."""
    assert unescape_name(raw) == expected


def test_unescape_round_trips_non_utf8() -> None:
    """Bytes that are not UTF-8 come back unchanged through surrogateescape."""
    name = unescape_name(b"x\\#377\\#376y")
    assert name.encode("utf-8", "surrogateescape") == b"x\xff\xfey"


@pytest.mark.parametrize(
    ("line", "new_files"),
    [
        (b">f+++++++++ plain", ["plain"]),
        (b"<f.st...... sent", ["sent"]),
        (b"cL+++++++++ link -> target", ["link"]),
        (b"cL+++++++++ link -> a -> b", ["link"]),
        (b">f+++++++++ file -> not a link", ["file -> not a link"]),
        (b"hf+++++++++ hard => other", ["hard"]),
        (b"cD+++++++++ dev", ["dev"]),
        (b">f+++++++++   leading spaces", ["  leading spaces"]),
        (b">f+++++++ old9", ["old9"]),
        (b">f.st...... tab\tname", ["tab\tname"]),
        (b"cd+++++++++ dir/", []),
        (b".d..t...... ./", []),
        (b".f          identical", []),
        (b".f...p..... attrs-only", []),
    ],
)
def test_itemize_line_kinds(line: bytes, new_files: list[str]) -> None:
    """Created/updated non-directories are listed by name; links lose their target."""
    parser = parse(line + b"\n")
    assert parser.new_files == new_files
    assert list(parser.other_lines) == []


def test_deleting_lines() -> None:
    """*deleting takes everything after the 12-column prefix, keeping a dir's "/"."""
    data = b"*deleting   gone dir/inner\n*deleting   gone dir/\n*deleting     spaced\n"
    assert parse(data).deleted_files == ["gone dir/inner", "gone dir/", "  spaced"]


def test_deleting_follows_old_code_width() -> None:
    """With 9-column itemize codes (rsync 2.6) the deleting prefix is 10 columns."""
    parser = parse(b">f+++++++ a\n*deleting old\n")
    assert parser.deleted_files == ["old"]


def test_created_directory() -> None:
    """The "created directory" line is decoded and does not count as a file."""
    parser = parse(b"created directory nd\\#377\\#012x\ncd+++++++++ ./\n>f+++++++++ f\n")
    assert parser.created_directory == "nd\udcff\nx"
    assert parser.new_files == ["f"]


def test_partial_last_record_needs_close() -> None:
    """A record without a trailing newline is parsed only on close()."""
    parser = RsyncOutputParser()
    parser.feed(b">f+++++++++ a\n>f+++++++++ b")
    assert parser.new_files == ["a"]
    parser.close()
    assert parser.new_files == ["a", "b"]
    parser.close()
    assert parser.new_files == ["a", "b"]


def test_crlf_and_cr_both_split() -> None:
    """\\r, \\n and \\r\\n all end a record and leave no empty messages."""
    parser = parse(b">f+++++++++ a\r\n>f+++++++++ b\r>f+++++++++ c\n\n\r")
    assert parser.new_files == ["a", "b", "c"]
    assert list(parser.other_lines) == []


def test_other_lines_are_bounded() -> None:
    """Only the last 50 unrecognised lines are kept, decoded with replacement."""
    parser = parse(b"".join(b"message %d\n" % i for i in range(200)) + b"bad \xff\n")
    assert len(parser.other_lines) == 50
    assert parser.other_lines[0] == "message 151"
    assert parser.other_lines[-1] == "bad \ufffd"


def test_long_line_is_truncated() -> None:
    """A record longer than max_line is cut to max_line bytes and buffering stays bounded."""
    parser = RsyncOutputParser(max_line=100)
    parser.feed(b">f+++++++++ ")
    for _ in range(1000):
        parser.feed(b"x" * 1000)
        assert len(parser._partial) <= 100
    parser.feed(b"\n>f+++++++++ next\n")
    assert parser.new_files == ["x" * 88, "next"]


@pytest.mark.parametrize("chunk", [1, 7, 100, 101, 4096])
def test_long_line_truncation_ignores_chunking(chunk: int) -> None:
    """Truncation of long records gives the same result whatever the chunk size."""
    data = b">f+++++++++ " + b"y" * 500 + b"\nmsg " + b"z" * 300 + b"\r>f+++++++++ ok"
    assert snapshot(parse(data, chunk, max_line=100)) == snapshot(parse(data, max_line=100))


def test_large_output_parses_whole() -> None:
    """150,000 itemized lines interleaved with progress records all parse, fed in 64 KiB chunks
    (speed is measured in bench/, not here)."""
    lines = []
    for i in range(150_000):
        lines.append(b">f+++++++++ dir%d/caf\\#303\\#251%d" % (i % 100, i))
        if i % 10 == 0:
            lines.append(b"\r      %d  50%%    2.06MB/s    0:00:01 (xfr#1, to-chk=1/2)" % i)
    data = b"\n".join(lines) + b"\n"
    parser = RsyncOutputParser()
    for start in range(0, len(data), 65536):
        parser.feed(data[start : start + 65536])
    parser.close()
    assert len(parser.new_files) == 150_000
    assert parser.new_files[-1] == "dir99/café149999"
    assert parser.progress is not None and parser.progress.bytes == 149_990


@settings(max_examples=200)
@given(
    data=st.binary(max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
    max_line=st.integers(min_value=1, max_value=300),
)
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int], max_line: int) -> None:
    """Any bytes in any chunks parse without raising, exactly as in one feed."""
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    parser = RsyncOutputParser(max_line=max_line)
    for start, end in zip(bounds, bounds[1:], strict=False):
        parser.feed(data[start:end])
    parser.close()
    assert snapshot(parser) == snapshot(parse(data, max_line=max_line))


_ALPHABET = st.sampled_from(
    [b">f+++++++++ ", b"*deleting   ", b"cL+++++++++ ", b"hf+++++++++ ", b" -> ", b" => "]
    + [b"Number of files: ", b"Total file size: ", b"  1,234  12%  1kB/s  0:00:01"]
    + [b"\\#", b"377", b"\n", b"\r", b",", b"9", b" ", b"\xff", b"created directory "]
)


@settings(max_examples=200)
@given(parts=st.lists(_ALPHABET, max_size=60), chunk=st.integers(min_value=1, max_value=40))
def test_rsync_like_bytes_never_raise(parts: list[bytes], chunk: int) -> None:
    """Fragments of real rsync syntax in any order and chunking never raise."""
    data = b"".join(parts)
    assert snapshot(parse(data, chunk)) == snapshot(parse(data))


# --- argv ---------------------------------------------------------------------------------


def test_build_argv_defaults() -> None:
    """Forced flags, then the default flags, then "--" and the two paths."""
    target = RsyncTarget(dest="host::MOD/path", src="/srv/www")
    assert build_argv(target, dry_run=False) == [
        "rsync",
        *FORCED_FLAGS,
        *DEFAULT_FLAGS,
        "--",
        "host::MOD/path",
        "/srv/www",
    ]


def test_build_argv_every_option() -> None:
    """Configured options replace the defaults; extras come in a fixed order."""
    target = RsyncTarget(
        dest="rsync://host:8873/MOD//deep/",
        src="/srv/www/",
        rsync="/opt/bin/rsync",
        rsh="ssh -p 2222",
        options=("--recursive", "--times"),
        excludes=("*.tmp", "cache/"),
        includes=("keep.tmp",),
        max_delete=0,
    )
    assert build_argv(target, dry_run=True, progress=True) == [
        "/opt/bin/rsync",
        "--stats",
        "--itemize-changes",
        "--sockopts=TCP_NODELAY",
        "--recursive",
        "--times",
        "--dry-run",
        "--info=progress2",
        "--rsh=ssh -p 2222",
        "--max-delete=0",
        "--include=keep.tmp",
        "--exclude=*.tmp",
        "--exclude=cache/",
        "--",
        "rsync://host:8873/MOD//deep/",
        "/srv/www/",
    ]


def test_build_argv_empty_options_mean_none() -> None:
    """An empty options tuple replaces the defaults with nothing, unlike None."""
    argv = build_argv(RsyncTarget(dest="h::M", src="/d", options=()), dry_run=False)
    assert argv == ["rsync", *FORCED_FLAGS, "--", "h::M", "/d"]


@pytest.mark.parametrize(
    ("dest", "src"),
    [("-e sh", "/d"), ("h::M", "--delete"), ("", "/d"), ("h::M", "")],
)
def test_build_argv_refuses_option_like_paths(dest: str, src: str) -> None:
    """A path that is empty or starts with "-" is refused before any process runs."""
    with pytest.raises(ValueError):
        build_argv(RsyncTarget(dest=dest, src=src), dry_run=True)


def test_checksum_is_md5_of_dest_and_src() -> None:
    """The job id is md5hex(dest + src), as the original agent computed it."""
    target = RsyncTarget(dest="host::MOD/", src="/srv/é")
    assert target.checksum == hashlib.md5("host::MOD//srv/é".encode()).hexdigest()


# --- stderr tail and process protocol -----------------------------------------------------


def test_tail_buffer_keeps_last_bytes() -> None:
    """Only the end of stderr is kept; a cut first line is dropped."""
    tail = TailBuffer(limit=20)
    for i in range(100):
        tail.feed(b"line %02d\n" % i)
        assert len(tail._buffer) <= 40
    assert tail.text() == "line 98\nline 99\n"
    assert tail.lines() == ["line 98", "line 99"]


def test_tail_buffer_short_stream_is_whole() -> None:
    """A stream shorter than the limit is returned whole, decoded with replacement."""
    tail = TailBuffer()
    tail.feed(b"rsync: oops \xff\n")
    tail.feed(b"rsync error: code 23")
    assert tail.text() == "rsync: oops \ufffd\nrsync error: code 23"


def test_protocol_routes_output_and_fires_once() -> None:
    """stdout goes to the parser, stderr to the tail; ended fires once with the exit code."""
    parser = RsyncOutputParser()
    proto = RsyncProcessProtocol(parser)
    results: list[RsyncResult] = []
    proto.ended.addCallback(results.append)
    proto.childDataReceived(1, b">f+++++++++ a\n>f+++++++++ b")
    proto.childDataReceived(2, b"rsync: some files vanished\n")
    proto.processEnded(Failure(ProcessTerminated(exitCode=24)))
    proto.processEnded(Failure(ProcessDone(0)))
    [result] = results
    assert result.exit_code == 24
    assert result.signal is None
    assert not result.ok
    assert result.parser.new_files == ["a", "b"]
    assert result.stderr == "rsync: some files vanished\n"


def test_protocol_reports_signal() -> None:
    """A child killed by a signal ends with that signal and no exit code."""
    proto = RsyncProcessProtocol(RsyncOutputParser())
    results: list[RsyncResult] = []
    proto.ended.addCallback(results.append)
    proto.processEnded(Failure(ProcessTerminated(signal=15)))
    assert (results[0].exit_code, results[0].signal, results[0].ok) == (None, 15, False)


class FakeTransport:
    def __init__(self) -> None:
        self.stdin_closed = False

    def closeStdin(self) -> None:
        self.stdin_closed = True


class FakeReactor:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.transport = FakeTransport()

    def spawnProcess(self, proto, executable, args, env, usePTY, childFDs):
        self.calls.append((proto, executable, args, env, usePTY, childFDs))
        return self.transport


def test_run_rsync_spawn_arguments() -> None:
    """rsync is resolved on PATH, spawned without PTY or shell, LC_ALL=C, stdin closed."""
    reactor = FakeReactor()
    parser = RsyncOutputParser()
    argv = ["rsync", "--stats", "--", "h::M/", "/d"]
    proto, transport = run_rsync(reactor, argv, parser)
    [(spawned, executable, args, env, use_pty, child_fds)] = reactor.calls
    assert spawned is proto and proto.parser is parser
    assert os.path.isabs(executable) and os.path.basename(executable) == "rsync"
    assert args == argv
    assert env["LC_ALL"] == "C" and env.get("PATH") == os.environ.get("PATH")
    assert use_pty is False
    assert child_fds == {0: "w", 1: "r", 2: "r"}
    assert transport is reactor.transport and transport.stdin_closed


def test_run_rsync_given_env_is_used_as_is() -> None:
    """An explicit environment is passed through unchanged."""
    reactor = FakeReactor()
    run_rsync(reactor, ["/usr/bin/rsync", "x"], RsyncOutputParser(), env={"A": "1"})
    assert reactor.calls[0][1] == "/usr/bin/rsync"
    assert reactor.calls[0][3] == {"A": "1"}


def test_run_rsync_missing_executable() -> None:
    """A missing rsync binary is a clear FileNotFoundError, not a failed child."""
    reactor = FakeReactor()
    with pytest.raises(FileNotFoundError, match="no-such-rsync"):
        run_rsync(reactor, ["no-such-rsync-binary", "x"], RsyncOutputParser())
    with pytest.raises(FileNotFoundError):
        run_rsync(reactor, ["/nonexistent/rsync", "x"], RsyncOutputParser())
    assert reactor.calls == []


# --- real rsync ---------------------------------------------------------------------------

AWKWARD_FILES = [
    b'q"uote',
    b"back\\slash",
    b"back\\#123",
    b"new\nline",
    b"bin\xffname",
    b"with space",
    b"-dash",
    b"caf\xc3\xa9",
    b"tab\tname",
    b"a/deleting x",
    b"a/ leading space",
    b"a/b/with space",
    b"a/b/x -> y",
]


def make_tree(root: Path) -> None:
    base = os.fsencode(root)
    for i, name in enumerate(AWKWARD_FILES):
        path = os.path.join(base, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x" * (i + 1))
    os.symlink(b"a/f1", os.path.join(base, b"-link"))


def spawn(argv: list[str]) -> Any:
    from twisted.internet import reactor

    proto, _ = run_rsync(reactor, argv, RsyncOutputParser())
    return proto.ended.addTimeout(60, reactor)


@pytest_twisted.ensureDeferred
async def test_real_rsync_dry_run_awkward_names(tmp_path: Path) -> None:
    """A real rsync dry run reports every awkward name, deletion and count exactly."""
    source = tmp_path / "source"
    target = tmp_path / "target"
    make_tree(source)
    (target / "stale dir").mkdir(parents=True)
    (target / "stale dir" / "inner").write_bytes(b"old")
    (target / "stale").write_bytes(b"old")

    argv = build_argv(RsyncTarget(dest=f"{source}/", src=str(target)), dry_run=True)
    result: RsyncResult = await spawn(argv)

    assert result.ok, result.stderr
    parser = result.parser
    expected = sorted(os.fsdecode(name) for name in [*AWKWARD_FILES, b"-link"])
    assert sorted(parser.new_files) == expected
    assert sorted(parser.deleted_files) == ["stale", "stale dir/", "stale dir/inner"]
    assert list(parser.other_lines) == []
    assert parser.created_directory is None
    regular = len(AWKWARD_FILES)
    directories = 3  # ".", "a", "a/b"
    assert parser.stats.files == regular + directories + 1
    assert parser.stats.created == regular + directories - 1 + 1
    assert parser.stats.deleted == 3
    assert parser.stats.files_transferred == regular
    sizes = sum(range(1, regular + 1))
    assert parser.stats.transferred_size == sizes
    assert parser.stats.total_file_size == sizes + len(b"a/f1")
    assert sorted(os.listdir(target)) == ["stale", "stale dir"]


@pytest_twisted.ensureDeferred
async def test_real_rsync_reports_created_directory(tmp_path: Path) -> None:
    """A missing destination directory is reported, decoded, as created_directory."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_bytes(b"1")
    target = os.path.join(os.fsencode(tmp_path), b"new\xff dir")
    argv = build_argv(RsyncTarget(dest=f"{source}/", src=os.fsdecode(target)), dry_run=True)
    result: RsyncResult = await spawn(argv)
    assert result.ok, result.stderr
    assert result.parser.created_directory == os.fsdecode(target)
    assert result.parser.new_files == ["f"]


@pytest_twisted.ensureDeferred
async def test_real_rsync_failure_has_exit_code_and_stderr(tmp_path: Path) -> None:
    """A daemon that cannot be reached gives a non-zero exit code and rsync's error text."""
    target = RsyncTarget(
        dest="127.0.0.1::NOPE/", src=str(tmp_path), options=("--archive", "--port=1")
    )
    result: RsyncResult = await spawn(build_argv(target, dry_run=True))
    assert not result.ok
    assert result.exit_code == 10
    assert result.signal is None
    assert "failed to connect to 127.0.0.1" in result.stderr
    assert "(code 10)" in result.stderr
