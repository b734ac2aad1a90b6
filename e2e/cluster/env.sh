# Shared paths for the local control plane. Source this file (bash):
#   . e2e/cluster/env.sh
# Exports the pinned versions, the cache dir and the binary locations.
# Override versions/cache with the same variables before sourcing.
KUBETASKS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KUBETASKS_CACHE="${KUBETASKS_CACHE:-$HOME/.cache/kubetasks}"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
KUBETASKS_K8S_BIN="$KUBETASKS_CACHE/bin/k8s-$K8S_VERSION"
KUBETASKS_ETCD="$KUBETASKS_CACHE/bin/etcd-$ETCD_VERSION/etcd"
KUBETASKS_HELM="$KUBETASKS_CACHE/bin/helm-$HELM_VERSION/helm"
KUBETASKS_KUBECTL="$KUBETASKS_K8S_BIN/kubectl"
KUBETASKS_RUN="$KUBETASKS_ROOT/.run/cluster"
KUBETASKS_KUBECONFIG="$KUBETASKS_ROOT/.run/kubeconfig"
export KUBETASKS_ROOT KUBETASKS_CACHE K8S_VERSION ETCD_VERSION HELM_VERSION \
  KUBETASKS_K8S_BIN KUBETASKS_ETCD KUBETASKS_HELM KUBETASKS_KUBECTL \
  KUBETASKS_RUN KUBETASKS_KUBECONFIG
