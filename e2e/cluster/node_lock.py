#!/usr/bin/env python3
"""Who owns the machine's one local node: an flock held for as long as a user needs it.

The node (node-up.sh) is machine-wide, so clones of the project share it. Its
owner is a *holder* process this script leaves running: it holds an exclusive
flock on $KUBETASKS_NODE_HOME/lock and lives exactly as long as the process it
watches (a test session's pytest, or the apiserver of the clone whose `make
cluster` started the node); `release` ends it sooner. Because the lock dies
with its holder, "stale" has one meaning: a node whose lock nobody holds. The
next start tears such a node down; a node whose lock is held is never touched,
and a second clone waits for the lock (printing that it waits, up to a
deadline) instead.

  node_lock.py acquire --while-pid PID --owner TEXT [--root DIR] [--timeout S]
        wait for the lock, start the holder, print its pid
  node_lock.py release [--holder PID]   end the holder (only that one, if given)
  node_lock.py status                   print the owner (exit 1 when nobody holds the lock)
  node_lock.py check --holder PID       exit 0 if PID is the live holder
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

HOME = Path(os.environ.get("KUBETASKS_NODE_HOME", "/var/lib/kubetasks-node"))
LOCK = HOME / "lock"
OWNER = HOME / "owner.json"
DEFAULT_TIMEOUT = float(os.environ.get("KUBETASKS_NODE_LOCK_TIMEOUT", "2400"))


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): pids get reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def alive(pid: int, started: str | None) -> bool:
    return started is not None and start_time(pid) == started


def owner() -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(OWNER.read_text())
    except (OSError, ValueError):
        return None
    return data


def is_held() -> bool:
    HOME.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def describe(o: dict[str, Any] | None) -> str:
    if not o:
        return "an unknown owner"
    since = time.strftime("%H:%M:%S", time.localtime(o.get("since", 0)))
    return f"{o.get('owner')} (clone {o.get('root')}, holder pid {o.get('holder')}, since {since})"


def hold(fd: int, while_pid: int, while_started: str | None) -> None:
    """The holder's life: keep ``fd`` (the locked file) open until the watched process ends."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(devnull, std)
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    me = os.getpid()
    while not stop and alive(while_pid, while_started):
        time.sleep(0.5)
    o = owner()
    if o and o.get("holder") == me:
        with contextlib.suppress(OSError):
            OWNER.unlink()
    os.close(fd)  # the lock goes with the last descriptor
    os._exit(0)


def acquire(while_pid: int, who: str, root: str, timeout: float) -> int:
    HOME.mkdir(parents=True, exist_ok=True)
    while_started = start_time(while_pid)
    if while_started is None:
        raise SystemExit(f"node_lock: process {while_pid} does not exist")
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    next_note = 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            now = time.monotonic()
            if not alive(while_pid, while_started):
                raise SystemExit(
                    f"node_lock: process {while_pid} ended while it waited for the lock"
                ) from None
            if now >= deadline:
                raise SystemExit(
                    f"node_lock: the local node is still in use by {describe(owner())} after waiting "
                    f"{timeout:.0f}s; one node per machine (wait for it, or run `make down` in that clone)"
                ) from None
            if now >= next_note:
                print(
                    f"[node-lock] the local node is in use by {describe(owner())}; waiting for it "
                    f"(up to {deadline - now:.0f}s more)",
                    file=sys.stderr,
                    flush=True,
                )
                next_note = now + 30
            time.sleep(1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, b"x")
        os.close(w)
        hold(fd, while_pid, while_started)
    os.close(w)
    os.read(r, 1)  # the holder runs before we let go of our copy of the descriptor
    os.close(r)
    tmp = OWNER.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "holder": pid,
                "holder_started": start_time(pid),
                "while_pid": while_pid,
                "owner": who,
                "root": root,
                "since": time.time(),
            }
        )
    )
    tmp.rename(OWNER)
    os.close(fd)
    return pid


def release(holder: int | None) -> None:
    o = owner()
    if not o:
        return
    pid = int(o["holder"])
    if holder is not None and holder != pid:
        return
    if not alive(pid, o.get("holder_started")):
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not alive(pid, o.get("holder_started")):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("acquire")
    a.add_argument("--while-pid", type=int, required=True)
    a.add_argument("--owner", required=True)
    a.add_argument("--root", default=os.environ.get("KUBETASKS_ROOT", os.getcwd()))
    a.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    r = sub.add_parser("release")
    r.add_argument("--holder", type=int)
    sub.add_parser("status")
    c = sub.add_parser("check")
    c.add_argument("--holder", type=int, required=True)
    args = p.parse_args()
    if args.cmd == "acquire":
        print(acquire(args.while_pid, args.owner, args.root, args.timeout))
        return 0
    if args.cmd == "release":
        release(args.holder)
        return 0
    o = owner()
    held = is_held()
    if args.cmd == "status":
        print(json.dumps({"held": held, **(o or {})}))
        return 0 if held else 1
    ok = (
        held
        and o is not None
        and int(o["holder"]) == args.holder
        and alive(args.holder, o.get("holder_started"))
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
