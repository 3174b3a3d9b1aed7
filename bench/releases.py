"""Release mode (issue 17), on loopback, kept out of the CI run:

- a release sync of a FILES-file tree with 1% of files changed, against an in-place sync of the
  same change (target: <= 1.3x), and the disk it adds against the changed bytes (<= 1.1x, plus
  directory/inode overhead, reported), for link_dest = true (two passes from a prepared base,
  whose preparation after each sync is reported apart) and link_dest = false;
- the agent-side answer time of `activate`/`rollback` (median, target <= 20 ms; measured as the
  round trip of one signed request, which bounds it from above).

    .venv/bin/python bench/releases.py [--files 40000] [--rounds 3] [--switches 200]

Appends its figures to bench/RESULTS.md (section "Release mode")."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.client import ClientOptions, Order, build_request
from deploy.jobstate import read_state
from deploy.testing import (
    AgentProcess,
    RsyncDaemon,
    agent_ini,
    free_port,
    wait_until,
)

HERE = Path(__file__).resolve().parent


def ask(agent: AgentProcess, order: str, options: str) -> tuple[float, Any]:
    import json
    import socket

    request = build_request(Order(order, options), ClientOptions(), agent.host, time.time())
    started = time.perf_counter()
    with socket.create_connection((agent.host, agent.port), timeout=300) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    took = time.perf_counter() - started
    body = data.partition(b"\r\n\r\n")[2]
    return took, json.loads(body) if body.startswith(b"{") else body.decode()


def build(root: Path, files: int) -> None:
    rng = random.Random(9)
    for i in range(files):
        d = root / f"d{i % 200:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.txt").write_bytes(rng.randbytes(rng.randint(200, 4000)))


def change(root: Path, files: int, fraction: float, seed: int) -> int:
    """Rewrite `fraction` of the files with new content; answers the bytes written."""
    rng = random.Random(seed)
    written = 0
    for i in rng.sample(range(files), max(1, int(files * fraction))):
        path = root / f"d{i % 200:03d}" / f"f{i:06d}.txt"
        data = rng.randbytes(rng.randint(200, 4000))
        path.write_bytes(data)
        written += len(data)
    return written


RECORDS: dict[str, Path] = {}  # group -> its sync record, found once by runId


def sync(agent: AgentProcess, state: Path, group: str, src: str, dest: str) -> float:
    started = time.perf_counter()
    _, body = ask(agent, "rsync", group)
    run = body["runId"]

    def ended() -> bool:
        if group not in RECORDS:
            for path in state.rglob("*.json"):
                if (read_state(str(path)) or {}).get("runId") == run:
                    RECORDS[group] = path
            if group not in RECORDS:
                return False
        record = read_state(str(RECORDS[group])) or {}
        return record.get("state") == "ended" and record.get("runId") == run

    wait_until(ended, 600, interval=0.005)
    return time.perf_counter() - started


def wait_for_supervisor(record: Path) -> float:
    """After the end is recorded the sync's supervisor still removes the releases cleanup took
    out and, for two passes, prepares the next base: wait for it to exit, so that no timed sync
    shares the machine with that work; answers how long it took past the end."""
    from deploy.process import is_same_process

    started = time.perf_counter()
    state = read_state(str(record)) or {}
    pid, ticks = state.get("supervisorPid"), state.get("supervisorStart")
    wait_until(lambda: not is_same_process(pid, ticks), 600, interval=0.005)
    took = time.perf_counter() - started
    # and the kernel's writeback of what it dirtied (a hard-link copy dirties every inode it
    # links): each timed sync starts with nothing left to flush, as one a while later would
    os.sync()
    return took


def new_inode_bytes(live: Path, previous: Path | None) -> tuple[int, int]:
    """Bytes (and count) of the files of `live` whose inode no other release shares."""
    seen = set()
    if previous is not None:
        for dirpath, _, names in os.walk(previous):
            for n in names:
                seen.add(os.lstat(os.path.join(dirpath, n)).st_ino)
    total = count = 0
    for dirpath, _, names in os.walk(live):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if st.st_ino not in seen:
                total += st.st_size
                count += 1
    return total, count


def tree_size(root: Path, prefix: str) -> tuple[int, int]:
    """Directories and other entries of the directory of `root` whose name starts with
    `prefix` (the prepared base)."""
    dirs = entries = 0
    for name in os.listdir(root):
        if name.startswith(prefix):
            for _, _, files in os.walk(root / name):
                dirs += 1
                entries += len(files)
    return dirs, entries


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=40000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--switches", type=int, default=200)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-releases-"))
    started: list[Any] = []
    try:
        tree = work / "tree"
        build(tree, args.files)
        targets = work / "targets"
        targets.mkdir()
        rsyncd = RsyncDaemon(work, {"DEST": tree})
        started.append(rsyncd)
        base = [f"--port={rsyncd.port}", "--archive", "--delete"]
        dest = rsyncd.url("DEST")
        groups = {
            "inplace": {"dest": dest, "src": targets / "inplace", "option": base},
            # the same without the empty-source listing an in-place sync runs first
            "unguarded": {
                "dest": dest,
                "src": targets / "unguarded",
                "option": base,
                "allow_empty_source": "true",
            },
            "rel": {"dest": dest, "src": targets / "rel", "option": base, "releases": 3},
            "private": {
                "dest": dest,
                "src": targets / "private",
                "option": base,
                "releases": 3,
                "link_dest": "false",
            },
        }
        kinds = ("inplace", "unguarded", "rel", "private")
        port = free_port()
        state = work / "state"
        agent = AgentProcess(
            work,
            agent_ini(
                host="127.0.0.1", port=port, state=state, allow_paths=[targets], groups=groups
            ),
            "127.0.0.1",
            port,
        )
        started.append(agent)
        after: dict[str, list[float]] = {k: [] for k in kinds}  # past the end, per group

        two_pass: list[bool] = []  # per rel sync: made in two passes (not --link-dest)

        def timed(group: str) -> float:
            took = sync(agent, state, group, str(targets / group), dest)
            if group == "rel":
                record = read_state(str(RECORDS[group])) or {}
                two_pass.append(record.get("releaseTwoPass") is True)
            after[group].append(wait_for_supervisor(RECORDS[group]))
            return took

        for group in kinds:
            timed(group)
        for seed in range(3):  # warm-up: past N releases, so cleanup keeps a spare
            change(tree, args.files, 0.01, 100 + seed)
            for group in kinds:
                timed(group)
        for spent in after.values():
            spent.clear()
        two_pass.clear()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        disk: dict[str, list[tuple[float, int, int]]] = {"rel": [], "private": []}
        for seed in range(args.rounds):
            changed = change(tree, args.files, 0.01, 200 + seed)
            for group in kinds:
                times[group].append(timed(group))
            for group in disk:
                live = Path(os.path.realpath(targets / group))
                rels = sorted(p for p in live.parent.iterdir() if not p.name.startswith("."))
                previous = rels[-2] if len(rels) > 1 else None
                added, count = new_inode_bytes(live, previous)
                disk[group].append((added / changed, count, changed))
        for group in kinds:
            print(group, " ".join(f"{t:.3f}" for t in times[group]), flush=True)
        ratio = {
            g: statistics.median(t / i for t, i in zip(times[g], times["inplace"], strict=True))
            for g in disk
        }
        switch_times = []
        for n in range(args.switches):
            took, answer = ask(agent, "rollback" if n % 2 == 0 else "activate", "rel")
            switch_times.append(took)
        lines = [
            "",
            "## Release mode (issue 17; bench/releases.py)",
            "",
            f"Tree: {args.files} files in 200 directories, 1% of files rewritten per round; "
            f"releases = 3; median of {args.rounds} rounds after 3 warm-up rounds.",
            "",
            "| figure | value | target |",
            "|---|---|---|",
            f"| in-place sync (s, median) | {statistics.median(times['inplace']):.3f} | |",
        ]
        unguarded = {
            g: statistics.median(t / i for t, i in zip(times[g], times["unguarded"], strict=True))
            for g in disk
        }
        lines.append(
            "| in-place sync without its empty-source listing (s, median) | "
            f"{statistics.median(times['unguarded']):.3f} | |"
        )
        for g, name in (("rel", "link_dest = true"), ("private", "link_dest = false")):
            lines += [
                f"| release sync, {name} (s, median) | {statistics.median(times[g]):.3f} | |",
                f"| release / in-place, {name} | {ratio[g]:.2f}x | <= 1.3x |",
                f"| release / in-place without its listing, {name} | {unguarded[g]:.2f}x | |",
                f"| new-inode bytes / changed bytes, {name} | "
                f"{statistics.median(d[0] for d in disk[g]):.2f}x ({disk[g][-1][1]} new inodes "
                f"for {disk[g][-1][2]} changed bytes) | <= 1.1x |",
            ]
        base_dirs, base_entries = tree_size(Path(f"{targets / 'rel'}.releases"), ".base-")
        lines += [
            f"| activate/rollback round trip (ms, median of {args.switches}) | "
            f"{statistics.median(switch_times) * 1000:.1f} | <= 20 ms |",
            f"| link_dest = true syncs made in two passes | {sum(two_pass)} of {len(two_pass)} | |",
            "| after the end, in the background: link_dest = true (purge, next base), "
            f"link_dest = false (purge) (s, median) | {statistics.median(after['rel']):.3f}, "
            f"{statistics.median(after['private']):.3f} | |",
            "",
            "Directory/inode overhead: with link_dest every release is a full tree of "
            f"directories (200 here) and {args.files:,} directory entries, its unchanged files "
            "hard links to the inodes of the releases before it; its sync runs in two passes "
            "from a prepared base (deploy.release_sync), which costs one more such tree "
            f"({base_dirs} directories, {base_entries:,} entries, no file data) between syncs, "
            "made after each sync's end (not in the sync's time: the row above; "
            "each timed sync starts once the previous sync's supervisor is gone). Without "
            "link_dest every release is a private copy (the spare cleanup keeps is brought up "
            "to date instead of being rebuilt). Doomed releases are removed after the sync's "
            "end is recorded, so their removal is not in these times either.",
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(text)
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
