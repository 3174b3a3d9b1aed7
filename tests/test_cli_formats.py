"""deploy-client for people and scripts: the json/table/ndjson formats, the exit codes, the
progress line on a terminal, --retry-failed, the client config file and its precedence — against
real agents (and a proxy), one host down."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from typing import Any

import pytest

from deploy import clientconfig, output, progressline
from deploy.cli import main
from deploy.retry import read_result_rows, retry_plan
from tests.conftest import Daemons
from tests.harness import ClientRun, ProxyProcess, free_port, run_client, tool

SLOW_JOBS = """\
; the same names as the usual jobs file, but this agent's echo takes its time
[service]
service:echo            =   /bin/sleep %s
service:false           =   /bin/false %s
"""


def down_host() -> str:
    """An address nothing listens on."""
    return f"127.0.0.1:{free_port()}"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any client defaults of the machine running the tests."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DEPLOY_KEY_CIPHER", "DEPLOY_API_KEY", "XDG_CONFIG_HOME")
    }
    env.update(extra)
    return env


def client(home: Path, *args: str, **env: str) -> ClientRun:
    return run_client(*args, env=clean_env(HOME=str(home), **env))


@pytest.fixture
def slow_agent(daemons, site, tmp_path):
    """A second agent whose `service:echo,N` sleeps N seconds (the site agent's echoes)."""
    jobs = tmp_path / "slow_jobs.ini"
    jobs.write_text(SLOW_JOBS)
    return daemons.agent(
        jobs=jobs, state=tmp_path / "state-slow", allow_paths=[site.targets], groups={}
    )


def fleet_proxy(daemons: Daemons, tmp_path: Path, servers: list[str]) -> ProxyProcess:
    """A proxy on 127.0.0.1 whose api key k1 grants group `fleet` = servers."""
    port = free_port()
    api = tmp_path / f"api-{port}.ini"
    api.write_text(
        "[keys]\nk1[] = fleet\n\n[servers]\n" + "".join(f"fleet[] = {s}\n" for s in servers)
    )
    text = (
        f"[server]\naddr = 127.0.0.1\nport = {port}\n\n[client]\nthread_timeout = 10\n\n"
        f"[allow::hosts]\nhost[] = 127.0.0.0/8\n\n[api]\npath = {api}\n"
    )
    return daemons.proxy(text, "127.0.0.1", port)


def through(proxy: ProxyProcess) -> tuple[str, ...]:
    """deploy-client's arguments for an order to the fleet through `proxy`, with key k1."""
    return (f"--hosts={proxy.address}", "--api-key=k1", "--args=groups:fleet")


# ------------------------------------------------------------------------- formats, exit codes


def test_json_is_the_original_shape_and_exit_0(site, home):
    """--format json (the default) prints host → order → the original keys; all ok exits 0."""
    r = client(home, f"--hosts={site.agent.address}", "--order=status", "--options=web")
    assert r.rc == 0, r.stderr
    entry = r.entry(site.agent.address, "status")
    assert entry["return"] == 1 and entry["serverStatus"] == 1
    assert entry["returnCode"] == "200" and entry["returnString"] == "OK"
    assert entry["content"]["transferFilesCount"] == "40"
    assert r.stderr == ""
    same = client(
        home, f"--hosts={site.agent.address}", "--order=status", "--options=web", "--format=json"
    )
    assert same.json == r.json


def test_exit_codes_failed_unreachable_and_budget_stop(site, home):
    """2 when a host answered a failure (even with another down), 3 when one is only down,
    4 when a rolling deploy stopped at its budget (the rest skipped)."""
    ok, down = site.agent.address, down_host()
    failed = client(home, f"--hosts={ok}", "--order=exec", "--options=service:false")
    assert failed.rc == 2, failed.stdout
    assert failed.content(ok, "exec")["return"] == "false"
    both = client(home, f"--hosts={ok},{down}", "--order=exec", "--options=service:false")
    assert both.rc == 2
    unreachable = client(home, f"--hosts={ok},{down}", "--order=exec", "--options=service:echo,hi")
    assert unreachable.rc == 3
    assert unreachable.entry(down, "exec")["serverStatus"] == 0
    assert unreachable.content(down, "exec").startswith("can't connect to")
    stopped = client(
        home,
        f"--hosts={down},{ok}",
        "--order=exec",
        "--options=service:echo,hi",
        "--batch=1",
        "--max-fail=0",
    )
    assert stopped.rc == 4
    assert stopped.entry(ok, "exec")["skipped"] is True


def test_thread_timeout_exits_3(slow_agent, home):
    """A host that does not answer within --thread-timeout is outcome timeout, exit code 3."""
    r = client(
        home,
        f"--hosts={slow_agent.address}",
        "--order=exec",
        "--options=service:echo,5",
        "--thread-timeout=1",
        "--format=ndjson",
    )
    assert r.rc == 3, r.stdout
    line = json.loads(r.stdout.splitlines()[0])
    assert line["outcome"] == "timeout" and line["content"] == "Process Timeout(1)!"


def test_usage_errors_exit_1(home, tmp_path):
    """A usage or local error (missing --order, unknown option, --wait without rsync, bad
    config) exits 1, not 2, which means a host failed."""
    assert client(home, "--hosts=127.0.0.1").rc == 1
    assert client(home, "--hosts=127.0.0.1", "--order=status", "--bogus").rc == 1
    assert client(home, "--hosts=127.0.0.1", "--order=status", "--format=xml").rc == 1
    wait = client(home, "--hosts=127.0.0.1", "--order=status", "--wait")
    assert wait.rc == 1 and "--order=rsync" in wait.stderr
    bad = tmp_path / "bad.ini"
    bad.write_text("[client]\nport = 3440\nportt = 1\n")
    r = client(home, "--hosts=127.0.0.1", "--order=status", f"--config={bad}")
    assert r.rc == 1 and f"{bad}:3: unknown key 'portt'" in r.stderr
    missing = client(home, "--hosts=127.0.0.1", "--order=status", f"--config={tmp_path}/none")
    assert missing.rc == 1 and "no such config file" in missing.stderr


def test_table_has_a_row_per_host_and_a_summary(site, home):
    """--format table: host, order, outcome, files, bytes, exit code, time, message per host,
    then counts per outcome; the exit code is the same as with json."""
    ok, down = site.agent.address, down_host()
    r = client(home, f"--hosts={ok},{down}", "--order=status", "--options=web", "--format=table")
    assert r.rc == 3, r.stdout
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "HOST",
        "ORDER",
        "OUTCOME",
        "FILES",
        "BYTES",
        "DELETES",
        "EXIT",
        "TIME",
        "MESSAGE",
    ]
    assert re.match(
        rf"{re.escape(ok)}\s+status\s+ok\s+40\s+78\.1K\s+0\s+-\s+\d+\.\d\ds$", lines[1]
    )
    assert re.match(
        rf"{re.escape(down)}\s+status\s+unreachable(\s+-){{4}}\s+\S+\s+can't connect to", lines[2]
    )
    assert lines[3] == "2 hosts: 1 ok, 1 unreachable"
    assert len(lines) == 4


def test_table_through_a_proxy_has_a_row_per_agent(site, daemons, home, tmp_path):
    """Through a proxy the table shows each agent (with the proxy in VIA), not one proxy row."""
    down = down_host()
    proxy = fleet_proxy(daemons, tmp_path, [site.agent.address, down])
    r = client(
        home, *through(proxy), "--order=exec", "--options=service:echo,hello", "--format=table"
    )
    assert r.rc == 3, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["HOST", "VIA", "ORDER"]
    assert re.match(
        rf"{re.escape(site.agent.address)}\s+{re.escape(proxy.address)}\s+exec\s+ok\s.*\bhello$",
        lines[1],
    )
    assert re.match(
        rf"{re.escape(down)}\s+{re.escape(proxy.address)}\s+exec\s+unreachable", lines[2]
    )
    assert lines[-1] == "2 hosts: 1 ok, 1 unreachable"


def test_ndjson_streams_a_line_per_host_as_it_answers(site, slow_agent, home):
    """--format ndjson writes each host's line as soon as it answers (the fast ones while the
    slow one still runs), then a summary line with counts and the exit code."""
    fast, slow, down = site.agent.address, slow_agent.address, down_host()
    proc = subprocess.Popen(
        [tool("deploy-client"), f"--hosts={slow},{fast},{down}", "--order=exec"]
        + ["--options=service:echo,3", "--format=ndjson"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(HOME=str(home)),
    )
    try:
        assert proc.stdout is not None
        first = [json.loads(proc.stdout.readline()) for _ in range(2)]
        still_running = proc.poll() is None
        rest = [json.loads(line) for line in proc.stdout]
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert still_running, "the fast hosts' lines came only when the slow host had answered"
    assert {(d["host"], d["outcome"]) for d in first} == {(fast, "ok"), (down, "unreachable")}
    fast_line = next(d for d in first if d["host"] == fast)
    assert fast_line["order"] == "exec" and fast_line["returnCode"] == "200"
    assert fast_line["content"]["return"] == "true" and fast_line["seconds"] >= 0
    assert [d.get("host") for d in rest] == [slow, None]
    assert rest[0]["outcome"] == "ok"
    assert rest[1] == {
        "summary": {
            "total": 3,
            "outcomes": {"ok": 2, "unreachable": 1},
            "stopped": False,
            "exitCode": 3,
        }
    }
    assert proc.returncode == 3


# ------------------------------------------------------------------------- progress line


class TtyClient:
    """deploy-client running with stderr on a pseudo-terminal (120 columns unless told), stdout
    on a pipe; what it wrote to the terminal so far is in `tty`."""

    def __init__(self, args: list[str], env: dict[str, str], columns: int = 120) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        self.master = master
        self.seen = bytearray()
        self.proc = subprocess.Popen(
            [tool("deploy-client"), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.seen.extend(chunk)

    @property
    def tty(self) -> str:
        return bytes(self.seen).decode(errors="replace")

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        """Wait for the client; its exit code, stdout and everything it wrote on the terminal."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)
        os.close(self.master)
        return self.proc.returncode, out.decode(), self.tty


def run_with_tty_stderr(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run deploy-client to its end with stderr on a pseudo-terminal."""
    return TtyClient(args, env).finish()


def test_progress_line_only_on_a_terminal(site, home):
    """On a terminal, stderr shows `N/M answered, F failed` as hosts answer (and clears it);
    when stderr is not a terminal nothing extra is written."""
    args = [f"--hosts={site.agent.address},{down_host()}", "--order=exec", "--options=service:echo"]
    rc, out, tty = run_with_tty_stderr(args, clean_env(HOME=str(home)))
    assert rc == 3
    assert "0/2 answered, 0 failed" in tty
    assert "2/2 answered, 1 failed" in tty
    assert tty.endswith("\r\x1b[K")
    assert json.loads(out)  # stdout is untouched by the progress line
    piped = client(home, *args)
    assert piped.rc == 3 and piped.stderr == ""


def test_progress_line_can_be_injected(capsys):
    """ProgressLine writes only when enabled (isatty), truncating to the terminal width."""
    import io

    quiet = progressline.ProgressLine(io.StringIO(), enabled=False)
    quiet.update("1/2 answered, 0 failed")
    assert quiet.stream.getvalue() == ""  # type: ignore[attr-defined]
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    line = progressline.ProgressLine(tty)
    line.width = lambda: 30  # type: ignore[method-assign]
    line.update("12/50 answered, 1 failed, and a long tail")
    line.clear()
    assert tty.getvalue() == "\r\x1b[K12/50 answered, 1 failed, ...\r\x1b[K"


# ------------------------------------------------------------------------- --retry-failed


def test_retry_failed_from_json_and_ndjson(site, daemons, home, tmp_path):
    """--retry-failed re-runs the order on only the hosts that did not succeed in a saved JSON
    or NDJSON result; once they are up, they succeed and the exit code is 0."""
    ok = site.agent.address
    late_port = free_port()
    late = f"127.0.0.1:{late_port}"
    args = [f"--hosts={ok},{late}", "--order=status", "--options=web"]
    saved_json = client(home, *args)
    saved_ndjson = client(home, *args, "--format=ndjson")
    assert saved_json.rc == saved_ndjson.rc == 3
    (tmp_path / "run.json").write_text(saved_json.stdout)
    (tmp_path / "run.ndjson").write_text(saved_ndjson.stdout)
    daemons.agent(
        port=late_port,
        groups=site.groups(),
        state=tmp_path / "state-late",
        allow_paths=[site.targets],
    )
    for name in ("run.json", "run.ndjson"):
        r = client(home, f"--retry-failed={tmp_path / name}", "--options=web")
        assert r.rc == 0, (name, r.stdout, r.stderr)
        assert list(r.json) == [late]
        assert r.content(late, "status")["return"] == "true"
    both = client(home, f"--retry-failed={tmp_path / 'run.json'}", f"--hosts={ok}")
    assert both.rc == 1 and "leave out --hosts" in both.stderr


def test_retry_failed_through_a_proxy_names_the_failed_agents(site, daemons, home, tmp_path):
    """Through a proxy, --retry-failed sends the proxy only the agents that failed
    (`--args=hosts:...`), so agents that succeeded are not ordered again."""
    late_port = free_port()
    late = f"127.0.0.1:{late_port}"
    proxy = fleet_proxy(daemons, tmp_path, [site.agent.address, late])
    first = client(
        home,
        f"--hosts={proxy.address}",
        "--args=groups:fleet",
        "--order=exec",
        "--options=service:echo,again",
        "--format=ndjson",
        DEPLOY_API_KEY="k1",
    )
    assert first.rc == 3, first.stdout + first.stderr
    saved = tmp_path / "proxy.ndjson"
    saved.write_text(first.stdout)
    plan = retry_plan(read_result_rows(str(saved)))
    assert plan.via == {proxy.address: [late]} and plan.direct == []
    daemons.agent(
        port=late_port, jobs=site.jobs, state=tmp_path / "state-late", allow_paths=[site.targets]
    )
    r = client(home, f"--retry-failed={saved}", "--options=service:echo,again", DEPLOY_API_KEY="k1")
    assert r.rc == 0, r.stdout + r.stderr
    assert list(r.content(proxy.address, "exec")) == [late]


def test_retry_plan_from_a_json_result():
    """Failed, unreachable, timed-out and skipped hosts are retried; ok and warning are not."""

    def entry(code: Any, content: Any, status: int = 1, **kw: Any) -> dict[str, Any]:
        return {
            "return": 1,
            "serverStatus": status,
            "returnCode": code,
            "returnString": "",
            "content": content,
            **kw,
        }

    result = {
        "a": {"status": entry("200", {"return": "true"})},
        "b": {"status": entry("200", {"return": "false"})},
        "c": {"status": entry("", "can't connect to c:3440", status=0)},
        "d": {"status": entry("", "skipped", status=0, skipped=True)},
        "e": {"status": entry("401", "bad signature")},
        "p": {
            "status": entry(
                "200",
                {
                    "x": {"status": entry(200, {"return": "true"})},
                    "y": {"status": entry(0, "Process Timeout(10)!", status=0)},
                },
            )
        },
    }
    rows = output.rows_from_result_map(result)
    assert [(r.host, r.outcome) for r in rows] == [
        ("a", "ok"),
        ("b", "failed"),
        ("c", "unreachable"),
        ("d", "skipped"),
        ("e", "failed"),
        ("x", "ok"),
        ("y", "timeout"),
    ]
    plan = retry_plan(rows)
    assert plan.direct == ["b", "c", "d", "e"] and plan.via == {"p": ["y"]}
    assert output.exit_code(rows) == 4
    assert output.exit_code([r for r in rows if r.host != "d"]) == 2


# ------------------------------------------------------------------------- config and env


def test_precedence_command_line_env_file_default(tmp_path):
    """Each setting comes from the command line, else the environment (secrets only), else the
    config file, else the default."""
    cfg = tmp_path / "client.ini"
    cfg.write_text("[client]\nkey_cipher = from-file\nport = 4000\nformat = table\n")
    cfg.chmod(0o600)
    file = clientconfig.load(str(cfg), {})
    assert file.warnings == []
    env = {"DEPLOY_KEY_CIPHER": "from-env"}
    r = clientconfig.resolve({"key_cipher": None, "port": None}, env, file)
    assert (r["key_cipher"], r["port"], r["format"], r["api_key"]) == (
        "from-env",
        4000,
        "table",
        "",
    )
    assert r["sources"]["key_cipher"] == "DEPLOY_KEY_CIPHER"
    r = clientconfig.resolve({"key_cipher": "from-cli", "format": "json"}, env, file)
    assert (r["key_cipher"], r["format"]) == ("from-cli", "json")
    r = clientconfig.resolve({}, {}, file)
    # thread_timeout has no fixed default: deploy.cli picks 10 s for agents, 60 s for a proxy
    assert r["key_cipher"] == "from-file" and r["thread_timeout"] is None
    assert clientconfig.resolve({}, {}, clientconfig.ClientFileConfig())["key_cipher"] == "65535"


def test_config_file_paths_and_secret_warning(tmp_path):
    """TLS paths are relative to the file; a secret in a group/world-readable file warns."""
    cfg = tmp_path / "client.ini"
    cfg.write_text("; my fleet\n[client]\napi_key = k\nssl_ca = ca.pem\nlegacy_auth = yes\n")
    cfg.chmod(0o644)
    loaded = clientconfig.load(str(cfg), {})
    assert loaded.values["ssl_ca"] == str(tmp_path / "ca.pem")
    assert loaded.values["legacy_auth"] is True
    assert loaded.warnings == [
        f"{cfg} holds api_key and is readable by its group and others (mode 0644); "
        f"run: chmod 600 {cfg}"
    ]
    cfg.chmod(0o600)
    assert clientconfig.load(str(cfg), {}).warnings == []
    assert clientconfig.default_path({"HOME": "/h"}) == "/h/.config/deploy/client.ini"
    assert clientconfig.default_path({"XDG_CONFIG_HOME": "/x"}) == "/x/deploy/client.ini"


def test_default_config_file_env_and_command_line_end_to_end(site, home):
    """~/.config/deploy/client.ini supplies port and format; DEPLOY_KEY_CIPHER beats the file's
    key; --key-cipher beats the environment; --format beats the file."""
    cfg = home / ".config" / "deploy" / "client.ini"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"[client]\nport = {site.agent.port}\nkey_cipher = wrong\nformat = table\n")
    cfg.chmod(0o640)
    args = ["--hosts=127.0.0.1", "--order=status", "--options=web"]
    from_file = client(home, *args)
    assert from_file.rc == 2  # the file's key is wrong: the agent refuses the signature
    assert "holds key_cipher and is readable by its group" in from_file.stderr
    assert from_file.stdout.splitlines()[0].startswith("HOST")
    assert "127.0.0.1  status  failed" in from_file.stdout
    env_wins = client(home, *args, "--format=json", DEPLOY_KEY_CIPHER="65535")
    assert env_wins.rc == 0, env_wins.stdout
    assert env_wins.content("127.0.0.1", "status")["transferFilesCount"] == "40"
    cli_wins = client(home, *args, "--key-cipher=wrong-too", DEPLOY_KEY_CIPHER="65535")
    assert cli_wins.rc == 2


def test_bad_value_in_config_is_exit_1_naming_file_and_line(tmp_path, capsys):
    """A bad value in the config file is exit 1 naming file:line, before any connection."""
    cfg = tmp_path / "c.ini"
    cfg.write_text("[client]\n\nport = many\n")
    rc = main(["--hosts=h", "--order=status", f"--config={cfg}"], env={})
    assert rc == 1
    assert f"{cfg}:3: port: expected port number 1-65535, got 'many'" in capsys.readouterr().err


# ------------------------------------------------------------------------- start-up


def test_import_and_help_do_not_load_the_reactor():
    """`import deploy.cli` does not import the reactor, and `--help` imports no Twisted at all:
    start-up stays fast."""
    code = (
        "import sys, io, contextlib\n"
        "import deploy.cli\n"
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        deploy.cli.main(['--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        "assert 'exit codes:' in out.getvalue()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'OpenSSL'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_help_documents_every_exit_code():
    """--help lists each exit code from the one table the exit code logic uses."""
    done = subprocess.run(
        [tool("deploy-client"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    for code, text in output.EXIT_CODES.items():
        assert f"  {code}  {text}" in done.stdout


def test_sample_client_config_documents_every_key(tmp_path):
    """etc/deploy_client.ini loads as is, and with every setting uncommented it sets each key the
    client knows, each with a valid value."""
    sample = Path(__file__).parent.parent / "etc" / "deploy_client.ini"
    text = sample.read_text()
    assert clientconfig.parse(text, str(sample)).values == {}
    active = re.sub(r"^;(\w+\s*=)", r"\1", text, flags=re.MULTILINE)
    values = clientconfig.parse(active, str(tmp_path / "client.ini"), 0o600).values
    assert sorted(values) == sorted(clientconfig.DEFAULTS)


def test_thread_timeout_default_is_longer_through_a_proxy():
    """Without --thread-timeout the client waits 10 s for an agent but 60 s for a proxy, which
    answers only after its own agents (each up to its [client] thread_timeout)."""
    from deploy.clientrun import thread_timeout_for

    assert thread_timeout_for(None, via_proxy=False) == 10.0
    assert thread_timeout_for(None, via_proxy=True) == 60.0
    assert thread_timeout_for(3.0, via_proxy=True) == 3.0
