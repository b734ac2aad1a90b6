#!/usr/bin/env bash
# Start the machine's one local node next to this clone's control plane (up.sh):
# containerd + runc + the CNI loopback plugin from Debian's packages, kubelet
# and kube-scheduler built from the control plane's own Go module, all on
# private state under $KUBETASKS_NODE_HOME/state; then the images (image.py)
# imported. containerd's image store ($KUBETASKS_NODE_HOME/containerd) is kept
# between runs, like the build caches: a warm start imports only what changed. Pods run with hostNetwork (the node has no pod network), reach
# PostgreSQL, Redis and the apiserver on 127.0.0.1, resolve through 127.0.0.1,
# and cannot reach the Service range (a REJECT rule while the node runs); an
# accidental image pull goes to a closed loopback port.
#
# Called by up.sh --node, which holds the node lock (node_lock.py) and passes
# its holder as KUBETASKS_NODE_HOLDER. A node found here without a holder is
# stale (its owner is gone) and is torn down first. The machine is recorded
# before anything starts ($KUBETASKS_NODE_HOME/snapshot.json); node-down.sh
# restores it. If the node does not come up, its logs are printed and the
# script fails.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/env.sh"
H="$KUBETASKS_NODE_HOME"
S="$H/state"
LOGS="$H/logs"
TIMEOUT="${KUBETASKS_NODE_TIMEOUT:-180}"
T0="$(date +%s%N)"
say() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[node %d.%ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }
die() {
  echo "[node] ERROR: $*" >&2
  for l in containerd kubelet kube-scheduler; do
    [ -s "$LOGS/$l.log" ] || continue
    echo "----- $LOGS/$l.log (last lines that are not routine)" >&2
    grep -vE 'level=(info|debug)|^I[0-9]{4} ' "$LOGS/$l.log" | tail -n 30 >&2
  done
  exit 1
}

python3 "$HERE/node_lock.py" check --holder "${KUBETASKS_NODE_HOLDER:-0}" \
  || die "the node lock is not held by this run (KUBETASKS_NODE_HOLDER); start the node with up.sh --node"
[ "$(id -u)" = 0 ] || die "the local node needs root (kubelet, containerd, mounts, cgroups, iptables)"
bash "$HERE/node-deps.sh"
bash "$HERE/build.sh" kubelet kube-scheduler crictl pause | grep -v '^\[build [0-9]*s\] \(skip\|done\)' || true
for b in "$KUBETASKS_KUBELET" "$KUBETASKS_SCHEDULER" "$KUBETASKS_CRICTL" "$KUBETASKS_PAUSE"; do
  [ -x "$b" ] || die "missing $b (e2e/cluster/build.sh)"
done
[ -f "$KUBETASKS_RUN/cluster.env" ] || die "no control plane in this clone (e2e/cluster/up.sh first)"
# shellcheck disable=SC1091
. "$KUBETASKS_RUN/cluster.env"
PKI="$KUBETASKS_RUN/pki"
KUBECTL=("$KUBETASKS_KUBECTL" --kubeconfig "$KUBETASKS_KUBECONFIG")

if [ -d "$S" ]; then
  say "a stale node is here (its owner is gone: $(cat "$S/owner" 2>/dev/null || echo unknown)); tearing it down"
  bash "$HERE/node-down.sh" --stale | sed 's/^/  /' || true
  [ -d "$S" ] && die "could not remove the stale node at $S"
fi

python3 "$HERE/node_snapshot.py" take "$H/snapshot.json"
mkdir -p "$S"/{containerd/run,containerd/certs.d,cni/net.d,pki,kubelet,pod-logs} "$LOGS"
rm -f "$LOGS"/*.log
echo "$KUBETASKS_ROOT (holder $KUBETASKS_NODE_HOLDER, apiserver 127.0.0.1:$KUBETASKS_APISERVER_PORT)" > "$S/owner"
say "machine recorded in $H/snapshot.json"

# ---- safety net: the Service range never leaves the machine -----------------
iptables -I OUTPUT 1 -d "$KUBETASKS_SERVICE_CIDR" -m comment --comment kubetasks-service-range -j REJECT

# ---- containerd ---------------------------------------------------------------
SOCK="$S/containerd/run/containerd.sock"
STORE="$H/containerd"
cat > "$S/containerd.toml" <<TOML
# containerd 1.6 for the local node: private root, state and socket; CRI with cgroupfs.
version = 2
root = "$STORE"
state = "$S/containerd/state"
# no oom_score: no CAP_SYS_RESOURCE here, a negative oom_score_adj is EPERM
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$S/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "kubetasks.local/pause:3.10"
  enable_selinux = false
  disable_apparmor = true
  # pods' oom_score_adj clamped to containerd's own (0): no CAP_SYS_RESOURCE here
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$S/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$S/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    # every registry -> http://127.0.0.1:1: an accidental pull fails at once, on loopback
    config_path = "$S/containerd/certs.d"
TOML
for h in _default kubetasks.local docker.io registry.k8s.io; do
  mkdir -p "$S/containerd/certs.d/$h"
  printf 'server = "http://127.0.0.1:1"\n[host."http://127.0.0.1:1"]\n  capabilities = ["pull", "resolve"]\n' \
    > "$S/containerd/certs.d/$h/hosts.toml"
done
# The CNI config makes the node Ready; pods must use hostNetwork (loopback only otherwise).
echo '{"cniVersion": "1.0.0", "name": "kubetasks-loopback", "plugins": [{"type": "loopback"}]}' \
  > "$S/cni/net.d/10-loopback.conflist"

alive() { [ -f "$S/$1.pid" ] && [ "$(readlink "/proc/$(cat "$S/$1.pid")/exe" 2>/dev/null)" = "$2" ]; }
start() {  # start <name> <binary> <args...>: own session, pid file, log
  local name="$1"; shift
  setsid "$@" > "$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$S/$name.pid"
}
wait_for() {  # wait_for <what> <name> <binary> <command...>
  local what="$1" name="$2" bin="$3" deadline=$(( SECONDS + TIMEOUT )); shift 3
  until "$@" >/dev/null 2>&1; do
    alive "$name" "$bin" || die "$name exited while waiting for $what"
    [ $SECONDS -lt $deadline ] || die "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.2
  done
}

CONTAINERD="$(command -v containerd)"
CRICTL=("$KUBETASKS_CRICTL" --runtime-endpoint "unix://$SOCK" --image-endpoint "unix://$SOCK" --timeout 20s)
start containerd "$CONTAINERD" --config "$S/containerd.toml"
if ! (TIMEOUT=30 wait_for "containerd's socket" containerd "$CONTAINERD" ctr --address "$SOCK" version) 2>/dev/null; then
  # a kept image store that containerd cannot open (an aborted write): start from an empty one
  say "containerd did not start on the kept image store; emptying it"
  kill -KILL "$(cat "$S/containerd.pid")" 2>/dev/null || true
  rm -rf "$STORE"
  start containerd "$CONTAINERD" --config "$S/containerd.toml"
  wait_for "containerd's socket" containerd "$CONTAINERD" ctr --address "$SOCK" version
fi
# pods an aborted run left in the kept store go; images stay
"${CRICTL[@]}" rmp -f $("${CRICTL[@]}" pods -q 2>/dev/null) >/dev/null 2>&1 || true
say "containerd $(containerd --version | awk '{print $3}') up (pid $(cat "$S/containerd.pid"))"
python3 "$HERE/image.py" pause --spec "$S/pause.json" >/dev/null
python3 "$HERE/image.py" import --spec "$S/pause.json" --address "$SOCK" >/dev/null
say "pause image imported"

# ---- node credentials and the kubelet's configuration -------------------------
NODE=127.0.0.1  # the kubelet refuses a loopback --node-ip; this name becomes the InternalIP
read -r KPORT HPORT SPORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
ossl() { openssl "$@" 2>>"$LOGS/openssl.log" >/dev/null; }
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
  > "$S/pki/kubelet.ext"
ossl req -newkey rsa:2048 -nodes -subj "/O=system:nodes/CN=system:node:$NODE" \
  -keyout "$S/pki/kubelet.key" -out "$S/pki/kubelet.csr"
ossl x509 -req -in "$S/pki/kubelet.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
  -days 30 -out "$S/pki/kubelet.crt" -extfile "$S/pki/kubelet.ext"
cp "$PKI/ca.crt" "$S/pki/ca.crt"
chmod 600 "$S/pki/kubelet.key"
cat > "$S/kubelet.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$KUBETASKS_APISERVER_PORT", certificate-authority: "$S/pki/ca.crt"}
users:
- name: node
  user: {client-certificate: "$S/pki/kubelet.crt", client-key: "$S/pki/kubelet.key"}
contexts:
- name: node
  context: {cluster: local, user: node}
current-context: node
KC
# up.sh authorizes by RBAC alone (no Node authorizer): the system:node role for the nodes' group
"${KUBECTL[@]}" create clusterrolebinding kubetasks-local-node --clusterrole=system:node --group=system:nodes \
  --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f - >/dev/null
echo 'nameserver 127.0.0.1' > "$S/resolv.conf"
cat > "$S/kubelet.yaml" <<CFG
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $KPORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $HPORT
# The apiserver (up.sh) has no kubelet client certificate; this API listens on loopback only.
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}, x509: {clientCAFile: "$S/pki/ca.crt"}}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$SOCK
imageServiceEndpoint: unix://$SOCK
cgroupDriver: cgroupfs
failCgroupV1: false      # this host is cgroup v1; Kubernetes after 1.34 refuses it by default
failSwapOn: false
oomScoreAdj: 0           # no CAP_SYS_RESOURCE: -999 would be EPERM
podLogsDir: $S/pod-logs
resolvConf: $S/resolv.conf
clusterDomain: cluster.local
clusterDNS: [127.0.0.1]  # ClusterFirst pods resolve through loopback too (and no MissingClusterDNS events)
serializeImagePulls: false
# images come from image.py, never from a registry: never collect them
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
nodeStatusUpdateFrequency: 2s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
maxPods: 40
CFG

KUBELET_ARGS=(--config "$S/kubelet.yaml" --kubeconfig "$S/kubelet.kubeconfig" --hostname-override "$NODE"
  --root-dir "$S/kubelet" --cert-dir "$S/kubelet/pki" --v 1)
start kubelet "$KUBETASKS_KUBELET" "${KUBELET_ARGS[@]}"
say "kubelet started (pid $(cat "$S/kubelet.pid"), port $KPORT)"
# kube-scheduler as the cluster admin: a throwaway local cluster
start kube-scheduler "$KUBETASKS_SCHEDULER" --kubeconfig "$KUBETASKS_KUBECONFIG" \
  --authentication-kubeconfig "$KUBETASKS_KUBECONFIG" --authorization-kubeconfig "$KUBETASKS_KUBECONFIG" \
  --bind-address 127.0.0.1 --secure-port "$SPORT" --leader-elect=false --v 1
wait_for "kube-scheduler /healthz" kube-scheduler "$KUBETASKS_SCHEDULER" \
  sh -c "curl -sk --max-time 2 https://127.0.0.1:$SPORT/healthz | grep -qx ok"
say "kube-scheduler healthy (pid $(cat "$S/kube-scheduler.pid"))"
node_ready() {
  [ "$("${KUBECTL[@]}" get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}
wait_for "node $NODE Ready" kubelet "$KUBETASKS_KUBELET" node_ready
cat > "$S/node.env" <<ENV
KUBETASKS_NODE_NAME=$NODE
KUBETASKS_NODE_SOCKET=$SOCK
KUBETASKS_KUBELET_PORT=$KPORT
KUBETASKS_NODE_APISERVER_PORT=$KUBETASKS_APISERVER_PORT
KUBETASKS_NODE_ROOT=$KUBETASKS_ROOT
ENV
say "node $NODE Ready"

# ---- images ---------------------------------------------------------------------
python3 "$HERE/image.py" build --spec "$S/images.json"
python3 "$HERE/image.py" import --spec "$S/images.json" --address "$SOCK"
say "ready: node $NODE with the kubetasks images (logs: $LOGS)"
