{{/* Names */}}
{{- define "bkv.name" -}}{{ .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}

{{- define "bkv.fullname" -}}
{{- if or (contains .Chart.Name .Release.Name) (contains "bkv" .Release.Name) -}}
{{ .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else -}}
{{ printf "%s-%s" .Release.Name "bkv" | trunc 40 | trimSuffix "-" }}
{{- end -}}
{{- end -}}

{{- define "bkv.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "bkv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: backup-key-vault
{{- end -}}

{{/* selectorLabels: call with (dict "ctx" $ "component" "frontend") */}}
{{- define "bkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bkv.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "bkv.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "bkv.etcdEndpoints" -}}
{{ include "bkv.fullname" . }}-etcd:2379
{{- end -}}

{{- define "bkv.hsmUrl" -}}
{{- $fullname := include "bkv.fullname" . -}}
{{- range $i, $_ := until (int .Values.hsm.replicas) -}}
{{- if $i }},{{ end }}http://{{ $fullname }}-hsm-proxy-{{ $i }}.{{ $fullname }}-hsm-proxy-pods:8100
{{- end -}}
{{- end -}}

{{- define "bkv.hsmMembers" -}}
{{- $fullname := include "bkv.fullname" . -}}
{{- range $i, $_ := until (int .Values.hsm.replicas) -}}
{{- if $i }},{{ end }}{{ $fullname }}-hsm-proxy-{{ $i }}
{{- end -}}
{{- end -}}

{{- define "bkv.pinsSecret" -}}
{{ .Values.hsm.existingSecret | default (printf "%s-hsm-pins" (include "bkv.fullname" .)) }}
{{- end -}}

{{- define "bkv.edgeSecret" -}}
{{ .Values.edge.existingSecret | default (printf "%s-edge-key" (include "bkv.fullname" .)) }}
{{- end -}}

{{- define "bkv.fleetConfigMap" -}}
{{ include "bkv.fullname" . }}-fleet-public
{{- end -}}

{{/* The restricted Pod Security Standard, for every pod of the chart. */}}
{{- define "bkv.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "bkv.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* topologySpread: call with (dict "ctx" $ "component" "island" "extra" (dict "bkv.island" "a")) */}}
{{- define "bkv.topologySpread" -}}
{{- $sel := include "bkv.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml -}}
{{- range $k, $v := (.extra | default dict) }}{{ $_ := set $sel $k $v }}{{ end -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: {{ .ctx.Values.topologySpread.zoneKey }}
    whenUnsatisfiable: {{ .ctx.Values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- toYaml $sel | nindent 8 }}
  - maxSkew: 1
    topologyKey: {{ .ctx.Values.topologySpread.nodeKey }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- toYaml $sel | nindent 8 }}
{{- end -}}

{{/* The load generator's environment (loadtest/locustfile.py, loadtest/seed.py):
     through the public Service with Noise, keys from the published ConfigMap. */}}
{{- define "bkv.loadtestEnv" -}}
- name: BKV_LOAD_EDGE_URL
  value: http://{{ include "bkv.fullname" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.frontend.service.port }}
- name: BKV_LOAD_EDGE_KEY
  valueFrom: {configMapKeyRef: {name: {{ include "bkv.fleetConfigMap" . }}, key: edge_public_key}}
- name: BKV_LOAD_FLEET_KEY
  valueFrom: {configMapKeyRef: {name: {{ include "bkv.fleetConfigMap" . }}, key: fleet_public_key}}
- name: BKV_LOAD_ISSUER_DIR
  value: /issuer
- name: BKV_LOAD_USERS
  value: {{ .Values.loadtest.seedUsers | quote }}
- name: BKV_LOAD_WORKERS
  value: {{ .Values.loadtest.workers | quote }}
{{- end -}}
