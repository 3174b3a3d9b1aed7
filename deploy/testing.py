"""Real daemons on loopback, for the tests and the benchmark alike: free ports, waiting with a
deadline, an rsync daemon and `twistd -n deploy-agent`/`deploy-proxy` as child processes that are
stopped by their own pid, agent configs in the original's dialect and release trees."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
BIN = Path(sys.executable).parent
LOG_TAIL = 5000  # characters of a child's output shown when it exits before it listens


class NotReady(AssertionError):
    """What was waited for did not come: the deadline passed, or the process exited first."""


def tool(name: str) -> str:
    """An executable next to this interpreter (its venv's twistd/deploy-client), else on PATH.
    A pyenv shim on PATH costs ~50 ms per start, so the interpreter's own bin comes first."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed next to {sys.executable} nor on PATH")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` (IPv4 or IPv6) right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; NotReady after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise NotReady(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(interval)


def can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ChildProcess:
    """A child process we started, its output appended to `log`; `stop()` ends it (TERM, then
    KILL) and only it."""

    name = "process"

    def __init__(
        self,
        argv: list[str],
        log: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        self.argv = argv
        self.log = log
        self._log_file = open(log, "ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_listening(self, host: str, port: int, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise NotReady(
                    f"{self.name} exited with {self.proc.returncode}:\n"
                    + self.log_text()[-LOG_TAIL:]
                )
            return can_connect(host, port)

        wait_until(ready, timeout, what=f"{self.name} to listen on {host}:{port}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()


class RsyncDaemon(ChildProcess):
    """`rsync --daemon --no-detach` serving `modules` read-only on host:port."""

    name = "rsyncd"

    def __init__(
        self,
        workdir: Path,
        modules: dict[str, Path],
        host: str = "127.0.0.1",
        max_connections: int = 0,
    ) -> None:
        self.host = host
        self.port = free_port(host)
        conf = workdir / f"rsyncd-{self.port}.conf"
        lines = ["use chroot = no", f"max connections = {max_connections}"]
        lines += [
            f"log file = {workdir}/rsyncd.log",
            f"lock file = {workdir}/rsyncd-{self.port}.lock",
        ]
        for name, path in modules.items():
            lines += [f"[{name}]", f"    path = {path}", "    read only = yes", "    list = yes"]
        conf.write_text("\n".join(lines) + "\n")
        super().__init__(
            [
                tool("rsync"),
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                f"--port={self.port}",
                f"--address={host}",
            ],
            workdir / f"rsyncd-{self.port}.out",
        )
        self.wait_listening(host, self.port)

    def url(self, module: str) -> str:
        return f"{self.host}::{module}/"

    def group(self, src: Path | str, *options: str, module: str = "DEST") -> dict[str, Any]:
        """An agent's rsync group that pulls `module` from this daemon into `src`."""
        return {"dest": self.url(module), "src": src, "option": [f"--port={self.port}", *options]}


def agent_ini(
    *,
    host: str,
    port: int,
    state: Path,
    allow_paths: Sequence[Path],
    groups: dict[str, dict[str, Any]] | None = None,
    jobs: Path | None = None,
    server: dict[str, Any] | None = None,
    allow_hosts: Sequence[str] = ("127.0.0.0/8", "::1"),
) -> str:
    """An agent config in the original's dialect."""
    out = ["[server]", f"addr = {host}", f"port = {port}", f"state_path = {state}"]
    out += [f"{k} = {v}" for k, v in (server or {}).items()]
    out += ["", "[allow::hosts]"] + [f"host[] = {h}" for h in allow_hosts]
    out += ["", "[allow::paths]"] + [f"path[] = {p}" for p in allow_paths]
    for name, keys in (groups or {}).items():
        out += ["", f"[rsync::group::{name}]"]
        for key, value in keys.items():
            if isinstance(value, list | tuple):
                out += [f"{key}[] = {v}" for v in value]
            else:
                out.append(f"{key} = {value}")
    if jobs is not None:
        out += ["", "[jobs]", f"path = {jobs}"]
    return "\n".join(out) + "\n"


class AgentProcess(ChildProcess):
    """`twistd -n --pidfile= deploy-agent --path INI` on host:port."""

    name = "deploy-agent"
    plugin = "deploy-agent"

    def __init__(
        self,
        workdir: Path,
        ini_text: str,
        host: str,
        port: int,
        extra: list[str] | None = None,
        wait: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.workdir = workdir
        self.ini = workdir / f"{self.plugin}-{host}-{port}.ini"
        self.ini.write_text(ini_text)
        super().__init__(
            [
                tool("twistd"),
                "-n",
                "--pidfile=",
                "--logfile=-",
                self.plugin,
                "--path",
                str(self.ini),
                *(extra or []),
            ],
            workdir / f"{self.plugin}-{host}-{port}.log",
            cwd=workdir,
        )
        if wait:
            self.wait_listening(host, port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ProxyProcess(AgentProcess):
    name = "deploy-proxy"
    plugin = "deploy-proxy"


def make_tree(root: Path, files: int = 20, size: int = 100, dirs: int = 4) -> Path:
    """A release tree: `files` files of `size` bytes spread over `dirs` directories."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = root / f"d{i % dirs:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.dat").write_bytes(bytes([65 + i % 26]) * size)
    return root
