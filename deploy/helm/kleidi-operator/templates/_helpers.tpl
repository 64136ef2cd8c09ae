{{/* The prefix of every object's name. */}}
{{- define "kleidi-operator.prefix" -}}
{{- .Values.namePrefix | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "kleidi-operator.operatorName" -}}
{{- printf "%s-operator" (include "kleidi-operator.prefix" .) }}
{{- end }}

{{- define "kleidi-operator.agentName" -}}
{{- printf "%s-agent" (include "kleidi-operator.prefix" .) }}
{{- end }}

{{/* The user name of the agent's service account, as the API server authenticates its tokens. */}}
{{- define "kleidi-operator.agentUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "kleidi-operator.agentName" .) }}
{{- end }}

{{- define "kleidi-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{/* Labels of every object; called with a dict of root and component (operator or agent). */}}
{{- define "kleidi-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kleidi-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: kleidi
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* An image reference, repository:tag[@digest]; called with a dict of root and image. */}}
{{- define "kleidi-operator.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- with .image.digest }}@{{ . }}{{ end }}
{{- end }}

{{/* The pod-level security context of both pods. */}}
{{- define "kleidi-operator.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.uid }}
runAsGroup: {{ .Values.gid }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The container-level security context of both containers. */}}
{{- define "kleidi-operator.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.uid }}
runAsGroup: {{ .Values.gid }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Refusals the schema cannot express with a clear message. Rendered by the Deployment. */}}
{{- define "kleidi-operator.validate" -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection) }}
{{- fail (printf "operator.replicas=%d needs operator.leaderElection=true: two operators without a leader would both drive the same rotation" (int .Values.operator.replicas)) }}
{{- end }}
{{- if eq (int .Values.operator.metrics.port) (int .Values.operator.healthPort) }}
{{- fail "operator.metrics.port and operator.healthPort must differ" }}
{{- end }}
{{- end }}
