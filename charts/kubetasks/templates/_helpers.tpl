{{/* Chart name, overridable. */}}
{{- define "kubetasks.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of namespaced objects: <release>-<chart>, or <release> if it already contains the chart name. */}}
{{- define "kubetasks.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of cluster-scoped objects: the full name plus the namespace, so two releases of the same name in two namespaces do not collide. */}}
{{- define "kubetasks.clusterName" -}}
{{- printf "%s-%s" (include "kubetasks.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{/* Name of the ValidatingWebhookConfiguration (and of the ClusterRole that may patch it). */}}
{{- define "kubetasks.webhookName" -}}
{{- printf "%s-webhook" (include "kubetasks.clusterName" .) | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "kubetasks.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kubetasks.labels" -}}
helm.sh/chart: {{ include "kubetasks.chart" . }}
{{ include "kubetasks.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetasks
{{- end }}

{{/* Labels that select the Deployment's pods (immutable once installed). */}}
{{- define "kubetasks.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetasks.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{/* The selector labels as a label selector string (k=v,k=v). */}}
{{- define "kubetasks.podSelector" -}}
{{- $parts := list }}
{{- range $k, $v := (include "kubetasks.selectorLabels" . | fromYaml) }}
{{- $parts = append $parts (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $parts }}
{{- end }}

{{- define "kubetasks.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetasks.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false: the existing ServiceAccount the pods run as" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetasks.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the Secret the chart creates when database.url / redis.url are given. */}}
{{- define "kubetasks.urlSecretName" -}}
{{- printf "%s-urls" (include "kubetasks.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Validate database values; renders nothing. */}}
{{- define "kubetasks.validate" -}}
{{- if not .Values.app }}
{{- fail "app is required: the kubetasks App the pods run, as module:attribute (e.g. --set app=mypkg.tasks:app)" }}
{{- end }}
{{- if and .Values.database.existingSecret .Values.database.url }}
{{- fail "set only one of database.existingSecret and database.url" }}
{{- end }}
{{- if not (or .Values.database.existingSecret .Values.database.url) }}
{{- fail "database.existingSecret is required: the name of a Secret holding the PostgreSQL URL under key database.secretKey (default \"url\"), e.g. kubectl create secret generic kubetasks-db --from-literal=url=postgresql://user:pw@host:5432/db. (database.url also works but is not recommended: the password then lives in the Helm release.)" }}
{{- end }}
{{- if and .Values.webhook.enabled (eq .Values.webhook.mode "service") (not .Values.service.enabled) }}
{{- fail "webhook.mode=service needs service.enabled: the API server reaches the webhook through the Service (or use webhook.mode=url with webhook.host)" }}
{{- end }}
{{- if and .Values.webhook.enabled (eq .Values.webhook.mode "url") (not .Values.webhook.host) }}
{{- fail "webhook.mode=url needs webhook.host: the address the API server calls (https://<host>:<webhook.port>/validate), e.g. 127.0.0.1 on a node whose pods use the host network" }}
{{- end }}
{{- if and .Values.webhook.enabled (not .Values.webhook.certSecret) (gt (int (include "kubetasks.minReplicas" .)) 1) }}
{{- fail "webhook.enabled with more than one replica needs webhook.certSecret (tls.crt, tls.key, ca.crt shared by every pod): without it each pod makes its own CA and the API server trusts only one of them" }}
{{- end }}
{{- if and .Values.redis.existingSecret .Values.redis.url }}
{{- fail "set only one of redis.existingSecret and redis.url" }}
{{- end }}
{{- range $what := list "direct" "replica" }}
{{- $key := get $.Values.database (printf "%sSecretKey" $what) }}
{{- $url := get $.Values.database (printf "%sUrl" $what) }}
{{- if and $key (not $.Values.database.existingSecret) }}
{{- fail (printf "database.%sSecretKey names a key in database.existingSecret, which is not set (with database.url, set database.%sUrl instead)" $what $what) }}
{{- end }}
{{- if and $url (not $.Values.database.url) }}
{{- fail (printf "database.%sUrl goes with database.url (with database.existingSecret, put the URL in that Secret and set database.%sSecretKey)" $what $what) }}
{{- end }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount)) }}
{{- fail (printf "keda.minReplicaCount (%v) exceeds keda.maxReplicaCount (%v)" .Values.keda.minReplicaCount .Values.keda.maxReplicaCount) }}
{{- end }}
{{- if le (float64 .Values.leaseTTL) (mulf (float64 .Values.heartbeatInterval) 1.5) }}
{{- fail (printf "leaseTTL (%v) must exceed 1.5 x heartbeatInterval (%v)" .Values.leaseTTL .Values.heartbeatInterval) }}
{{- end }}
{{- end }}

{{/* The database URLs as container env vars, from Secrets, and the pooling mode. */}}
{{- define "kubetasks.databaseEnv" -}}
- name: KUBETASKS_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.database.existingSecret }}
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
      {{- else }}
      name: {{ include "kubetasks.urlSecretName" . }}
      key: database-url
      {{- end }}
{{- if ne .Values.database.pooling "session" }}
- name: KUBETASKS_DATABASE_POOLING
  value: {{ .Values.database.pooling | quote }}
{{- end }}
{{- range $what := list "direct" "replica" }}
{{- $key := get $.Values.database (printf "%sSecretKey" $what) }}
{{- $url := get $.Values.database (printf "%sUrl" $what) }}
{{- if or $key $url }}
- name: KUBETASKS_DATABASE_{{ upper $what }}_URL
  valueFrom:
    secretKeyRef:
      {{- if $key }}
      name: {{ $.Values.database.existingSecret }}
      key: {{ $key }}
      {{- else }}
      name: {{ include "kubetasks.urlSecretName" $ }}
      key: database-{{ $what }}-url
      {{- end }}
{{- end }}
{{- end }}
{{- if or .Values.redis.existingSecret .Values.redis.url }}
- name: KUBETASKS_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.redis.existingSecret }}
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.secretKey }}
      {{- else }}
      name: {{ include "kubetasks.urlSecretName" . }}
      key: redis-url
      {{- end }}
{{- end }}
{{- end }}

{{/* Replicas that run: KEDA's minimum when it scales, else replicaCount. */}}
{{- define "kubetasks.minReplicas" -}}
{{- if .Values.keda.enabled }}{{ .Values.keda.minReplicaCount }}{{ else }}{{ .Values.replicaCount }}{{ end }}
{{- end }}

{{/* Where a pod's metrics server writes its URL when metrics.port is 0 (on the /tmp emptyDir). */}}
{{- define "kubetasks.metricsAddrFile" -}}
/tmp/kubetasks-metrics
{{- end }}

{{/* A probe of one endpoint: an HTTP GET on the metrics port, or, with metrics.port 0 (a
free port per pod), the same GET from inside the container at the address the server wrote. */}}
{{- define "kubetasks.probe" -}}
{{- $ := index . 0 }}
{{- $path := index . 1 }}
{{- if $.Values.metrics.port }}
httpGet:
  path: {{ $path }}
  port: metrics
{{- else }}
exec:
  command:
    - python3
    - -c
    - |
      import sys, urllib.error, urllib.request
      url = open("{{ include "kubetasks.metricsAddrFile" $ }}").read().strip() + "{{ $path }}"
      try:
          print(urllib.request.urlopen(url, timeout=2).read().decode())
      except urllib.error.HTTPError as e:
          sys.exit(e.read().decode())
{{- end }}
{{- end }}
