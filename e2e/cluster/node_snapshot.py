#!/usr/bin/env python3
"""The machine as the local node may change it: taken before the node starts, compared after teardown.

What a kubelet + containerd + runc node can leave behind on a host: processes,
mounts, cgroups, iptables rules and chains, sysctls (the kubelet rewrites a few),
network links, and directories at hard-coded paths. ``take`` records them;
``compare`` lists every difference and sorts it: a difference that names the
node (its state directory, kubepods cgroups, KUBE-* chains, our REJECT rule,
containerd, runc, the CNI, a sysctl we record...) is a leak and fails; any
other difference is printed as a change something else on this shared machine
made meanwhile.

  node_snapshot.py take OUT.json
  node_snapshot.py compare BEFORE.json [--json]    exit 1 if the node left anything behind
  node_snapshot.py sysctls BEFORE.json             print key=value lines to restore
  node_snapshot.py new-paths BEFORE.json           print the fixed paths that exist now but did not then
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HOME = os.environ.get("KUBETASKS_NODE_HOME", "/var/lib/kubetasks-node")
# The kubelet's KernelTunableModify set, and what containerd/runc might touch.
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "fs.inotify.max_user_instances",
    "fs.inotify.max_user_watches",
)
# Paths a kubelet, containerd, runc or the CNI plugins use by default, whatever their flags say.
PATHS = (
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/run/containerd",
    "/run/runc",
    "/var/log/pods",
    "/var/log/containers",
    "/etc/cni",
    "/opt/cni",
    "/var/lib/cni",
    "/run/netns",
    "/etc/kubernetes",
    "/var/run/kubernetes",
)
BINARIES = (
    "kubelet",
    "kube-scheduler",
    "containerd",
    "containerd-shim",
    "containerd-shim-runc-v2",
    "runc",
    "pause",
)
NODE_WORDS = re.compile(
    r"kubetasks-node|kubepods|kubelet|containerd|runc|/pods?/|\bcni|KUBE-|kubetasks-service-range|/netns/cni-|"
    + "|".join(re.escape(p) for p in PATHS if not p.endswith("/netns"))  # other tools make namespaces too
    + "|"
    + re.escape(HOME)
)


def sh(*cmd: str) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else ""


def processes() -> list[str]:
    """Our binaries and anything in a kubepods cgroup, as 'pid exe'."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            exe = os.readlink(d / "exe")
            cg = (d / "cgroup").read_text()
        except OSError:
            continue
        if os.path.basename(exe).split(" ")[0] in BINARIES or "kubepods" in cg:
            out.append(f"{d.name} {exe}")
    return sorted(out)


def mounts() -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        sep = f.index("-")
        out.append(f"{f[4]} {f[sep + 1]} {f[sep + 2]}")  # mount point, fs type, source
    return sorted(out)


def cgroups() -> list[str]:
    """Every cgroup directory two levels deep, and every kubepods one at any depth."""
    root = Path("/sys/fs/cgroup")
    out = set()
    for ctrl in root.iterdir() if root.exists() else []:
        for d in [ctrl, *ctrl.glob("*"), *ctrl.glob("*/*")]:
            if d.is_dir():
                out.add(str(d))
        for d in ctrl.rglob("kubepods*"):
            out.add(str(d))
    return sorted(out)


def iptables() -> list[str]:
    out = []
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw"):
            for raw in sh(f"{tool}-save", "-t", table).splitlines():
                if raw.startswith(("#", "COMMIT")):
                    continue
                rule = re.sub(r"\[\d+:\d+\]", "", raw).strip()  # counters
                out.append(f"{tool} {table} {rule}")
    return sorted(out)


def sysctls() -> dict[str, str]:
    out = {}
    for key in SYSCTLS:
        p = Path("/proc/sys") / key.replace(".", "/")
        if p.exists():
            out[key] = p.read_text().strip()
    return out


def links() -> list[str]:
    return sorted(
        re.sub(r"^\d+: ", "", line.split("\\")[0]).split(" ")[0]
        for line in sh("ip", "-o", "link").splitlines()
    )


def paths() -> list[str]:
    out = []
    for p in PATHS:
        if os.path.lexists(p):
            kids = sorted(os.listdir(p)) if os.path.isdir(p) else []
            out.append(f"{p} [{', '.join(kids[:20])}]")
    return out


def take() -> dict[str, Any]:
    return {
        "processes": processes(),
        "mounts": mounts(),
        "cgroups": cgroups(),
        "iptables": iptables(),
        "sysctls": sysctls(),
        "links": links(),
        "paths": paths(),
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(leaks, other changes) as readable lines."""
    leaks: list[str] = []
    other: list[str] = []
    for kind in ("processes", "mounts", "cgroups", "iptables", "links", "paths"):
        b, a = set(before.get(kind, [])), set(after.get(kind, []))
        for item in sorted(a - b):
            (leaks if kind == "processes" or NODE_WORDS.search(item) else other).append(f"{kind}: + {item}")
        for item in sorted(b - a):
            (leaks if NODE_WORDS.search(item) else other).append(f"{kind}: - {item}")
    for key, value in before.get("sysctls", {}).items():
        now = after.get("sysctls", {}).get(key)
        if now != value:
            leaks.append(f"sysctl: {key} = {now} (was {value})")
    return leaks, other


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("take")
    t.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("--json", action="store_true")
    s = sub.add_parser("sysctls")
    s.add_argument("before", type=Path)
    n = sub.add_parser("new-paths")
    n.add_argument("before", type=Path)
    args = p.parse_args()
    if args.cmd == "take":
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(take(), indent=1))
        tmp.rename(args.out)
        return 0
    before = json.loads(args.before.read_text())
    if args.cmd == "new-paths":
        had = {p.split(" [")[0] for p in before.get("paths", [])}
        for p in PATHS:
            if p not in had and os.path.lexists(p):
                print(p)
        return 0
    if args.cmd == "sysctls":
        for k, v in before.get("sysctls", {}).items():
            print(f"{k}={v}")
        return 0
    leaks, other = compare(before, take())
    if args.json:
        print(json.dumps({"leaks": leaks, "other": other}))
    else:
        for line in other:
            print(f"[node-check] changed meanwhile, not by the node: {line}")
        for line in leaks:
            print(f"[node-check] LEFT BEHIND: {line}")
        if not leaks:
            print("[node-check] the machine is as the snapshot found it")
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main())
