#!/usr/bin/env bash
# Smoke test of the running local cluster + the CRDs in crds/:
# applies the CRDs, creates valid objects, checks invalid ones are refused with
# a message naming the field, and prints `kubectl get` tables.
# Usage: e2e/cluster/up.sh && e2e/cluster/smoke.sh
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
K=("$KUBETASKS_KUBECTL" --kubeconfig "$KUBETASKS_KUBECONFIG")
NS=kubetasks-smoke
FAIL=0
run() { echo "\$ kubectl $*"; "${K[@]}" "$@"; }
ok() { echo "\$ kubectl ${*:2}"; local out; out="$("${K[@]}" "${@:2}" 2>&1)"; local rc=$?; echo "$out"
  if [ $rc -ne 0 ]; then echo "FAIL ($1): expected success"; FAIL=1; else echo "PASS ($1)"; fi; }
refused() {  # refused <label> <pattern> <stdin yaml or -> <kubectl args...>
  local label="$1" pat="$2"; shift 2
  echo "\$ kubectl $*"; local out; out="$("${K[@]}" "$@" 2>&1)"; local rc=$?; echo "$out"
  if [ $rc -ne 0 ] && grep -qF -- "$pat" <<<"$out"; then echo "PASS ($label)"; else echo "FAIL ($label): expected refusal mentioning '$pat'"; FAIL=1; fi; }
task() { printf 'apiVersion: kubetasks.dev/v1alpha1\nkind: Task\nmetadata: {name: %s, namespace: %s}\nspec: %s\n' "$1" "$NS" "$2"; }

run apply --server-side -f "$KUBETASKS_ROOT/crds/" || FAIL=1
run wait --for condition=Established --timeout=60s crd/tasks.kubetasks.dev crd/cronjoblocks.kubetasks.dev \
  crd/kopfpeerings.kopf.dev crd/clusterkopfpeerings.kopf.dev || FAIL=1
"${K[@]}" create namespace "$NS" >/dev/null 2>&1 || true

ok "valid task" create -f - <<<"$(task resize-42 '{handler: images.resize, payload: {image: "s3://b/42.png", width: 640}}')"
ok "valid task with runAt" create -f - <<<"$(task later-1 '{handler: a.b, queue: images, priority: 10, timeoutSeconds: 60, maxAttempts: 5, retryDelaySeconds: 3, runAt: "2030-01-01T00:00:00Z", dedupeKey: k1, ttlSecondsAfterFinished: 0}')"
refused "missing handler" "spec.handler: Required value" create -f - <<<"$(task bad-1 '{queue: default}')"
refused "bad handler pattern" "spec.handler" create -f - <<<"$(task bad-2 '{handler: "a b"}')"
refused "priority 5000" "spec.priority" create -f - <<<"$(task bad-3 '{handler: a, priority: 5000}')"
refused "timeoutSeconds -1" "spec.timeoutSeconds" create -f - <<<"$(task bad-4 '{handler: a, timeoutSeconds: -1}')"
refused "runAt+delaySeconds" "spec.runAt and spec.delaySeconds are mutually exclusive" create -f - <<<"$(task bad-5 '{handler: a, runAt: "2030-01-01T00:00:00Z", delaySeconds: 5}')"
refused "patch spec.queue" "spec.queue is immutable" -n "$NS" patch task resize-42 --type merge -p '{"spec":{"queue":"other"}}'
refused "patch spec.payload" "spec.payload is immutable" -n "$NS" patch task resize-42 --type merge -p '{"spec":{"payload":{"width":1}}}'
refused "add spec.priority" "spec.priority is immutable" -n "$NS" patch task resize-42 --type merge -p '{"spec":{"priority":1}}'
ok "patch spec.suspend" -n "$NS" patch task resize-42 --type merge -p '{"spec":{"suspend":true}}'
ok "status subresource" -n "$NS" patch task resize-42 --subresource=status --type merge \
  -p '{"status":{"phase":"Running","attempts":1,"pod":"kubetasks-7d9f-x2k","progress":50,"message":"downloaded","startedAt":"2026-01-01T00:00:00Z","conditions":[{"type":"Running","status":"True","reason":"Claimed","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}'
refused "bad status phase" "status.phase" -n "$NS" patch task resize-42 --subresource=status --type merge -p '{"status":{"phase":"Bogus"}}'
run -n "$NS" get tasks
run -n "$NS" get kt -o wide

ok "valid cronjoblock" create -f - <<<"apiVersion: kubetasks.dev/v1alpha1
kind: CronJobLock
metadata: {name: nightly-report, namespace: $NS}
spec: {schedule: '0 3 * * *', timeZone: Europe/Berlin, handler: reports.nightly, payload: {}, startingDeadlineSeconds: 300}"
refused "cron bad policy" "spec.concurrencyPolicy" create -f - <<<"apiVersion: kubetasks.dev/v1alpha1
kind: CronJobLock
metadata: {name: bad-cron, namespace: $NS}
spec: {schedule: '* * * * *', handler: a, concurrencyPolicy: Replace}"
ok "cron status" -n "$NS" patch cjl nightly-report --subresource=status --type merge \
  -p '{"status":{"lastScheduleTime":"2026-01-01T03:00:00Z","nextScheduleTime":"2030-01-02T02:00:00Z","lastResult":"Succeeded","active":0}}'
run -n "$NS" get cronjoblocks
run -n "$NS" get cjl nightly-report -o jsonpath='{.spec}'; echo
ok "cluster kopf peering" apply -f - <<<"apiVersion: kopf.dev/v1
kind: ClusterKopfPeering
metadata: {name: default}"
ok "kopf peering" apply -f - <<<"apiVersion: kopf.dev/v1
kind: KopfPeering
metadata: {name: default, namespace: $NS}"
run get kubetasks -A

"${K[@]}" delete namespace "$NS" --wait=false >/dev/null 2>&1
"${K[@]}" delete clusterkopfpeering default >/dev/null 2>&1
if [ $FAIL -eq 0 ]; then echo "SMOKE: all checks passed"; else echo "SMOKE: FAILURES above"; fi
exit $FAIL
