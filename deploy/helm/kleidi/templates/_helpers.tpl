{{/* Chart name, at most 63 characters. */}}
{{- define "kleidi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, at most 63 characters (a DNS label). */}}
{{- define "kleidi.fullname" -}}
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

{{- define "kleidi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kleidi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kleidi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kleidi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: kms-plugin
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kleidi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kleidi.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kleidi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The KMS endpoint, as kube-apiserver's EncryptionConfiguration names it. */}}
{{- define "kleidi.endpoint" -}}
{{- printf "unix://%s/%s" (trimSuffix "/" .Values.socket.hostDir) .Values.socket.name }}
{{- end }}
