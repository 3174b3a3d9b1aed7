"""Tests for deploy.config and deploy.ini: the original's INI dialect, typed settings, file:line
errors."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.auth import DEFAULT_KEY_CIPHER
from deploy.config import (
    LOG_LEVELS,
    AgentConfig,
    ClientSettings,
    ConfigError,
    ProxyConfig,
    ServerSettings,
    agent_key_cipher,
    load_agent_config,
    load_jobs,
    load_proxy_config,
)
from deploy.ini import MAX_LINE_BYTES, MAX_LINES, parse_ini

REFERENCE = Path(__file__).parent / "data" / "config"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def agent(tmp_path: Path, text: str, overrides: dict[str, object] | None = None) -> AgentConfig:
    return load_agent_config(write(tmp_path / "agent.ini", text), overrides)


def proxy(tmp_path: Path, text: str, overrides: dict[str, object] | None = None) -> ProxyConfig:
    return load_proxy_config(write(tmp_path / "proxy.ini", text), overrides)


def error_of(call, *args: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args)
    return info.value


def copy_with_path(source: Path, target: Path, section: str, new_path: str) -> str:
    """Copy *source* to *target*, pointing `path` of [section] at *new_path*."""
    text = source.read_text(encoding="utf-8")
    pattern = rf"(\[{re.escape(section)}\]\n(?:.*\n)*?)path\s*=.*"
    text, count = re.subn(pattern, rf"\g<1>path = {new_path}", text)
    assert count == 1
    return write(target, text)


# --------------------------------------------------------------------------- ConfigError


def test_config_error_str_names_path_and_line():
    """str(ConfigError) is `path:line: message`, `path: message` or the bare message."""
    assert str(ConfigError("bad", "a.ini", 3)) == "a.ini:3: bad"
    assert str(ConfigError("bad", "a.ini")) == "a.ini: bad"
    assert str(ConfigError("bad")) == "bad"
    error = ConfigError("bad", "a.ini", 3)
    assert (error.message, error.path, error.line) == ("bad", "a.ini", 3)


# --------------------------------------------------------------------------- parse_ini


def test_parse_sections_keys_and_values():
    """Sections keep `::`/`:` in names; keys and values are trimmed, values keep `=`, `:`, `%s`."""
    sections = parse_ini(
        "[rsync::group::web]\n"
        "\tdest\t=\t127.0.0.1::DEST/ \n"
        "[allow::hosts]\n"
        "[allow:odd]\n"
        "[service]\n"
        "service:nginx   =   /etc/init.d/nginx %s --x=a=b\n"
    )
    assert list(sections) == ["rsync::group::web", "allow::hosts", "allow:odd", "service"]
    assert sections["rsync::group::web"].entries["dest"].value == "127.0.0.1::DEST/"
    entry = sections["service"].entries["service:nginx"]
    assert entry.value == "/etc/init.d/nginx %s --x=a=b"
    assert entry.line == 6
    assert sections["allow::hosts"].line == 3
    assert sections["allow::hosts"].entries == {}


def test_parse_arrays_accumulate_in_order():
    """`key[] = v` lines append to one list under `key`, remembering each item's line."""
    sections = parse_ini("[s]\nopt[] = --a\nother = 1\nopt[]=--b\n  opt [] = --c\n")
    entry = sections["s"].entries["opt"]
    assert entry.value == ["--a", "--b", "--c"]
    assert entry.lines == [2, 4, 5]
    assert entry.line == 2


def test_parse_comments_and_blank_lines():
    """`;` and `#` start full-line comments after optional blanks; blank lines are ignored."""
    sections = parse_ini("; c\n# c\n\n   ; indented\n\t# tab\n[s]\n;k = 1\n#k2 = 2\nk3 = 3\n")
    assert list(sections["s"].entries) == ["k3"]


def test_parse_no_inline_comments():
    """A `;` or `#` inside a value is part of the value, as in the original."""
    entry = parse_ini("[s]\nk = a ; b # c\n")["s"].entries["k"]
    assert entry.value == "a ; b # c"


def test_parse_quotes_are_removed_once():
    """A value wrapped in double quotes loses them; inner quotes and a lone quote stay."""
    entries = parse_ini('[s]\na = " spaced "\nb = "x"y"\nc = "\nd = say "hi"\ne[] = "q"\n')[
        "s"
    ].entries
    assert entries["a"].value == " spaced "
    assert entries["b"].value == 'x"y'
    assert entries["c"].value == '"'
    assert entries["d"].value == 'say "hi"'
    assert entries["e"].value == ["q"]


def test_parse_empty_value_is_kept():
    """`key =` gives an empty string (the original's split keeps it)."""
    assert parse_ini("[s]\nk =\n")["s"].entries["k"].value == ""


def test_parse_entries_before_any_section_go_to_empty_name():
    """Entries before the first header land in section "" (jobs files use that)."""
    sections = parse_ini("\nfirst = 1\n[s]\nk = v\n")
    assert sections[""].entries["first"].value == "1"
    assert sections[""].line == 2


def test_parse_repeated_scalar_last_wins():
    """A repeated scalar key keeps its last value and line, and remembers every line."""
    entry = parse_ini("[s]\nk = 1\nk = 2\n")["s"].entries["k"]
    assert (entry.value, entry.line, entry.lines) == ("2", 3, [2, 3])


def test_parse_repeated_section_merges_into_first():
    """A second header of the same name continues the first section (arrays keep appending)."""
    sections = parse_ini("[a]\nx[] = 1\n[b]\n[a]\nx[] = 2\ny = 3\n")
    assert list(sections) == ["a", "b"]
    assert sections["a"].line == 1
    assert sections["a"].entries["x"].value == ["1", "2"]
    assert sections["a"].entries["y"].value == "3"


def test_parse_accepts_bom_and_crlf():
    """A UTF-8 BOM and CRLF line ends are accepted and not part of names or values."""
    sections = parse_ini("\ufeff[s]\r\nk = v\r\n")
    assert sections["s"].entries["k"].value == "v"


def test_parse_accepts_unicode_values():
    """Non-ASCII text in values is kept as written."""
    assert parse_ini("[s]\nk = 배포 é\n")["s"].entries["k"].value == "배포 é"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("[s]\njust words\n", 2, "expected 'key = value'"),
        ("[s]\n = v\n", 2, "empty key"),
        ("[s]\n[] = v\n", 2, "unterminated section header"),
        ("[s]\n\n[server\n", 3, "unterminated section header"),
        ("[]\n", 1, "empty section name"),
        ("[a]]\n", 1, "bad section header"),
        ("[s]\na[1] = v\n", 2, "bad key"),
        ("[s]\nk = 1\nk[] = 2\n", 3, "both"),
        ("[s]\nk[] = 1\nk = 2\n", 3, "both"),
        ("[s]\nk = a\x00b\n", 2, "control character"),
        ("[s]\nk = a\rb\n", 2, "control character"),
        ("[s]\nk = \udcff\n", 2, "not valid UTF-8"),
    ],
)
def test_parse_errors_name_path_and_line(text, line, fragment):
    """Each malformed line is a ConfigError naming path:line."""
    error = error_of(parse_ini, text, "x.ini")
    assert (error.path, error.line) == ("x.ini", line)
    assert fragment in error.message
    assert str(error).startswith(f"x.ini:{line}: ")


def test_parse_mixing_scalar_and_array_across_merged_sections():
    """`k` then `k[]` is refused even when the section header is repeated in between."""
    error = error_of(parse_ini, "[s]\nk = 1\n[t]\n[s]\nk[] = 2\n", "x.ini")
    assert error.line == 5


def test_parse_bounds_line_length():
    """A line over 64 KiB (counted in UTF-8 bytes) is refused; one at the limit is not."""
    assert parse_ini("[s]\nk = " + "a" * (MAX_LINE_BYTES - 4) + "\n")
    error = error_of(parse_ini, "[s]\nk = " + "é" * (MAX_LINE_BYTES // 2), "x.ini")
    assert error.line == 2
    assert error.message == f"line longer than {MAX_LINE_BYTES} bytes"


def test_parse_bounds_line_count():
    """More than 100,000 lines is refused; exactly 100,000 is fine."""
    assert parse_ini("\n" * MAX_LINES) == {}
    error = error_of(parse_ini, "\n" * MAX_LINES + "x", "x.ini")
    assert str(error) == f"x.ini:{MAX_LINES + 1}: more than {MAX_LINES} lines"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_arbitrary_text_never_crashes(text):
    """Any text gives sections or a ConfigError, never another exception."""
    try:
        parse_ini(text)
    except ConfigError:
        pass


INI_ALPHABET = st.sampled_from(list('[]=;#:" \t\n\r\x00ak0-é') + ["::", "[]", "\ufeff"])


@settings(max_examples=500, deadline=None)
@given(st.lists(INI_ALPHABET, max_size=60).map("".join))
def test_parse_ini_like_text_never_crashes(text):
    """Text made of the dialect's own punctuation gives sections or a ConfigError."""
    try:
        sections = parse_ini(text)
    except ConfigError as error:
        assert error.line is not None
    else:
        for section in sections.values():
            for entry in section.entries.values():
                assert entry.lines


KEYS = st.from_regex(r"[a-z][a-z0-9_:.-]{0,10}", fullmatch=True)
VALUES = (
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc",)), min_size=1)
    .map(lambda value: value.strip(" \t\f\v"))
    .filter(lambda value: value and not (value[0] == value[-1] == '"' and len(value) > 1))
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(KEYS, st.lists(VALUES, min_size=1, max_size=3)))
def test_parse_round_trips_written_arrays(data):
    """Arrays written as `key[] = value` lines read back unchanged."""
    text = "[s]\n" + "".join(f"{k}[] = {v}\n" for k, vs in data.items() for v in vs)
    entries = parse_ini(text).get("s")
    assert {k: e.value for k, e in entries.entries.items()} == data


# --------------------------------------------------------------------------- reference files


def test_original_agent_sample_loads_as_is():
    """The original's agent sample loads unchanged; its empty group placeholder is no group."""
    config = load_agent_config(str(REFERENCE / "original-deploy_agent.ini"))
    assert config.server == ServerSettings()
    assert config.allow_hosts == ["127.0.0.1"]
    assert config.allow_paths == ["/tmp", "/home"]
    assert config.groups == {}
    assert (config.jobs_path, config.jobs) == (None, {})


def test_original_proxy_sample_loads_as_is():
    """The original's proxy sample loads unchanged, with the proxy's port 3441."""
    config = load_proxy_config(str(REFERENCE / "original-deploy_proxy.ini"))
    assert config.server == ServerSettings(port=3441)
    assert config.client == ClientSettings()
    assert config.allow_hosts == ["127.0.0.1"]
    assert (config.api_path, config.keys, config.servers) == (None, {}, {})


def test_original_jobs_and_api_samples_load_as_is(tmp_path):
    """The original's jobs and API samples (everything commented out) load as empty."""
    assert load_jobs(str(REFERENCE / "original-deploy_agent_exec.ini")) == {}
    api = REFERENCE / "original-deploy_proxy_api.ini"
    config = proxy(tmp_path, f"[api]\npath = {api}\n")
    assert (config.api_path, config.keys, config.servers) == (str(api), {}, {})


def test_peer_agent_config_loads(tmp_path):
    """peer-agent.ini loads with its four groups, options, rsh and an untouched rsync:// dest."""
    jobs = shutil.copy(REFERENCE / "deploy_agent_exec.ini", tmp_path / "exec.ini")
    path = copy_with_path(REFERENCE / "peer-agent.ini", tmp_path / "agent.ini", "jobs", "exec.ini")
    config = load_agent_config(path)

    server = config.server
    assert (server.addr, server.port, server.backlog) == ("127.0.0.1", 3440, 128)
    assert (server.socket_timeout, server.log_write, server.ssl) == (5.0, True, False)
    assert server.log_error_path == "/srv/peer/logs/agent_127.0.0.1_error.log"
    assert server.process_name == "deploy-agent-127.0.0.1:"
    assert server.key_cipher is None
    assert agent_key_cipher(server) == "65535"
    assert config.allow_hosts == ["127.0.0.0/8"]
    assert config.allow_paths == ["/srv/peer/targets"]

    assert list(config.groups) == ["web", "webslow", "weburl", "badpath"]
    web = config.groups["web"]
    assert (web.dest, web.src) == ("127.0.0.1::DEST/", "/srv/peer/targets/web")
    assert web.options == ["--port=8730", "--archive", "--delete", "--force"]
    assert (web.rsync, web.rsh, web.excludes, web.includes) == ("rsync", None, [], [])
    assert config.groups["webslow"].options[-1] == "--bwlimit=2000"
    assert "--bwlimit=2000" not in web.options
    weburl = config.groups["weburl"]
    assert weburl.dest == "rsync://127.0.0.1:8730/DEST/"
    assert weburl.rsh == "/bin/false"
    assert weburl.options is None
    assert config.groups["badpath"].src == "/srv/peer-notallowed/web"
    assert config.groups["web"].line == 27

    assert config.jobs_path == str(jobs)
    assert config.jobs == {
        "service:echo": "/bin/echo %s",
        "service:false": "/bin/false %s",
        "service:sleep": "/bin/sleep %s",
    }


def test_peer_proxy_config_loads(tmp_path):
    """deploy_proxy.ini and its API file load: client settings, keys, servers with case kept."""
    api = shutil.copy(REFERENCE / "deploy_proxy_api.ini", tmp_path / "api.ini")
    path = copy_with_path(REFERENCE / "deploy_proxy.ini", tmp_path / "proxy.ini", "api", str(api))
    config = load_proxy_config(path)

    assert (config.server.addr, config.server.port) == ("127.0.0.1", 3441)
    assert config.server.log_access_path == "/srv/peer/logs/proxy_access.log"
    assert config.server.key_cipher is None
    client = config.client
    assert (client.port, client.thread_timeout, client.socket_timeout) == (3440, 10.0, 5.0)
    assert (client.ipc_path, client.worker_method, client.ssl) == (
        "/srv/peer/ipc/proxy",
        "fork",
        False,
    )
    assert config.allow_hosts == ["127.0.0.0/8"]
    assert config.api_path == str(api)
    assert config.keys == {
        "peerkey000000000000000000000000001": ["fan1", "fan10", "fan50", "relay1"],
        "peerkey000000000000000000000000002": ["fan1"],
    }
    assert list(config.servers) == ["fan1", "fan10", "fan50", "relay1"]
    assert config.servers["fan1"] == ["127.0.0.2"]
    assert config.servers["fan10"] == [f"127.0.0.{n}" for n in range(2, 12)]
    assert len(config.servers["fan50"]) == 50
    assert config.servers["fan50"][-1] == "127.0.0.51"
    assert config.servers["relay1"] == ["127.0.0.70"]


def test_reference_files_are_valid_ini():
    """Every reference config (and the rsyncd.conf in the same dialect) parses."""
    for path in REFERENCE.iterdir():
        assert isinstance(parse_ini(path.read_text(encoding="utf-8"), str(path)), dict)


# --------------------------------------------------------------------------- files


def test_missing_config_file(tmp_path):
    """An unreadable config names the path and the OS reason."""
    error = error_of(load_agent_config, str(tmp_path / "nope.ini"))
    assert str(error) == f"{tmp_path / 'nope.ini'}: cannot read config: No such file or directory"
    error = error_of(load_proxy_config, str(tmp_path))
    assert error.message == "cannot read config: Is a directory"


def test_file_with_bom_and_legacy_encoded_comment(tmp_path):
    """A BOM and a comment in a legacy encoding (EUC-KR) load; such a value is refused by line."""
    path = tmp_path / "agent.ini"
    path.write_bytes(b"\xef\xbb\xbf; " + "배포".encode("euc-kr") + b"\n[server]\nport = 1\n")
    assert load_agent_config(str(path)).server.port == 1
    path.write_bytes(b"[server]\nprocess_name = " + "배포".encode("euc-kr") + b"\n")
    error = error_of(load_agent_config, str(path))
    assert (error.line, error.message) == (2, "line is not valid UTF-8")


def test_huge_file_is_refused_without_reading_it_all(tmp_path):
    """A file over the size bound is refused as a whole."""
    path = tmp_path / "big.ini"
    with path.open("wb") as handle:
        handle.truncate(17 * 1024 * 1024)
    error = error_of(load_agent_config, str(path))
    assert error.path == str(path) and "larger than" in error.message


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_files_never_crash_the_loaders(data):
    """Any bytes as an agent, proxy or jobs file give a config or a ConfigError."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "x.ini")
        with open(path, "wb") as handle:
            handle.write(data)
        for load in (load_agent_config, load_proxy_config, load_jobs):
            try:
                load(path)
            except ConfigError:
                pass


SETTINGS_LINES = st.sampled_from(
    [
        "[server]",
        "[client]",
        "[jobs]",
        "[api]",
        "[allow::hosts]",
        "[rsync::group::g]",
        "port = 80",
        "port = 0",
        "port = x",
        "ssl = on",
        "ssl_private_key = k",
        "log_error_level = 9",
        "log_error_level = 3",
        "dest = h::M",
        "src = /tmp",
        "option[] = -a",
        "host[] = 10.0.0.1",
        "path = missing.ini",
        "max_delete = -1",
        "socket_timeout = 1e9",
        "backlog = 99999999999",
        "k[] = v",
        "k = v",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(SETTINGS_LINES, max_size=12))
def test_settings_like_files_never_crash_the_loaders(lines):
    """Plausible config lines in any order give a config or a ConfigError with a location."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "x.ini")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines))
        for load in (load_agent_config, load_proxy_config):
            try:
                load(path)
            except ConfigError as error:
                assert error.path is not None


# --------------------------------------------------------------------------- typed settings


def test_defaults_without_a_file():
    """path=None gives the original's defaults: agent 3440 and key 65535, proxy 3441."""
    config = load_agent_config(None)
    assert config == AgentConfig(None, ServerSettings(), [], [], {}, None, {})
    assert config.server.port == 3440
    assert agent_key_cipher(config.server) == DEFAULT_KEY_CIPHER == "65535"
    proxy_config = load_proxy_config(None)
    assert proxy_config.server.port == 3441
    assert proxy_config.server.key_cipher is None
    assert proxy_config.client == ClientSettings(port=3440, thread_timeout=10.0, max_parallel=64)


def test_agent_key_cipher_prefers_configured_key(tmp_path):
    """A configured key_cipher is used as is."""
    config = agent(tmp_path, "[server]\nkey_cipher = 4294967295\n")
    assert agent_key_cipher(config.server) == "4294967295"


def test_typed_values_convert(tmp_path):
    """Ints, floats, bools in every spelling, and log levels by name or 0-7 convert."""
    config = agent(
        tmp_path,
        "[server]\nport = 03441\nbacklog = 0\nsocket_timeout = 2.5\nmax_process_timeout = .5\n"
        "socket_accept_filter = On\nlog_write = YES\nssl = 0\nlegacy_auth = 1\n"
        "log_error_level = 3\nauth_window = 30\nrkill_grace = 1.\nuser = nobody\n",
    )
    server = config.server
    assert (server.port, server.backlog) == (3441, 0)
    assert (server.socket_timeout, server.max_process_timeout, server.rkill_grace) == (
        2.5,
        0.5,
        1.0,
    )
    assert (server.socket_accept_filter, server.log_write, server.ssl) == (True, True, False)
    assert server.legacy_auth is True
    assert server.log_error_level == "error"
    assert server.auth_window == 30.0 and isinstance(server.auth_window, float)
    assert server.user == "nobody"


@pytest.mark.parametrize(
    ("level", "name"), [*enumerate(LOG_LEVELS), ("WARN", "warn"), ("err", "error")]
)
def test_log_levels_by_number_and_name(tmp_path, level, name):
    """log_error_level takes the syslog numbers 0-7 and the names, case-insensitively."""
    assert agent(tmp_path, f"[server]\nlog_error_level = {level}\n").server.log_error_level == name


def test_empty_optional_value_means_unset(tmp_path):
    """`key =` for an optional string setting leaves it unset (None)."""
    config = agent(tmp_path, "[server]\nkey_cipher =\nlog_error_path = \n[jobs]\npath =\n")
    assert config.server.key_cipher is None
    assert config.server.log_error_path is None
    assert config.jobs_path is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("port = abc", "port: expected an integer 1-65535, got 'abc'"),
        ("port = 0", "port: expected an integer 1-65535, got '0'"),
        ("port = 65536", "port: expected an integer 1-65535, got '65536'"),
        ("backlog = -1", "backlog: expected an integer 0-2147483647, got '-1'"),
        ("backlog = 1" + "0" * 5000, "backlog: expected an integer 0-2147483647"),
        ("max_prefork = ٣", "max_prefork: expected an integer"),
        ("socket_timeout = fast", "socket_timeout: expected a number >= 0, got 'fast'"),
        ("socket_timeout = -1", "socket_timeout: expected a number >= 0"),
        ("socket_timeout = nan", "socket_timeout: expected a number >= 0"),
        ("socket_timeout = 1" + "0" * 400, "socket_timeout: expected a number >= 0"),
        ("ssl = maybe", "ssl: expected one of true/false/on/off/yes/no/1/0, got 'maybe'"),
        ("log_error_level = 8", "log_error_level: expected one of emerg/"),
        ("log_error_level = loud", "log_error_level: expected one of emerg/"),
        ("addr =", "addr: expected a non-empty value, got ''"),
        ("port[] = 1", "port: expected one value"),
        ("colour = red", "unknown key 'colour' in [server]"),
    ],
)
def test_bad_server_values_name_file_and_line(tmp_path, line, message):
    """A wrong value or unknown key in [server] is a ConfigError at its own line."""
    error = error_of(agent, tmp_path, f"[server]\naddr = 127.0.0.1\n{line}\n")
    assert (error.path, error.line) == (str(tmp_path / "agent.ini"), 3)
    assert error.message.startswith(message)
    assert str(error).startswith(f"{tmp_path / 'agent.ini'}:3: ")


def test_bad_client_value_names_file_and_line(tmp_path):
    """A wrong value in the proxy's [client] is located like one in [server]."""
    error = error_of(proxy, tmp_path, "[client]\n\nthread_timeout = soon\n")
    assert error.line == 3
    assert error.message == "thread_timeout: expected a number >= 0, got 'soon'"
    error = error_of(proxy, tmp_path, "[client]\nssl_private_key = k\n")
    assert error.message == "unknown key 'ssl_private_key' in [client]"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[server]\nport = 1\n[clients]\n", 3, "unknown section [clients]"),
        ("orphan = 1\n[server]\n", 1, "entry outside any [section]"),
        ("[allow::hosts]\nhosts[] = a\n", 2, "unknown key 'hosts' in [allow::hosts]"),
        ("[allow::hosts]\nhost[] = a\nhost[] =\n", 3, "host[]: empty value"),
        ("[allow::paths]\npath[] = /tmp\nroot = /\n", 3, "unknown key 'root' in [allow::paths]"),
        ("[jobs]\npath = x\nfile = y\n", 3, "unknown key 'file' in [jobs]"),
        ("[rsync::group::]\ndest = a\n", 1, "empty rsync group name"),
        ("\n[rsync::group::g]\ndest = h::M\n", 2, "[rsync::group::g] needs src"),
        ("[rsync::group::g]\nrsync = /bin/rsync\n", 1, "[rsync::group::g] needs dest and src"),
        ("[rsync::group::g]\ndest = a\nsrc = b\nbwlimit = 10\n", 4, "unknown key 'bwlimit'"),
        ("[rsync::group::g]\ndest = a\nsrc = b\nmax_delete = -3\n", 4, "max_delete: expected"),
        ("[rsync::group::g]\ndest = a\nsrc = b\noption[] = -a\noption[] =\n", 5, "option[]: empty"),
        ("[rsync::group::g]\ndest[] = a\nsrc = b\n", 2, "dest: expected one value"),
        ("[server]\nssl = true\n", 2, "ssl = true needs ssl_private_key"),
        ("[client]\nport = 1\n", 1, "unknown section [client]"),
    ],
)
def test_agent_structure_errors_name_file_and_line(tmp_path, text, line, message):
    """Unknown sections/keys, empty items and incomplete groups are located at their line."""
    error = error_of(agent, tmp_path, text)
    assert (error.path, error.line) == (str(tmp_path / "agent.ini"), line)
    assert error.message.startswith(message)


def test_rsync_group_settings(tmp_path):
    """A group reads every key; scalar list keys count as one item; empty groups are skipped."""
    config = agent(
        tmp_path,
        "[rsync::group::placeholder]\n"
        "[rsync::group::full]\n"
        "dest = h::M/p\nsrc = /srv/x\nrsync = /opt/rsync\nrsh = ssh -p 22\n"
        "option = --archive\nexclude[] = .git\nexclude[] = *.tmp\ninclude[] = .config\n"
        "queue_path = /var/q\nmax_delete = 10\nallow_empty_source = true\n",
    )
    assert list(config.groups) == ["full"]
    group = config.groups["full"]
    assert (group.name, group.line, group.dest, group.src) == ("full", 2, "h::M/p", "/srv/x")
    assert (group.rsync, group.rsh) == ("/opt/rsync", "ssh -p 22")
    assert group.options == ["--archive"]
    assert (group.excludes, group.includes) == ([".git", "*.tmp"], [".config"])
    assert (group.queue_path, group.max_delete, group.allow_empty_source) == ("/var/q", 10, True)


def test_proxy_structure_errors_name_file_and_line(tmp_path):
    """The proxy refuses agent-only sections and entries outside sections, at their line."""
    for text, line, message in [
        ("[server]\n[jobs]\npath = x\n", 2, "unknown section [jobs]"),
        ("[api]\npath = a\nkeys = b\n", 3, "unknown key 'keys' in [api]"),
        ("[allow::hosts]\nhost[] = a\n[allow::paths]\n", 3, "unknown section [allow::paths]"),
    ]:
        error = error_of(proxy, tmp_path, text)
        assert (error.line, error.message) == (line, message)


# --------------------------------------------------------------------------- jobs


def test_jobs_in_several_sections_and_before_any(tmp_path):
    """Jobs may sit before any section and in any section; all share one name space."""
    path = write(
        tmp_path / "exec.ini",
        "top = /bin/true\n[service]\nservice:nginx\t=\t/etc/init.d/nginx %s\n"
        "[application]\napp:x = /opt/x %s ; not a comment\n",
    )
    assert load_jobs(path) == {
        "top": "/bin/true",
        "service:nginx": "/etc/init.d/nginx %s",
        "app:x": "/opt/x %s ; not a comment",
    }


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[a]\nx = 1\n[b]\nx = 2\n", 4, "job 'x' is defined twice (first at line 2)"),
        ("[a]\nx = 1\nx = 2\n", 3, "job 'x' is defined twice (first at line 2)"),
        ("x = 1\n[a]\nx = 2\n", 3, "job 'x' is defined twice (first at line 1)"),
        (
            "[b]\n[a]\ny = 0\n[b]\nx = 1\n[a]\nx = 2\n",
            7,
            "job 'x' is defined twice (first at line 5)",
        ),
        ("[a]\nx[] = 1\n", 2, "job 'x': write 'x = command', not 'x[]'"),
        ("[a]\nx =\n", 2, "job 'x': empty command"),
    ],
)
def test_jobs_errors_name_file_and_line(tmp_path, text, line, message):
    """A job name defined twice is refused at its second line; arrays and empty commands too."""
    path = write(tmp_path / "exec.ini", text)
    error = error_of(load_jobs, path)
    assert (error.path, error.line, error.message) == (path, line, message)


def test_jobs_path_is_relative_to_agent_config(tmp_path):
    """A relative [jobs] path is resolved against the agent config's directory, not the cwd."""
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf" / "exec.ini", "[s]\nj = /bin/echo %s\n")
    path = write(tmp_path / "conf" / "agent.ini", "[jobs]\npath = exec.ini\n")
    config = load_agent_config(path)
    assert config.jobs_path == str(tmp_path / "conf" / "exec.ini")
    assert config.jobs == {"j": "/bin/echo %s"}


def test_missing_jobs_file_names_the_agent_config_line(tmp_path):
    """A jobs file that cannot be read is reported at the agent config's `path` line."""
    error = error_of(agent, tmp_path, "[server]\nport = 1\n\n[jobs]\npath = gone.ini\n")
    assert (error.path, error.line) == (str(tmp_path / "agent.ini"), 5)
    assert "gone.ini" in error.message and "No such file or directory" in error.message


def test_bad_jobs_file_line_is_reported_in_the_jobs_file(tmp_path):
    """A syntax error inside the jobs file names the jobs file and its line."""
    write(tmp_path / "exec.ini", "[s]\nok = /bin/true\nbroken\n")
    error = error_of(agent, tmp_path, "[jobs]\npath = exec.ini\n")
    assert (error.path, error.line) == (str(tmp_path / "exec.ini"), 3)


# --------------------------------------------------------------------------- proxy API file


def test_api_keys_split_and_accumulate(tmp_path):
    """`key[] = g1, g2` splits on commas; lines accumulate; `key = g` works too; case is kept."""
    write(
        tmp_path / "api.ini",
        "[keys]\nK1[] = Web, db ,,\nK1[] = Cache\nk2 = web\n"
        "[servers]\nWeb[] = Host-A.example\nWeb[] = 10.0.0.1\ndb = DB1\n",
    )
    config = proxy(tmp_path, "[api]\npath = api.ini\n")
    assert config.api_path == str(tmp_path / "api.ini")
    assert config.keys == {"K1": ["Web", "db", "Cache"], "k2": ["web"]}
    assert config.servers == {"Web": ["Host-A.example", "10.0.0.1"], "db": ["DB1"]}


def test_api_file_errors(tmp_path):
    """The API file refuses unknown sections and empty hosts; a missing one names [api] path."""
    write(tmp_path / "api.ini", "[keys]\n[hosts]\nx[] = a\n")
    error = error_of(proxy, tmp_path, "[api]\npath = api.ini\n")
    assert (error.path, error.line, error.message) == (
        str(tmp_path / "api.ini"),
        2,
        "unknown section [hosts]",
    )
    write(tmp_path / "api.ini", "[servers]\ng[] = a\ng[] =\n")
    error = error_of(proxy, tmp_path, "[api]\npath = api.ini\n")
    assert (error.line, error.message) == (3, "g[]: empty value")
    error = error_of(proxy, tmp_path, "[server]\n[api]\npath = /nonexistent/api.ini\n")
    assert (error.path, error.line) == (str(tmp_path / "proxy.ini"), 3)


# --------------------------------------------------------------------------- overrides


def test_overrides_beat_the_file(tmp_path):
    """Command-line values win over the file; None means 'not given' and keeps the file value."""
    config = agent(
        tmp_path,
        "[server]\nport = 3440\naddr = 127.0.0.1\nlog_write = false\nkey_cipher = file\n",
        {"port": "4000", "log_write": "on", "key_cipher": "cli", "addr": None, "backlog": 7},
    )
    server = config.server
    assert (server.port, server.log_write, server.key_cipher) == (4000, True, "cli")
    assert (server.addr, server.backlog) == ("127.0.0.1", 7)


def test_overrides_accept_typed_values():
    """Already-typed override values (int, float, bool, 0/1 flags, level numbers) are accepted."""
    server = load_agent_config(
        None,
        {"port": 1, "socket_timeout": 3, "ssl_private_key": "k", "ssl": 1, "log_error_level": 7},
    ).server
    assert (server.port, server.socket_timeout, server.ssl) == (1, 3.0, True)
    assert server.log_error_level == "debug"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": "abc"}, "--port: expected an integer 1-65535, got 'abc'"),
        ({"port": True}, "--port: expected an integer 1-65535, got True"),
        ({"socket_timeout": -2.0}, "--socket-timeout: expected a number >= 0, got -2.0"),
        ({"log_write": "sometimes"}, "--log-write: expected one of true/false"),
        ({"log_error_level": 8}, "--log-error-level: expected one of emerg/"),
        ({"key_cipher": 5}, "--key-cipher: expected a string, got 5"),
        ({"colour": "red"}, "unknown option --colour"),
        ({"client_port": "1"}, "unknown option --client-port"),
    ],
)
def test_bad_agent_overrides_name_the_option(tmp_path, overrides, message):
    """A wrong override is a ConfigError naming the --option, with no file or line."""
    error = error_of(agent, tmp_path, "[server]\nport = 1\n", overrides)
    assert (error.path, error.line) == (None, None)
    assert error.message.startswith(message)


def test_proxy_client_overrides(tmp_path):
    """client_* overrides set [client]; the proxy's own port stays a [server] override."""
    config = proxy(
        tmp_path,
        "[server]\nport = 3441\n[client]\nport = 3440\nthread_timeout = 10\n",
        {
            "port": "5000",
            "client_port": "5001",
            "client_thread_timeout": "2.5",
            "client_socket_timeout": 1,
            "client_key_cipher": "agentkey",
            "client_ssl_public_key": "/k.pem",
            "client_legacy_auth": "yes",
            "client_worker_method": "thread",
            "client_ipc_path": "memory",
        },
    )
    assert config.server.port == 5000
    client = config.client
    assert (client.port, client.thread_timeout, client.socket_timeout) == (5001, 2.5, 1.0)
    assert (client.key_cipher, client.ssl_public_key, client.legacy_auth) == (
        "agentkey",
        "/k.pem",
        True,
    )
    assert (client.worker_method, client.ipc_path) == ("thread", "memory")
    error = error_of(proxy, tmp_path, "", {"client_port": "0"})
    assert str(error) == "--client-port: expected an integer 1-65535, got '0'"


def test_ssl_without_private_key_via_override(tmp_path):
    """ssl turned on by an override still needs a private key, from the file or the command line."""
    error = error_of(agent, tmp_path, "[server]\n", {"ssl": True})
    assert error.message == "ssl = true needs ssl_private_key"
    assert agent(tmp_path, "[server]\nssl_private_key = /k\n", {"ssl": True}).server.ssl


# --------------------------------------------------------------------------- issue 12 keys


@pytest.mark.parametrize(
    ("template", "token"),
    [
        ("/bin/sh -c 'echo hello %s'", "echo hello %s"),
        ('/bin/bash -c "tar xf %s"', "tar xf %s"),
        ("/usr/bin/env --name=%s", "--name=%s"),
        ("/bin/echo %s%%", "%s%%"),
    ],
)
def test_percent_s_inside_an_argument_is_refused_at_load(tmp_path, template, token):
    """A `%s` that is not a whole argument of its template is refused when the jobs file loads,
    naming the file, the line and the safe form (positional parameters)."""
    path = write(tmp_path / "exec.ini", f"[service]\nok = /bin/echo %s\nbad = {template}\n")
    error = error_of(load_jobs, path)
    assert (error.path, error.line) == (path, 3)
    assert error.message.startswith(f"job 'bad': %s inside the argument {token!r}")
    assert "sh -c 'echo hello \"$1\"' sh %s" in error.message
    assert f"{path}:3" in str(error)


def test_percent_s_inside_an_argument_stops_the_agent_config_too(tmp_path):
    """Through [jobs] of an agent config, the error names the jobs file and its line."""
    jobs = write(tmp_path / "exec.ini", "greet = /bin/sh -c 'echo hello %s'\n")
    error = error_of(agent, tmp_path, f"[jobs]\npath = {jobs}\n")
    assert (error.path, error.line) == (jobs, 1)


def test_whole_percent_s_and_the_safe_form_load(tmp_path):
    """Whole-argument `%s` stays as it was; the safe shell form loads."""
    path = write(
        tmp_path / "exec.ini",
        "a = /bin/echo %s\nb = /bin/sh -c 'echo hello \"$1\"' sh %s\nc = /bin/date +%%s\n",
    )
    assert load_jobs(path)["b"] == "/bin/sh -c 'echo hello \"$1\"' sh %s"


def test_issue12_server_keys_defaults_and_values(tmp_path):
    """dry_run_timeout defaults to 300 s and allow_inline_remote_shell to false; both read."""
    assert ServerSettings().dry_run_timeout == 300
    assert ServerSettings().allow_inline_remote_shell is False
    config = agent(tmp_path, "[server]\ndry_run_timeout = 20\nallow_inline_remote_shell = true\n")
    assert config.server.dry_run_timeout == 20 and config.server.allow_inline_remote_shell
    assert agent(tmp_path, "[server]\ndry_run_timeout = 0\n").server.dry_run_timeout == 0
    error = error_of(agent, tmp_path, "[server]\n\ndry_run_timeout = soon\n")
    assert error.line == 3 and "dry_run_timeout" in error.message


def test_allow_sources_section(tmp_path):
    """[allow::sources] lists names, networks and HOST::MODULE prefixes; absent, it is empty."""
    assert agent(tmp_path, "[server]\n").allow_sources == []
    config = agent(
        tmp_path,
        "[allow::sources]\nsource[] = rsync.example.com\nsource[] = 10.0.0.0/8\n"
        "source[] = fd00::/8\nsource[] = release.example.com::www/current\n",
    )
    assert config.allow_sources == [
        "rsync.example.com",
        "10.0.0.0/8",
        "fd00::/8",
        "release.example.com::www/current",
    ]


@pytest.mark.parametrize(
    "entry",
    ["-oProxyCommand=x", "user@host", "host:/path", "host::", "host::m/../etc", "a b", "h;x"],
)
def test_bad_allow_sources_entry_names_its_line(tmp_path, entry):
    """An [allow::sources] entry that is no host, network or HOST::MODULE is an error at its
    line, not a rule that silently allows nothing."""
    error = error_of(agent, tmp_path, f"[allow::sources]\nsource[] = h\nsource[] = {entry}\n")
    assert error.line == 3 and error.message.startswith("source[]:")


def test_allow_sources_takes_only_source_entries(tmp_path):
    """Another key in [allow::sources] is an unknown key."""
    error = error_of(agent, tmp_path, "[allow::sources]\nhost[] = h\n")
    assert error.line == 2 and "unknown key 'host'" in error.message
