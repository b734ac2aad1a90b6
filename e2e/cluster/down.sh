#!/usr/bin/env bash
# Stop the local control plane started by up.sh and remove its data
# ($ROOT/.run/cluster and $ROOT/.run/kubeconfig), after the machine's local
# node if this clone owns it (or nobody does any more): node-down.sh restores
# the machine and compares it with the snapshot taken before the node started.
# Safe to run when nothing runs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/env.sh"
RUN="$KUBETASKS_RUN"

node_rc=0
if [ -d "$KUBETASKS_NODE_HOME/state" ]; then
  bash "$HERE/node-down.sh" || node_rc=$?
fi
if status="$(python3 "$HERE/node_lock.py" status 2>/dev/null)" \
    && [ "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("root"))' "$status")" = "$KUBETASKS_ROOT" ] \
    && [ ! -d "$KUBETASKS_NODE_HOME/state" ]; then
  python3 "$HERE/node_lock.py" release
fi

stop() {  # stop <name>: only the pid recorded by up.sh, and only if it is <name>
  local f="$RUN/$1.pid" pid i
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$1"; then
    echo "[down] stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
  fi
  rm -f "$f"
}

if [ -d "$RUN" ]; then
  stop kube-controller-manager
  stop kube-apiserver
  stop etcd
  rm -rf "$RUN"
fi
rm -f "$KUBETASKS_KUBECONFIG"
echo "[down] cluster stopped and data removed"
exit "$node_rc"
