{{/*
Names are fixed, not derived from the release: the RBAC rules, the Lease and the identity
Secret have fixed names in crates/agent/src/rbac.rs, and one agent serves a whole cluster.
*/}}
{{- define "shapeblock-agent.name" -}}shapeblock-agent{{- end -}}

{{- define "shapeblock-agent.selectorLabels" -}}
app.kubernetes.io/name: shapeblock-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "shapeblock-agent.labels" -}}
{{ include "shapeblock-agent.selectorLabels" . }}
app.kubernetes.io/part-of: shapeblock
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "shapeblock-agent.enrollmentSecret" -}}
{{- .Values.enrollment.existingSecret | default "shapeblock-agent-enrollment" -}}
{{- end -}}

{{/* The restricted Pod Security profile, for the agent and the helm-controller alike. */}}
{{- define "shapeblock-agent.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "shapeblock-agent.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}
