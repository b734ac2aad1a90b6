#!/usr/bin/env bash
# Tear down the machine's local node (node-up.sh) and leave the machine as the
# snapshot taken before it started found it: kube-scheduler, kubelet, every pod
# and containerd (by their pids, checked against their binaries), leftover
# shims and pod processes, mounts, kubepods cgroups, the kubelet's KUBE-*
# iptables chains and our service-range REJECT rule, the sysctls the kubelet
# rewrote, and the directories the node created. Then compares the machine
# with the snapshot (node_snapshot.py) and exits 1 if anything was left behind.
#
# Usage: node-down.sh            the node of this clone, or a stale one (nobody holds its lock)
#        node-down.sh --stale    called by node-up.sh, which holds the lock, before a start
#        node-down.sh --force    whatever holds the lock (a test of the teardown itself)
#        node-down.sh --purge    as with no argument, and empty the kept image store too
# Logs of the last node stay in $KUBETASKS_NODE_HOME/logs, containerd's image
# store (no pods, no containers) in $KUBETASKS_NODE_HOME/containerd.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/env.sh"
H="$KUBETASKS_NODE_HOME"
S="$H/state"
MODE="${1:-}"
T0="$(date +%s%N)"
say() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[node-down %d.%ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }

purge() { [ "$MODE" = --purge ] && rm -rf "$H/containerd" && say "image store emptied"; return 0; }
[ -d "$S" ] || { say "no local node on this machine"; purge; exit 0; }
if [ "$MODE" = "" ] || [ "$MODE" = --purge ]; then
  # Only our own node, or one nobody owns any more.
  if status="$(python3 "$HERE/node_lock.py" status)"; then
    owner_root="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("root",""))' "$status")"
    if [ "$owner_root" != "$KUBETASKS_ROOT" ]; then
      say "the local node belongs to $owner_root; leaving it alone"
      exit 0
    fi
  fi
fi

# stop <name> <binary>: the recorded pid, only if it still runs that binary
stop() {
  local f="$S/$1.pid" pid i
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$2" ]; then
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$f"
}

SOCK="$S/containerd/run/containerd.sock"
stop kube-scheduler "$KUBETASKS_SCHEDULER"
stop kubelet "$KUBETASKS_KUBELET"
cpid="$(cat "$S/containerd.pid" 2>/dev/null)"
if [ -n "$cpid" ] && [ "$(readlink "/proc/$cpid/exe" 2>/dev/null)" = "$(command -v containerd)" ] && [ -S "$SOCK" ]; then
  # every pod sandbox and container, through the CRI, so their mounts go with them
  if [ -x "$KUBETASKS_CRICTL" ]; then
    C=("$KUBETASKS_CRICTL" --runtime-endpoint "unix://$SOCK" --image-endpoint "unix://$SOCK" --timeout 20s)
    "${C[@]}" stopp $("${C[@]}" pods -q 2>/dev/null) >/dev/null 2>&1
    "${C[@]}" rmp -f $("${C[@]}" pods -q 2>/dev/null) >/dev/null 2>&1
    "${C[@]}" rm -f $("${C[@]}" ps -aq 2>/dev/null) >/dev/null 2>&1
  fi
  for t in $(ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr --address "$SOCK" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1
  done
fi
say "pods removed"
stop containerd "$(command -v containerd)"

# processes still alive: shims started for our socket, anything in a kubepods cgroup
kill_leftovers() {
  local pid n=0
  for pid in $(grep -l -- "$S/containerd" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
    case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in
      */containerd-shim*) kill -KILL "$pid" 2>/dev/null && n=$((n + 1)) ;;
    esac
  done
  for pid in $(cat /sys/fs/cgroup/*/kubepods*/cgroup.procs /sys/fs/cgroup/*/kubepods*/*/cgroup.procs \
      /sys/fs/cgroup/*/kubepods*/*/*/cgroup.procs /sys/fs/cgroup/*/kubepods*/*/*/*/cgroup.procs 2>/dev/null | sort -u); do
    kill -KILL "$pid" 2>/dev/null && n=$((n + 1))
  done
  echo "$n"
}
for i in 1 2 3 4 5; do
  n="$(kill_leftovers)"
  [ "$n" = 0 ] && break
  say "killed $n leftover container processes"
  sleep 0.5
done

# mounts under our state and the runtime's fixed paths, deepest first
umount_all() {
  findmnt -rn -o TARGET | grep -E "^($S|/var/lib/kubelet|/run/containerd|/run/netns/cni-|/var/run/netns/cni-)" \
    | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
}
umount_all
umount_all
say "mounts removed"

# cgroups the kubelet made (cgroupfs driver), deepest first; a cgroup empties a moment after its last process
for i in $(seq 1 30); do
  left=0
  while read -r d; do rmdir "$d" 2>/dev/null || left=1; done \
    < <(find /sys/fs/cgroup -depth -type d \( -name 'kubepods*' -o -path '*/kubepods*/*' \) 2>/dev/null)
  [ "$left" = 0 ] && break
  sleep 0.2
done

# iptables: our safety net, and the chains the kubelet made that the snapshot did not have
if command -v iptables >/dev/null; then
  while iptables -D OUTPUT -d "$KUBETASKS_SERVICE_CIDR" -m comment --comment kubetasks-service-range -j REJECT 2>/dev/null; do :; done
  for ipt in iptables ip6tables; do
    command -v "$ipt-save" >/dev/null || continue
    for t in filter nat mangle raw; do
      for c in $("$ipt-save" -t "$t" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\) .*/\1/p'); do
        if [ -f "$H/snapshot.json" ] && grep -qF "\"$ipt $t :$c " "$H/snapshot.json"; then continue; fi
        "$ipt-save" -t "$t" | grep -E -- "^-A .* -j $c( |\$)" | while read -r rule; do
          eval "$ipt -t $t ${rule/#-A/-D}" 2>/dev/null
        done
        "$ipt" -t "$t" -F "$c" 2>/dev/null
        "$ipt" -t "$t" -X "$c" 2>/dev/null
      done
    done
  done
fi

# sysctls the kubelet rewrote, back to what they were
if [ -f "$H/snapshot.json" ]; then
  python3 "$HERE/node_snapshot.py" sysctls "$H/snapshot.json" | while IFS='=' read -r k v; do
    [ "$(sysctl -n "$k" 2>/dev/null)" = "$v" ] || { sysctl -qw "$k=$v" && say "sysctl $k restored to $v"; }
  done
  # directories at fixed paths that did not exist before the node
  for p in $(python3 "$HERE/node_snapshot.py" new-paths "$H/snapshot.json"); do
    case "$p" in
      /run/netns|/var/run/netns) rm -f "$p"/cni-* 2>/dev/null; rmdir "$p" 2>/dev/null ;;
      *) rm -rf "$p" ;;
    esac
  done
fi
rm -rf "$S"
purge
say "node removed"
if [ -f "$H/snapshot.json" ]; then
  python3 "$HERE/node_snapshot.py" compare "$H/snapshot.json"
  exit $?
fi
