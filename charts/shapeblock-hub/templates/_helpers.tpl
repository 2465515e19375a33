{{/*
Names come from the release (several hubs may share a cluster, e.g. staging and production),
shortened to the 63 characters a Service name may have.
*/}}
{{- define "shapeblock-hub.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "shapeblock-hub.selectorLabels" -}}
app.kubernetes.io/name: shapeblock-hub
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "shapeblock-hub.labels" -}}
{{ include "shapeblock-hub.selectorLabels" . }}
app.kubernetes.io/part-of: shapeblock
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "shapeblock-hub.apiService" -}}
{{- printf "%s-api" (include "shapeblock-hub.fullname" . | trunc 59 | trimSuffix "-") -}}
{{- end -}}

{{- define "shapeblock-hub.agentsService" -}}
{{- printf "%s-agents" (include "shapeblock-hub.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{/* The replica count, after the checks that keep SQLite to one process and the CA shared. */}}
{{- define "shapeblock-hub.replicas" -}}
{{- $postgres := ne .Values.database.existingSecret "" -}}
{{- $replicas := 1 -}}
{{- if not (kindIs "invalid" .Values.replicas) -}}
{{- $replicas = int .Values.replicas -}}
{{- end -}}
{{- if and (not $postgres) (gt $replicas 1) -}}
{{- fail (printf "replicas=%d needs database.existingSecret: without Postgres the hub keeps its store in SQLite, which one replica only may write" $replicas) -}}
{{- end -}}
{{- if and (gt $replicas 1) (not .Values.ca.existingSecret) -}}
{{- fail "ca.existingSecret is required with more than one replica: every replica must sign with the one CA that agents pin (see charts/README.md)" -}}
{{- end -}}
{{- if and $postgres (not .Values.ca.existingSecret) -}}
{{- fail "ca.existingSecret is required with database.existingSecret: the data directory is then an emptyDir, and a CA the hub made itself there would be lost on restart while the store in Postgres still trusts it (see charts/README.md)" -}}
{{- end -}}
{{- $replicas -}}
{{- end -}}

{{- define "shapeblock-hub.postgres" -}}
{{- if .Values.database.existingSecret }}true{{ end -}}
{{- end -}}

{{/* The data directory: --data-dir (SHAPEBLOCK_HUB_DATA) and where the CA files are mounted. */}}
{{- define "shapeblock-hub.dataDir" -}}/var/lib/shapeblock-hub{{- end -}}

{{/* The restricted Pod Security profile. */}}
{{- define "shapeblock-hub.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "shapeblock-hub.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}
