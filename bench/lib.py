"""What the benchmark runs on besides `deploy.testing` (which it shares with the tests):
deterministic release trees, the processes it starts (rsync daemon, agents, proxy, simulated
fleet) and stops by pid, its configs, a raw socket client, and the timers and memory readers the
measurements share."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from deploy import testing
from deploy.testing import ChildProcess

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work"
T = TypeVar("T")


def python_env(**extra: str) -> dict[str, str]:
    """The environment of the Python processes measured: bytecode cached (in bench/work, not in
    the source tree) as an installed package has it, even when this shell sets
    PYTHONDONTWRITEBYTECODE (compiling deploy/*.py at every start would add ~50 ms)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(WORK / "pycache")
    env.update(extra)
    return env


# --------------------------------------------------------------------------- trees


@dataclass(frozen=True)
class TreeSpec:
    """`files` files of `mean_size` bytes on average, `per_dir` per directory, two levels deep;
    about 2% of the names carry a space or a non-ASCII character (rsync escapes neither, the
    agent must pass them through)."""

    name: str
    files: int
    mean_size: int
    per_dir: int = 100
    seed: int = 9

    def marker(self) -> str:
        return json.dumps({"v": 2, **self.__dict__}, sort_keys=True)


def build_tree(root: Path, spec: TreeSpec) -> tuple[int, int]:
    """Create `root` per `spec` unless an identical one is there; returns (files, bytes)."""
    marker = root / ".bench-tree"
    if marker.exists() and marker.read_text().splitlines()[0] == spec.marker():
        files, size = map(int, marker.read_text().splitlines()[1].split())
        return files, size
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    rng = random.Random(spec.seed)
    pool = rng.randbytes(1 << 20)
    total = 0
    dirs_per_top = 20
    for i in range(spec.files):
        d = i // spec.per_dir
        directory = root / f"app{d // dirs_per_top:03d}" / f"mod{d % dirs_per_top:02d}"
        if i % spec.per_dir == 0:
            directory.mkdir(parents=True, exist_ok=True)
        roll = rng.random()
        if roll < 0.01:
            name = f"read me {i:06d}.txt"
        elif roll < 0.02:
            name = f"données-{i:06d}.json"
        else:
            name = f"file_{i:06d}.{('py', 'js', 'css', 'html', 'png')[i % 5]}"
        # Exponential sizes around the mean, capped: many small files, a few large ones.
        size = min(int(rng.expovariate(1 / spec.mean_size)), 16 * spec.mean_size, len(pool))
        start = rng.randrange(0, len(pool) - size + 1)
        (directory / name).write_bytes(pool[start : start + size])
        total += size
    stamp = 1_700_000_000
    for path in root.rglob("*"):
        os.utime(path, (stamp, stamp), follow_symlinks=False)
    marker.write_text(f"{spec.marker()}\n{spec.files} {total}\n")
    return spec.files, total


# --------------------------------------------------------------------------- processes


class Process(ChildProcess):
    """A process the benchmark started: on a machine loaded by the measurement itself it gets
    more time to listen and to stop."""

    def wait_listening(self, host: str, port: int, timeout: float = 60.0) -> None:
        super().wait_listening(host, port, timeout)

    def stop(self, grace: float = 15.0) -> None:
        super().stop(grace)


class Processes:
    """Every process the benchmark starts; `stop_all` ends each by its own pid (TERM, then
    KILL), and only those."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def start(self, name: str, argv: list[str], log: Path, **kw: Any) -> Process:
        p = Process(argv, log, name=name, **kw)
        self.started.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.started):
            p.stop()
        self.started.clear()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM... of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm"):
                key, _, value = line.partition(":")
                out[key] = int(value.split()[0])
    return out


def rss_mb(pid: int) -> float:
    return proc_status(pid)["VmRSS"] / 1024


def hwm_mb(pid: int) -> float:
    return proc_status(pid)["VmHWM"] / 1024


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time of a process (user + system) and, with `children`, of the children it has
    reaped, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after "pid (comm)": state is field 0; utime, stime, cutime, cstime are fields 11-14
    return sum(int(v) for v in fields[11 : 15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def machine_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat), 0..1."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_quiet(threshold: float, budget: float, log: Callable[[str], None]) -> tuple[float, float]:
    """Wait until other work on the machine leaves it at most `threshold` busy for two seconds
    in a row, for at most `budget` seconds. Returns (busy fraction when done, seconds waited)."""
    start = time.monotonic()
    said = False
    while True:
        busy = max(machine_busy(1.0), machine_busy(1.0))
        waited = time.monotonic() - start
        if busy <= threshold or waited >= budget:
            if busy > threshold:
                log(f"machine still {busy:.0%} busy after {waited:.0f} s; measuring anyway")
            return busy, waited
        if not said:
            log(f"machine {busy:.0%} busy with other work; waiting up to {budget:.0f} s")
            said = True


def reset_hwm(pid: int) -> bool:
    """Reset a process's peak RSS to its current RSS (Linux ≥ 4.0); False when not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- configs


# The benchmark's agents log at info and serve loopback only.
agent_ini = functools.partial(
    testing.agent_ini, server={"log_error_level": "info"}, allow_hosts=("127.0.0.0/8",)
)

JOBS = """\
; the benchmark's jobs file, in the original's format
[service]
service:echo = /bin/echo %s
"""

RSYNC_OPTIONS = ("--archive", "--delete", "--force")
# Without TCP_NODELAY on both ends rsync's daemon protocol stalls ~40 ms at a time on Nagle and
# delayed ACKs (seen with strace on loopback): a 100-file dry run takes 70-130 ms instead of
# 28 ms. The benchmark turns it off for the bare runs and the agents alike, so what is left is
# rsync's own work, and the agent's overhead is not hidden in that noise.
NODELAY = "--sockopts=TCP_NODELAY"


def rsync_groups(rsync_port: int, modules: Iterable[str], targets: Path) -> dict[str, Any]:
    """One group per served tree: pull `127.0.0.1::MODULE/` into `targets/<group>`."""
    groups = {}
    for module in modules:
        name = module.lower()
        groups[name] = {
            "dest": f"127.0.0.1::{module}/",
            "src": targets / name,
            "option": [f"--port={rsync_port}", NODELAY, *RSYNC_OPTIONS],
        }
    return groups


def proxy_ini(*, host: str, port: int, agent_port: int, api: Path, max_parallel: int = 64) -> str:
    return (
        "[server]\n"
        f"addr = {host}\nport = {port}\nlog_error_level = info\n\n"
        "[client]\n"
        f"port = {agent_port}\nthread_timeout = 30\nsocket_timeout = 10\n"
        f"max_parallel = {max_parallel}\n\n"
        "[allow::hosts]\nhost[] = 127.0.0.0/8\n\n"
        f"[api]\npath = {api}\n"
    )


def api_ini(key: str, groups: dict[str, list[str]]) -> str:
    out = ["[keys]", f"{key}[] = {','.join(groups)}", "", "[servers]"]
    for name, hosts in groups.items():
        out += [f"{name}[] = {h}" for h in hosts]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- measuring


@dataclass
class Samples:
    """Wall-clock seconds of repeated runs of one thing."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    @property
    def n(self) -> int:
        return len(self.values)


def raw_order(host: str, port: int, order: str, options: str, timeout: float = 300.0) -> bytes:
    """One signed order over a plain socket, as the real client builds it; returns the whole
    answer. Times request in → answer out without any client-side framework."""
    from deploy.client import ClientOptions, Order, build_request

    request = build_request(Order(order, options), ClientOptions(), host, time.time())
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def parse_answer(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


@dataclass
class Run:
    seconds: float
    rc: int
    stdout: bytes
    stderr: bytes
    maxrss_mb: float
    cpu: float  # user + system seconds of the process and the children it reaped


def run_timed(argv: list[str], timeout: float, env: Any = None) -> Run:
    """Run a command to its end: its wall time, output, and peak RSS (wait4's rusage)."""
    import selectors

    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    deadline = time.monotonic() + timeout
    buffers: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                proc.wait(10)
                raise RuntimeError(f"{argv[0]} did not finish in {timeout:g}s")
            for key, _ in sel.select(min(left, 1.0)):
                chunk = os.read(key.fd, 1 << 20)
                if chunk:
                    buffers[key.fd].append(chunk)
                else:
                    sel.unregister(key.fileobj)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = b"".join(buffers[proc.stdout.fileno()])
    err = b"".join(buffers[proc.stderr.fileno()])
    proc.stdout.close()
    proc.stderr.close()
    cpu = usage.ru_utime + usage.ru_stime
    return Run(seconds, proc.returncode, out, err, usage.ru_maxrss / 1024, cpu)


def slope(runs: dict[int, Samples]) -> float:
    """Least-squares slope of wall time over the number of hosts, fitted to every sample of
    every run (`runs`: hosts → samples): the marginal cost of one more host, in seconds."""
    points = [(k, v) for k, s in runs.items() for v in s.values]
    mean_k = statistics.fmean(k for k, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((k - mean_k) ** 2 for k, _ in points)
    return sum((k - mean_k) * (v - mean_v) for k, v in points) / spread
