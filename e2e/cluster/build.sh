#!/usr/bin/env bash
# Build etcd, kube-apiserver, kubectl, kube-controller-manager, helm and, for
# the local node, kubelet, kube-scheduler, crictl and a pause binary from their
# Go modules, once, into $KUBETASKS_CACHE/bin/<name>-<version>/. kubelet and
# kube-scheduler come from the same wrapper module as the apiserver, so the
# node runs the control plane's version.
# Wrapper Go modules, GOMODCACHE and GOCACHE live in the cache dir as well,
# never in the repository. Idempotent: already-built binaries are skipped.
#
# Usage: e2e/cluster/build.sh [etcd] [kube-apiserver] [kubectl]
#                             [kube-controller-manager] [helm] [kubeconform]
#                             [kubelet] [kube-scheduler] [crictl] [pause]
#        (no argument = all of them)
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

export GOMODCACHE="$KUBETASKS_CACHE/gomod"
export GOCACHE="$KUBETASKS_CACHE/gobuild"
export GOFLAGS="-mod=mod"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export CGO_ENABLED=0
SRC="$KUBETASKS_CACHE/src"
mkdir -p "$SRC" "$GOMODCACHE" "$GOCACHE"

command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }

START=$SECONDS
log() { echo "[build $(( SECONDS - START ))s] $*"; }

# --- k8s.io/kubernetes wrapper module (workaround of kubernetes issue 79384) --
# k8s.io/kubernetes replaces ~30 k8s.io/* staging modules with ./staging/...;
# a module depending on it must replace each with the published v0.Y.Z tag.
k8s_wrapper() {
  local dir="$SRC/k8s-$K8S_VERSION"
  [ -f "$dir/.ready" ] && { echo "$dir"; return; }
  mkdir -p "$dir"
  local json gomod staging gover
  json="$(cd "$dir" && GOFLAGS= go mod download -json "k8s.io/kubernetes@$K8S_VERSION")"
  gomod="$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  [ -f "$gomod" ] || { echo "build.sh: cannot find go.mod of k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
  # "v1.34.4" -> "v0.34.4"
  staging="v0.${K8S_VERSION#v1.}"
  gover="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod" | head -1)"
  {
    echo "module kubetasks.local/k8sbuild"
    echo
    echo "go ${gover:-1.24.0}"
    echo
    grep -E '^godebug ' "$gomod" || true
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    # lines like:  k8s.io/api => ./staging/src/k8s.io/api
    grep -E '^[[:space:]]*k8s\.io/[^ ]+ => \./staging/' "$gomod" \
      | awk -v v="$staging" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } > "$dir/go.mod"
  local n
  n="$(grep -c ' => k8s.io/' "$dir/go.mod" || true)"
  [ "$n" -gt 20 ] || { echo "build.sh: only $n staging replaces found in $gomod" >&2; exit 1; }
  echo 'package k8sbuild' > "$dir/doc.go"
  touch "$dir/.ready"
  echo "$dir"
}

# --- etcd wrapper: a main calling etcdmain.Main (works for 3.5 and 3.6) ------
etcd_wrapper() {
  local dir="$SRC/etcd-$ETCD_VERSION"
  [ -f "$dir/.ready" ] && { echo "$dir"; return; }
  mkdir -p "$dir"
  cat > "$dir/go.mod" <<GOMOD
module kubetasks.local/etcdbuild

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat > "$dir/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  touch "$dir/.ready"
  echo "$dir"
}

helm_wrapper() {
  local dir="$SRC/helm-$HELM_VERSION" major
  major="$(echo "$HELM_VERSION" | sed 's/^v\([0-9]*\).*/\1/')"
  [ -f "$dir/.ready" ] && { echo "$dir"; return; }
  mkdir -p "$dir"
  cat > "$dir/go.mod" <<GOMOD
module kubetasks.local/helmbuild

go 1.24

require helm.sh/helm/v$major $HELM_VERSION
GOMOD
  echo 'package helmbuild' > "$dir/doc.go"
  touch "$dir/.ready"
  echo "$dir"
}

kubeconform_wrapper() {
  local dir="$SRC/kubeconform-$KUBECONFORM_VERSION"
  [ -f "$dir/.ready" ] && { echo "$dir"; return; }
  mkdir -p "$dir"
  cat > "$dir/go.mod" <<GOMOD
module kubetasks.local/kubeconformbuild

go 1.24

require github.com/yannh/kubeconform $KUBECONFORM_VERSION
GOMOD
  echo 'package kubeconformbuild' > "$dir/doc.go"
  touch "$dir/.ready"
  echo "$dir"
}

crictl_wrapper() {
  local dir="$SRC/crictl-$CRICTL_VERSION"
  [ -f "$dir/.ready" ] && { echo "$dir"; return; }
  mkdir -p "$dir"
  cat > "$dir/go.mod" <<GOMOD
module kubetasks.local/crictlbuild

go 1.24

require sigs.k8s.io/cri-tools $CRICTL_VERSION
GOMOD
  echo 'package crictlbuild' > "$dir/doc.go"
  touch "$dir/.ready"
  echo "$dir"
}

# The pod sandbox's pause process: PID 1 of every pod, which only waits for a
# signal and reaps children (what registry.k8s.io/pause does), built here so
# no image is ever pulled.
pause_wrapper() {
  local dir="$SRC/pause-1"
  [ -f "$dir/.ready" ] && { echo "$dir"; return; }
  mkdir -p "$dir"
  printf 'module kubetasks.local/pause\n\ngo 1.24\n' > "$dir/go.mod"
  cat > "$dir/main.go" <<'GO'
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 8)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
GO
  touch "$dir/.ready"
  echo "$dir"
}

# build <out> <wrapper dir> <package> <ldflags>
build() {
  local out="$1" dir="$2" pkg="$3" ldflags="$4" t0=$SECONDS
  if [ -x "$out" ]; then log "skip $(basename "$out"): already built at $out"; return; fi
  mkdir -p "$(dirname "$out")"
  log "building $(basename "$out") ($pkg) ..."
  # progress ticker while go build runs
  ( while sleep 30; do log "  ... still building $(basename "$out") ($(( SECONDS - t0 ))s)"; done ) &
  local ticker=$!
  local rc=0
  (cd "$dir" && go build -p 2 -trimpath -ldflags "$ldflags" -o "$out.tmp" "$pkg") || rc=$?
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then rm -f "$out.tmp"; log "FAILED $(basename "$out") after $(( SECONDS - t0 ))s"; exit "$rc"; fi
  mv "$out.tmp" "$out"
  log "built $(basename "$out") in $(( SECONDS - t0 ))s -> $out"
}

k8s_ldflags() {
  local v="${K8S_VERSION#v}"
  local major="${v%%.*}" rest="${v#*.}"
  local minor="${rest%%.*}"
  echo "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
-X k8s.io/component-base/version.gitMajor=$major \
-X k8s.io/component-base/version.gitMinor=$minor \
-X k8s.io/component-base/version.gitTreeState=clean \
-X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
-X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION \
-X k8s.io/client-go/pkg/version.gitMajor=$major \
-X k8s.io/client-go/pkg/version.gitMinor=$minor"
}

TARGETS=("$@")
pick() {  # pick <name>: selected on the command line (no arguments = all)
  [ ${#TARGETS[@]} -eq 0 ] && return 0
  local w; for w in "${TARGETS[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1
}

if pick etcd; then
  dir="$(etcd_wrapper)"
  build "$KUBETASKS_ETCD" "$dir" kubetasks.local/etcdbuild \
    "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION"
fi
for c in kube-apiserver kubectl kube-controller-manager kubelet kube-scheduler; do
  pick "$c" || continue
  if [ -x "$KUBETASKS_K8S_BIN/$c" ]; then log "skip $c: already built at $KUBETASKS_K8S_BIN/$c"; continue; fi
  dir="$(k8s_wrapper)"
  build "$KUBETASKS_K8S_BIN/$c" "$dir" "k8s.io/kubernetes/cmd/$c" "$(k8s_ldflags)"
done
if pick helm; then
  hmaj="$(echo "$HELM_VERSION" | sed 's/^v\([0-9]*\).*/\1/')"
  dir="$(helm_wrapper)"
  build "$KUBETASKS_HELM" "$dir" "helm.sh/helm/v$hmaj/cmd/helm" \
    "-s -w -X helm.sh/helm/v$hmaj/internal/version.version=$HELM_VERSION -X helm.sh/helm/v$hmaj/internal/version.gitTreeState=clean"
fi
if pick kubeconform; then
  dir="$(kubeconform_wrapper)"
  build "$KUBETASKS_KUBECONFORM" "$dir" github.com/yannh/kubeconform/cmd/kubeconform \
    "-s -w -X main.version=$KUBECONFORM_VERSION"
fi
if pick crictl; then
  dir="$(crictl_wrapper)"
  build "$KUBETASKS_CRICTL" "$dir" sigs.k8s.io/cri-tools/cmd/crictl \
    "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"
fi
if pick pause; then
  dir="$(pause_wrapper)"
  build "$KUBETASKS_PAUSE" "$dir" kubetasks.local/pause "-s -w"
fi
log "done (total $(( SECONDS - START ))s)"
