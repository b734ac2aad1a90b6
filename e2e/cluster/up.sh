#!/usr/bin/env bash
# Start a throwaway Kubernetes control plane on free loopback ports:
# etcd + kube-apiserver + kube-controller-manager, with the ServiceAccount
# admission plugin on (pods get their token; the controller manager's token
# controller creates each namespace's `default` ServiceAccount, so a Pod in a
# new namespace waits for it).
# State, certificates, pid files and logs live under $ROOT/.run/cluster/;
# the admin kubeconfig is written to $ROOT/.run/kubeconfig (printed at the end).
# Idempotent: when the cluster is already running and healthy, says so.
#
#   up.sh          the control plane
#   up.sh --node   and the machine's local node (node-up.sh) attached to it:
#                  waits for the node lock if another clone uses the node, then
#                  tears down a stale node and starts a fresh one, or reuses the
#                  one this control plane already has.
#
# Env: KUBETASKS_UP_TIMEOUT=seconds to wait for readiness (default 120).
#      KUBETASKS_NODE_WHILE_PID: the process whose life the node lock follows
#      (default: this control plane's apiserver, i.e. until `make down`);
#      KUBETASKS_NODE_OWNER: how the lock's owner is shown to others.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/env.sh"
RUN="$KUBETASKS_RUN"
PKI="$RUN/pki"
KCFG="$KUBETASKS_KUBECONFIG"
TIMEOUT="${KUBETASKS_UP_TIMEOUT:-120}"
T0=$SECONDS
say() { echo "[up $(( SECONDS - T0 ))s] $*"; }
die() { echo "[up] ERROR: $*" >&2; exit 1; }

alive() {  # alive <name>: pid file exists and the process is that binary
  local f="$RUN/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$1"
}

readyz() {  # readyz -> 0 when the apiserver answers ok
  [ -f "$RUN/cluster.env" ] || return 1
  # shellcheck disable=SC1091
  . "$RUN/cluster.env"
  [ "$(curl -s --max-time 3 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
       "https://127.0.0.1:$KUBETASKS_APISERVER_PORT/readyz" 2>/dev/null)" = "ok" ]
}

WANT_NODE=0
for a in "$@"; do
  case "$a" in
    --node) WANT_NODE=1 ;;
    *) die "unknown argument $a" ;;
  esac
done

# node_up: the local node for this control plane (see the header)
node_up() {
  local apiserver_pid status holder ours=0
  apiserver_pid="$(cat "$RUN/kube-apiserver.pid")"
  # held by this control plane's own `make cluster` holder (it lives as long as our apiserver)?
  if status="$(python3 "$HERE/node_lock.py" status)" \
      && [ "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("while_pid"))' "$status")" = "$apiserver_pid" ]; then
    ours=1
  fi
  if [ "$ours" = 1 ] && [ -f "$KUBETASKS_NODE_HOME/state/node.env" ] \
      && [ "$("$KUBETASKS_KUBECTL" --kubeconfig "$KCFG" get node 127.0.0.1 \
             -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; then
    say "the local node of this control plane is already running; importing the current images"
    # shellcheck disable=SC1091
    . "$KUBETASKS_NODE_HOME/state/node.env"
    python3 "$HERE/image.py" build --spec "$KUBETASKS_NODE_HOME/state/images.json"
    python3 "$HERE/image.py" import --spec "$KUBETASKS_NODE_HOME/state/images.json" --address "$KUBETASKS_NODE_SOCKET"
    node_values
    return 0
  fi
  if [ "$ours" = 1 ]; then
    # our own lock, but no healthy node under it: start again under a new holder
    python3 "$HERE/node_lock.py" release
  fi
  holder="$(python3 "$HERE/node_lock.py" acquire --while-pid "${KUBETASKS_NODE_WHILE_PID:-$apiserver_pid}" \
    --owner "${KUBETASKS_NODE_OWNER:-make cluster}" --root "$KUBETASKS_ROOT")" || die "could not get the node lock"
  if ! KUBETASKS_NODE_HOLDER="$holder" bash "$HERE/node-up.sh"; then
    bash "$HERE/node-down.sh" --force >&2 || true
    python3 "$HERE/node_lock.py" release --holder "$holder"
    die "the local node did not come up (logs above; kept in $KUBETASKS_NODE_HOME/logs)"
  fi
  node_values
}

node_values() {  # .run/node-values.yaml: the chart's values for this node
  # shellcheck disable=SC1091
  . "$RUN/cluster.env"
  sed "s/@APISERVER_PORT@/$KUBETASKS_APISERVER_PORT/" "$HERE/values-local-node.yaml" \
    > "$KUBETASKS_ROOT/.run/node-values.yaml"
  say "helm values for the local node: $KUBETASKS_ROOT/.run/node-values.yaml"
}

if alive etcd && alive kube-apiserver && alive kube-controller-manager && [ -f "$KCFG" ] && readyz; then
  say "already running and healthy (apiserver https://127.0.0.1:$KUBETASKS_APISERVER_PORT)"
  [ "$WANT_NODE" = 1 ] && node_up
  echo "$KCFG"
  exit 0
fi
if [ -d "$RUN" ]; then
  say "stale or partial cluster state found; cleaning it up"
  "$HERE/down.sh" >/dev/null
fi

"$HERE/build.sh" etcd kube-apiserver kubectl kube-controller-manager
APISERVER="$KUBETASKS_K8S_BIN/kube-apiserver"
KUBECTL="$KUBETASKS_KUBECTL"
KCM="$KUBETASKS_K8S_BIN/kube-controller-manager"
command -v openssl >/dev/null || die "openssl is required"
command -v curl >/dev/null || die "curl is required"

mkdir -p "$RUN" "$PKI"

# ---- free loopback ports (all picked at once, so they are distinct) --------
read -r ETCD_PORT ETCD_PEER_PORT API_PORT KCM_PORT < <(python3 - <<'PY'
import socket
socks = []
for _ in range(4):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(*[s.getsockname()[1] for s in socks])
PY
)
cat > "$RUN/cluster.env" <<ENV
KUBETASKS_ETCD_PORT=$ETCD_PORT
KUBETASKS_APISERVER_PORT=$API_PORT
KUBETASKS_APISERVER_URL=https://127.0.0.1:$API_PORT
KUBETASKS_KCM_PORT=$KCM_PORT
ENV

# ---- certificates -----------------------------------------------------------
ossl() { openssl "$@" 2>>"$RUN/openssl.log" >/dev/null; }
ossl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kubetasks-local-ca" \
  -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
# cert <name> <subject> <extfile-content>
cert() {
  printf '%s\n' "$3" > "$PKI/$1.ext"
  ossl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$PKI/$1.key" -out "$PKI/$1.csr"
  ossl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -out "$PKI/$1.crt" -extfile "$PKI/$1.ext"
}
cert server "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
CLIENT_EXT="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
cert admin "/O=system:masters/CN=kubetasks-admin" "$CLIENT_EXT"
cert kcm "/O=system:masters/CN=system:kube-controller-manager" "$CLIENT_EXT"
ossl genrsa -out "$PKI/sa.key" 2048
ossl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"
chmod 600 "$PKI"/*.key

# kubeconfig <file> <user>
kubeconfig() {
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: kubetasks-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$2.crt")
    client-key-data: $(base64 -w0 < "$PKI/$2.key")
contexts:
- name: kubetasks-local
  context: {cluster: kubetasks-local, user: $2, namespace: default}
current-context: kubetasks-local
KC
  chmod 600 "$1"
}

# start <name> <binary> <args...>: detached (own session), pid file, log file
start() {
  local name="$1"; shift
  setsid "$@" >"$RUN/$name.log" 2>&1 </dev/null &
  echo $! > "$RUN/$name.pid"
}

wait_for() {  # wait_for <what> <name> <command...>
  local what="$1" name="$2"; shift 2
  local deadline=$(( SECONDS + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      tail -n 30 "$RUN/$name.log" >&2 || true
      die "$name exited while waiting for $what (log: $RUN/$name.log)"
    fi
    if [ $SECONDS -ge $deadline ]; then
      tail -n 30 "$RUN/$name.log" >&2 || true
      die "timed out after ${TIMEOUT}s waiting for $what (log: $RUN/$name.log)"
    fi
    sleep 0.3
  done
}

# ---- etcd -------------------------------------------------------------------
say "starting etcd on 127.0.0.1:$ETCD_PORT"
start etcd "$KUBETASKS_ETCD" --name kubetasks --data-dir "$RUN/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "kubetasks=http://127.0.0.1:$ETCD_PEER_PORT" \
  --unsafe-no-fsync --log-level warn
wait_for "etcd health" etcd sh -c "curl -sf --max-time 2 http://127.0.0.1:$ETCD_PORT/health | grep -q '\"health\":\"true\"'"
say "etcd healthy"

# ---- kube-apiserver ---------------------------------------------------------
say "starting kube-apiserver on https://127.0.0.1:$API_PORT"
start kube-apiserver "$APISERVER" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --secure-port "$API_PORT" --advertise-address 127.0.0.1 \
  --endpoint-reconciler-type none \
  --cert-dir "$PKI/apiserver" \
  --tls-cert-file "$PKI/server.crt" --tls-private-key-file "$PKI/server.key" \
  --client-ca-file "$PKI/ca.crt" \
  --service-cluster-ip-range "$KUBETASKS_SERVICE_CIDR" \
  --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$PKI/sa.pub" \
  --service-account-signing-key-file "$PKI/sa.key" \
  --allow-privileged=true \
  --v 1
kubeconfig "$KCFG" admin
wait_for "/readyz" kube-apiserver readyz
wait_for "namespace default" kube-apiserver "$KUBECTL" --kubeconfig "$KCFG" get namespace default
say "kube-apiserver ready"

# ---- kube-controller-manager (required: ServiceAccounts, tokens, Deployments) --
kubeconfig "$RUN/kcm.kubeconfig" kcm
# Its port was picked seconds ago, and tests or bench runs beside us open ports all the time:
# when another process took it meanwhile, pick another (the port is nobody else's business).
for try in 1 2 3; do
  say "starting kube-controller-manager (port $KCM_PORT)"
  start kube-controller-manager "$KCM" \
    --kubeconfig "$RUN/kcm.kubeconfig" \
    --authentication-kubeconfig "$RUN/kcm.kubeconfig" \
    --authorization-kubeconfig "$RUN/kcm.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
    --cert-dir "$PKI/kcm" \
    --leader-elect=false \
    --use-service-account-credentials=false \
    --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --controllers '*' \
    --v 1
  deadline=$(( SECONDS + TIMEOUT ))
  until curl -sk --max-time 2 "https://127.0.0.1:$KCM_PORT/healthz" 2>/dev/null | grep -qx ok \
      || ! alive kube-controller-manager || [ $SECONDS -ge $deadline ]; do
    sleep 0.3
  done
  if alive kube-controller-manager || ! grep -q "address already in use" "$RUN/kube-controller-manager.log" \
      || [ "$try" = 3 ]; then
    break
  fi
  KCM_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  sed -i "s/^KUBETASKS_KCM_PORT=.*/KUBETASKS_KCM_PORT=$KCM_PORT/" "$RUN/cluster.env"
  say "port taken meanwhile; trying port $KCM_PORT"
done
wait_for "kube-controller-manager /healthz" kube-controller-manager \
  sh -c "curl -sk --max-time 2 https://127.0.0.1:$KCM_PORT/healthz | grep -qx ok"
# With ServiceAccount admission on, no Pod is admitted before its namespace's `default` ServiceAccount exists.
wait_for "ServiceAccount default/default" kube-controller-manager \
  "$KUBECTL" --kubeconfig "$KCFG" get serviceaccount default -n default
say "kube-controller-manager healthy"

say "cluster ready in $(( SECONDS - T0 ))s"
[ "$WANT_NODE" = 1 ] && node_up
echo "$KCFG"
