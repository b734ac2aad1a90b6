#!/usr/bin/env bash
# Generate the Kubernetes JSON schemas kubeconform needs, offline, once, into
# $KUBETASKS_SCHEMAS (outside the repository; see env.sh), in kubeconform's
# layout: $KUBETASKS_SCHEMAS/v<K8S_VERSION>-standalone[-strict]/<kind>-<group>-<version>.json
#
# Source (default): api/openapi-spec/swagger.json of the pinned k8s.io/kubernetes
# module -- the module build.sh already downloads for kube-apiserver, so this
# is the same API the local apiserver serves, and needs no running cluster.
#   --from-apiserver   read /openapi/v2 from the running local cluster instead
#                      (e2e/cluster/up.sh first); written to the same place.
#   --force            regenerate even if the stamp says it is done.
#
# Use:  kubeconform -strict -kubernetes-version ${K8S_VERSION#v} \
#         -schema-location "$KUBETASKS_SCHEMAS" manifests.yaml
# Prints the schema directory on success. Idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/env.sh"

FROM=module FORCE=0
for a in "$@"; do
  case "$a" in
    --from-apiserver) FROM=apiserver ;;
    --force) FORCE=1 ;;
    *) echo "schemas.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

OUT="$KUBETASKS_SCHEMAS"
STAMP="$OUT/.done-v${K8S_VERSION#v}"
if [ "$FORCE" = 0 ] && [ -f "$STAMP" ]; then echo "$OUT"; exit 0; fi
command -v python3 >/dev/null || { echo "schemas.sh: python3 is required" >&2; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
if [ "$FROM" = apiserver ]; then
  [ -f "$KUBETASKS_KUBECONFIG" ] || { echo "schemas.sh: no cluster running (run e2e/cluster/up.sh)" >&2; exit 1; }
  "$KUBETASKS_KUBECTL" --kubeconfig "$KUBETASKS_KUBECONFIG" get --raw /openapi/v2 > "$TMP/swagger.json"
  SWAGGER="$TMP/swagger.json"
else
  command -v go >/dev/null || { echo "schemas.sh: go is not installed" >&2; exit 1; }
  export GOMODCACHE="$KUBETASKS_CACHE/gomod" GOFLAGS=-mod=mod GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
  # A throwaway module dir: `go mod download` needs one; reads the module cache first.
  (cd "$TMP" && printf 'module kubetasks.local/schemas\n\ngo 1.24\n' > go.mod)
  DIR="$(cd "$TMP" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  SWAGGER="$DIR/api/openapi-spec/swagger.json"
  [ -f "$SWAGGER" ] || { echo "schemas.sh: $SWAGGER not found" >&2; exit 1; }
fi

rm -rf "$OUT.tmp"
python3 "$HERE/openapi2jsonschema.py" swagger "$SWAGGER" "$OUT.tmp" "$K8S_VERSION"
n="$(find "$OUT.tmp" -name '*.json' | wc -l)"
[ "$n" -gt 500 ] || { echo "schemas.sh: only $n schema files written" >&2; exit 1; }
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "source=$FROM $(sha256sum "$SWAGGER" | cut -d' ' -f1)" > "$STAMP"
echo "$OUT"
