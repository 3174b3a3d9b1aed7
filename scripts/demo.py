"""A real local deployment on loopback: an rsync daemon serving a release, one deploy-agent, and
deploy-client driving it through status → rlist → rsync → (wait) → status → exec.

Run by scripts/demo.sh after the install; everything lives in a temporary directory and every
process started here is stopped when the demo ends, also on failure."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"demo: timed out waiting for {what}")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def step(title: str, *args: str, agent: str) -> dict:
    print(f"\n$ deploy-client --hosts={agent} {' '.join(args)}    # {title}", flush=True)
    out = subprocess.run(
        [str(BIN / "deploy-client"), f"--hosts={agent}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(out.stdout, end="", flush=True)
    if out.stderr:
        print(out.stderr, end="", file=sys.stderr, flush=True)
    result = json.loads(out.stdout)
    entry = next(iter(result.values()))
    return next(iter(entry.values()))


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="deploy-demo-"))
    procs: list[subprocess.Popen] = []
    try:
        release = work / "release"
        for i in range(200):
            d = release / f"app/module{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"file{i:03d}.txt").write_text(f"release 1, file {i}\n" * 50)
        (release / "index.html").write_text("<h1>hello from deploy</h1>\n")
        (work / "www").mkdir()
        rsync_port, agent_port = free_port(), free_port()
        (work / "rsyncd.conf").write_text(
            f"use chroot = no\nlog file = {work}/rsyncd.log\n"
            f"[RELEASE]\n    path = {release}\n    read only = yes\n"
        )
        (work / "deploy_agent_exec.ini").write_text(
            "[service]\nservice:echo = /bin/echo %s\nservice:uptime = /usr/bin/uptime\n"
        )
        (work / "deploy_agent.ini").write_text(
            f"""[server]
addr = 127.0.0.1
port = {agent_port}
state_path = {work}/state

[allow::hosts]
host[] = 127.0.0.1

[allow::paths]
path[] = {work}/www

[rsync::group::web]
dest = 127.0.0.1::RELEASE/
src = {work}/www/site
option[] = --port={rsync_port}
option[] = --archive
option[] = --delete
option[] = --bwlimit=2000

[jobs]
path = {work}/deploy_agent_exec.ini
"""
        )
        print(f"demo: working in {work}")
        rsync = shutil.which("rsync")
        if not rsync:
            raise SystemExit("demo: rsync is not installed (scripts/setup.sh installs it)")
        rsync_log = open(work / "rsyncd.out", "wb")
        procs.append(
            subprocess.Popen(
                [rsync, "--daemon", "--no-detach", f"--config={work}/rsyncd.conf",
                 f"--port={rsync_port}", "--address=127.0.0.1"],
                stdout=rsync_log, stderr=subprocess.STDOUT,
            )
        )
        wait_for("the rsync daemon", lambda: listening(rsync_port))
        print(f"demo: rsync daemon on 127.0.0.1:{rsync_port} serving {release}")
        agent_log = open(work / "agent.log", "wb")
        procs.append(
            subprocess.Popen(
                [str(BIN / "twistd"), "-n", "--pidfile=", "deploy-agent",
                 "--path", str(work / "deploy_agent.ini")],
                stdout=agent_log, stderr=subprocess.STDOUT, cwd=work,
            )
        )

        def agent_up() -> bool:
            if procs[-1].poll() is not None:
                raise SystemExit("demo: the agent exited:\n" + (work / "agent.log").read_text())
            return listening(agent_port)

        wait_for("the agent", agent_up)
        print(f"demo: deploy-agent on 127.0.0.1:{agent_port} (log: {work}/agent.log)")
        agent = f"127.0.0.1:{agent_port}"

        step("what would a sync change?", "--order=status", "--options=web", agent=agent)
        rlist = step("which files?", "--order=rlist", "--options=web", agent=agent)
        files = rlist["content"]["transferNewFiles"]
        print(f"demo: rlist lists {len(files)} entries")
        started = step("start the sync in the background", "--order=rsync", "--options=web",
                       agent=agent)
        assert started["content"]["return"] == "true", started

        def finished() -> dict | None:
            out = subprocess.run(
                [str(BIN / "deploy-client"), f"--hosts={agent}", "--order=status",
                 "--options=web"],
                capture_output=True, text=True, timeout=60,
            )
            content = json.loads(out.stdout)[agent]["status"]["content"]
            if content.get("alreadyRsync") == "true":
                progress = content.get("progress")
                shown = (f"{progress['percent']}% at {progress['rate']}, eta {progress['eta']}"
                         if progress else "starting")
                print(f"demo: syncing... {shown}", flush=True)
                return None
            return content

        wait_for("the sync to finish", finished, timeout=120, interval=0.5)
        final = step("in sync now, with the last sync's outcome", "--order=status",
                     "--options=web", agent=agent)
        outcome = final["content"].get("lastRsync", {}).get("outcome")
        ran = step("run a configured command", "--order=exec", "--options=service:echo,deployed",
                   agent=agent)
        output = base64.b64decode(ran["content"]["content"]).decode(errors="replace")
        print(f"demo: the command printed {output.strip()!r} (content is base64, as the "
              "original's)")
        synced = sum(1 for _ in (work / "www/site").rglob("*.txt"))
        print(f"\ndemo: done — last sync outcome {outcome!r}, {synced} files in {work}/www/site")
        return 0 if outcome == "ok" else 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if os.environ.get("DEPLOY_DEMO_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
